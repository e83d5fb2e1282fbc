"""`ifcvf bench relay-poll`: what the software relay's adaptive polls cost.

Wall-clock and CPU time are read here only.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import struct
import time
from pathlib import Path

from ifcvf.vring import split_ring_layout

HELP = """\
The software relay cannot rely on the VF's interrupts alone: the VF reads
used_event from the guest's avail ring, which the guest sets from what the
relay showed it, so whenever that value is behind the VF the VF completes
entries silently.  The relay therefore polls each relayed RX queue: every
20 us while the VF may complete silently (backing off to 1 ms while polls
find nothing), every 1 ms otherwise (a safety net: the guest may move
used_event back at any time, and a VF that drained its ring asks for its
kick in the driver's ring).  This measures that cost on this machine.

  ns/poll         one ifc_notify_poll over --queues idle relayed queues, called
                  in a loop (median of --repeat runs): the C work per wake-up
  polls/s, CPU    the real notify loop on its thread (timerfd, epoll), idle,
                  for --seconds per state; CPU is the process CPU time while
                  the main thread sleeps, as a share of one core

States: "armed" (the guest re-enabled interrupts: used_event = the VF's used
index), "stale" (used_event behind the VF: Linux's 0 while it polls), "empty"
(the guest posted no buffer).  --json FILE writes {"ns_per_poll", "states":
[{"state", "polls_per_s", "wakeups_per_s", "cpu_share"}], "queues", ...}.
"""

RING = 256
RX_GPA = 0x1000


def register(subparsers) -> None:
    p = subparsers.add_parser("relay-poll", help="software relay: cost of its adaptive polls",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queues", type=int, default=4, help="relayed RX queues (default 4)")
    p.add_argument("--seconds", type=float, default=1.0, help="seconds per state (default 1)")
    p.add_argument("--repeat", type=int, default=5, help="repetitions of the ns/poll loop (default 5)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    p.set_defaults(func=cmd_relay_poll)


class IdleRelay:
    """``queues`` relayed RX queues with posted buffers and no traffic."""

    def __init__(self, queues: int):
        from hal.memory import HostMemory
        from ifcvf.relay import MediatedRing, MemoryTable, NotifyQueue, NotifyRelay, RelayQueue
        from ifcvf.vdpa import RELAY_POLL_MAX_NS, RELAY_POLL_MIN_NS

        self.stride = split_ring_layout(0, RING)[3]
        self.memory = HostMemory(RX_GPA + queues * self.stride + (1 << 20), "bench-guest")
        table = MemoryTable([(0, self.memory.size, self.memory.address)])
        self.rings, self.relays, self.fds = [], [], []
        specs = []
        for q in range(queues):
            desc = RX_GPA + q * self.stride
            _, avail, used, _ = split_ring_layout(desc, RING)
            ring = MediatedRing(RING)
            relay = RelayQueue(table, RING, desc, avail, used, ring, event_idx=True)
            kick, intr, call = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3))
            self.rings.append((avail, ring))
            self.relays.append(relay)
            self.fds += [kick, intr, call]
            specs.append(NotifyQueue(2 * q, kick_fd=kick, doorbell=self.memory.address, relay=relay,
                                     intr_fd=intr, call_fd=call))
        self.notify = NotifyRelay("bench", specs, poll_min_ns=RELAY_POLL_MIN_NS,
                                  poll_max_ns=RELAY_POLL_MAX_NS)

    def set_state(self, state: str) -> None:
        for avail, ring in self.rings:
            posted = 0 if state == "empty" else RING
            used_event = ring.used_idx if state == "armed" else (ring.used_idx - 1) & 0xFFFF
            struct.pack_into("<H", self.memory.view, avail + 2, (ring.used_idx + posted) & 0xFFFF)
            struct.pack_into("<H", self.memory.view, avail + 4 + 2 * RING, used_event)
        self.notify.poll()          # every queue re-evaluated in its new state

    def close(self) -> None:
        self.notify.close()
        for relay in self.relays:
            relay.close()
        for _, ring in self.rings:
            ring.close()
        for fd in self.fds:
            os.close(fd)
        self.memory.close()


def ns_per_poll(relay: IdleRelay, calls: int = 20_000) -> float:
    from ifcvf._native import lib

    relay.set_state("armed")           # every queue asks for (slow) polls: each call polls all
    ctx, events = relay.notify._ctx, relay.notify._events
    poll, n = lib.ifc_notify_poll, relay.notify.EVENTS
    start = time.perf_counter()
    for _ in range(calls):
        poll(ctx, events, n)
    return (time.perf_counter() - start) * 1e9 / calls


def thread_cost(relay: IdleRelay, state: str, seconds: float) -> dict:
    relay.set_state(state)
    polls0 = sum(relay.notify.stats(q).polls for q in relay.notify.specs)
    wake0 = relay.notify._ctx.wakeups
    relay.notify.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    select.select([], [], [], seconds)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    relay.notify.stop(10.0)
    polls = sum(relay.notify.stats(q).polls for q in relay.notify.specs) - polls0
    return dict(state=state, polls_per_s=polls / wall, wakeups_per_s=(relay.notify._ctx.wakeups - wake0) / wall,
                cpu_share=cpu / wall)


def cmd_relay_poll(args) -> int:
    from rich.console import Console
    from rich.table import Table

    if args.queues < 1 or args.queues > 64:
        raise SystemExit("--queues must be in 1..64")
    relay = IdleRelay(args.queues)
    try:
        per_poll = statistics.median(ns_per_poll(relay) for _ in range(args.repeat))
        states = [thread_cost(relay, s, args.seconds) for s in ("armed", "stale", "empty")]
    finally:
        relay.close()
    console = Console()
    console.print(f"one poll of {args.queues} idle relayed queues: {per_poll:.0f} ns "
                  f"({per_poll / args.queues:.0f} ns per queue; median of {args.repeat})")
    table = Table(title=f"notify loop on its thread, {args.queues} relayed RX queues, no traffic, "
                        f"{args.seconds:g} s per state")
    for col in ("state", "polls/s (all queues)", "wake-ups/s", "CPU (share of a core)"):
        table.add_column(col, justify="right")
    for s in states:
        table.add_row(s["state"], f"{s['polls_per_s']:.0f}", f"{s['wakeups_per_s']:.0f}",
                      f"{100 * s['cpu_share']:.2f} %")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(dict(queues=args.queues, ns_per_poll=per_poll,
                                             seconds=args.seconds, states=states), indent=2) + "\n")
    return 0
