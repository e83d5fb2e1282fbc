"""One simulated world per run: clock, seeded randomness, trace, eventfd wiring.

Time is an integer count of device clock cycles (default 250 MHz).  The data
path (device engines, guest traffic, relay pollers) runs as simpy processes;
the control plane (back-end, driver) runs outside them and advances the world
when it blocks (an MMIO read, a sleep, a poll).  Blocking from inside a simpy
process would deadlock the model, so it raises instead.

Determinism: every component draws from ``world.rng(name)``, seeded from the
run seed and a stable hash of the name (never ``hash()``); no wall clock is
read; the trace digest is a sha256 over canonical records.
"""
from __future__ import annotations

import collections
import hashlib
import math
import os
import random
import select
from typing import Callable

import simpy

DEFAULT_CLOCK_HZ = 250_000_000


class BlockingInProcess(RuntimeError):
    """A control-plane call tried to advance time from inside a simpy process."""


class Trace:
    """Canonical event records folded into a sha256, the last few kept for reading."""

    def __init__(self, keep: int = 2000):
        self._hash = hashlib.sha256()
        self.records: collections.deque = collections.deque(maxlen=keep)
        self.count = 0
        self.counts: dict[str, int] = {}

    def record(self, cycle: int, source: str, event: str, fields: dict) -> None:
        body = " ".join(f"{k}={_canon(fields[k])}" for k in sorted(fields))
        line = f"{cycle} {source} {event} {body}\n"
        self._hash.update(line.encode())
        self.records.append(line.rstrip("\n"))
        self.count += 1
        self.counts[event] = self.counts.get(event, 0) + 1

    def digest(self) -> str:
        return self._hash.hexdigest()

    def find(self, event: str) -> list[str]:
        """Kept records of one event kind (for tests and error reports)."""
        return [r for r in self.records if r.split(" ", 3)[2] == event]


def _canon(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_canon(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value).replace(" ", "_").replace("\n", "_")


class World:
    """The shared clock, randomness and trace of one simulation run."""

    def __init__(self, seed: int = 0, clock_hz: int = DEFAULT_CLOCK_HZ):
        if clock_hz <= 0:
            raise ValueError("clock_hz must be positive")
        self.seed = seed
        self.clock_hz = clock_hz
        self.env = simpy.Environment()
        self.trace = Trace()
        self._fd_watchers: dict[int, list[Callable[[int], None]]] = {}
        self._poll: select.poll | None = None

    # --- time ---------------------------------------------------------------
    @property
    def now(self) -> int:
        """Current time in cycles."""
        return int(self.env.now)

    def cycles(self, ns: float) -> int:
        """Nanoseconds to cycles, rounded up (a delay is never shortened)."""
        return math.ceil(ns * self.clock_hz / 1e9 - 1e-9) if ns > 0 else 0

    def ns(self, cycles: int) -> int:
        """Cycles to whole nanoseconds (rounded down)."""
        return cycles * 1_000_000_000 // self.clock_hz

    def now_ns(self) -> int:
        return self.ns(self.now)

    def in_process(self) -> bool:
        return self.env.active_process is not None

    def run_until(self, cycle: int) -> None:
        """Advance the world to ``cycle`` (control plane only)."""
        if self.in_process():
            raise BlockingInProcess(
                f"blocking call from simpy process {self.env.active_process!r}: "
                "data-path actors must yield events, not block")
        if cycle > self.env.now:
            self.env.run(until=cycle)
        # simpy stops *before* events due at ``until``; the control plane means
        # "everything up to and including this cycle has happened".
        while self.env.peek() == cycle:
            self.env.step()

    def advance(self, cycles: int) -> None:
        self.run_until(self.now + max(0, cycles))

    def advance_ns(self, ns: float) -> None:
        self.advance(self.cycles(ns))

    def process(self, generator):
        return self.env.process(generator)

    def timeout(self, cycles: int):
        return self.env.timeout(max(0, int(cycles)))

    # --- randomness and trace -------------------------------------------------
    def rng(self, name: str) -> random.Random:
        """A generator private to ``name``: same seed and name, same stream, any process."""
        digest = hashlib.sha256(f"{self.seed}\0{name}".encode()).digest()
        return random.Random(int.from_bytes(digest[:16], "little"))

    def record(self, source: str, event: str, **fields) -> None:
        self.trace.record(self.now, source, event, fields)

    def digest(self) -> str:
        return self.trace.digest()

    # --- eventfds -------------------------------------------------------------
    # The writer and the watcher of an eventfd usually hold different fd
    # numbers for it (one end came over vhost-user with SCM_RIGHTS), so a
    # signal cannot be routed by number.  Instead, after every write, every
    # watched fd that is readable is reported: watchers must be idempotent
    # (a fd stays readable until its owner drains it).
    def watch_fd(self, fd: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(fd)`` whenever ``fd`` may have become readable."""
        self._fd_watchers.setdefault(fd, []).append(callback)
        self._poll = None

    def unwatch_fd(self, fd: int, callback: Callable[[int], None] | None = None) -> None:
        if callback is None:
            self._fd_watchers.pop(fd, None)
        else:
            watchers = self._fd_watchers.get(fd, [])
            if callback in watchers:
                watchers.remove(callback)
            if not watchers:
                self._fd_watchers.pop(fd, None)
        self._poll = None

    def watched_fds(self) -> list[int]:
        return list(self._fd_watchers)

    def signal_fd(self, fd: int) -> None:
        """Write 1 to an eventfd (a real one: it may belong to another process) and wake watchers."""
        if fd < 0:
            return
        try:
            os.eventfd_write(fd, 1)
        except OSError:
            # A closed fd: the signal is lost, as a real MSI-X write to a
            # torn-down irqfd would be; the trace says so.
            self.record("world", "signal_lost")
            return
        self.wake_readable()

    def wake_readable(self) -> None:
        """Report every watched fd that is readable now (C code wrote some)."""
        if not self._fd_watchers:
            return
        if self._poll is None:
            self._poll = select.poll()
            for watched in self._fd_watchers:
                self._poll.register(watched, select.POLLIN)
        for ready, _ in sorted(self._poll.poll(0)):
            for callback in list(self._fd_watchers.get(ready, ())):
                callback(ready)

    def notify_watchers(self, fd: int) -> None:
        """Wake the watchers of one fd (for callers that know it is readable)."""
        for callback in list(self._fd_watchers.get(fd, ())):
            callback(fd)
