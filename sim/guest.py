"""A guest virtio-net driver, as the simulated VF sees it: split rings in guest RAM.

``GuestNet`` lays out one RX (even) and one TX (odd) virtqueue per queue pair
in guest RAM, runs one guest CPU per pair (simpy callbacks), and drives the
rings the way Linux 6.1's virtio_net and virtio_ring do where interrupts,
indexes and buffers are decided (facts: ../shared/reference/linux-virtio-net.md
section A; the kernel functions are named where they are modelled):

- interrupts: ``vring_interrupt`` (IRQ_NONE without a new used entry; sets
  ``event_triggered`` with EVENT_IDX), delivered per queue over MSI-X or, with
  ``interrupts="intx"``, on one shared line whose handler ``vp_interrupt``
  reads and clears the ISR and scans every queue;
- RX NAPI: ``skb_recv_done`` -> ``virtqueue_napi_schedule`` (the disable only if
  ``napi_schedule_prep`` succeeds, else NAPIF_STATE_MISSED; a no-op while
  ``event_triggered``), ``virtqueue_disable_cb`` (EVENT_IDX: ``used_event = 0``),
  ``used_event`` following consumption buffer by buffer while callbacks are
  on, ``virtnet_poll`` / ``virtnet_receive`` (a budget of packets; a merged
  frame is one), the refill only above min(budget, ring)/2 free buffers
  (``try_fill_recv``, one kick decision; ``refill_work`` when an allocation
  fails), ``virtqueue_napi_complete`` (``enable_cb_prepare``,
  ``napi_complete_done``, the ``virtqueue_poll`` re-check);
- TX: ``start_xmit`` batches (reap first, ``enable_cb_delayed`` on the last
  packet: an interrupt at 3/4 of the chains outstanding; stop below 19 free
  slots, re-armed at the stop as 6.1.y does), TX NAPI (``skb_xmit_done``,
  ``virtnet_poll_tx``) and the TX reaping at the start of every RX poll
  (``virtnet_poll_cleantx``);
- kicks: ``avail->idx`` published per batch, ``vring_need_event`` against
  ``avail_event`` (or VRING_USED_F_NO_NOTIFY).

Kicks and interrupts are eventfds: the guest kicks with
``world.signal_fd(kick_fd)`` (or writes the device's notify page directly
through a host notifier) and watches ``call_fd`` (under INTx every call fd
stands for QEMU's guest notifier: readable -> ISR bit 0 -> the line).

The per-buffer work runs in C a batch per call (``csrc/sim/guest_ring.c``): every
received frame is checked end to end with the traffic checker of
``sim.traffic`` (flow, sequence, every payload byte), every sent frame is a
test frame the sink on the far side of the device can check.

Guest-physical layout (GPA 0 is offset 0 of the guest RAM ``HostMemory``),
from ``base`` (default 1 MiB) upwards; ``GuestNet.layout`` holds the numbers::

    for each queue q = 0 .. 2 * pairs - 1 (RX = 2p, TX = 2p + 1), page aligned:
        desc    16 * size                      descriptor table
        avail   6 + 2 * size                   flags, idx, ring[size], used_event
        used    page aligned, 6 + 8 * size     flags, idx, ring[size], avail_event
        priv    64-aligned driver-private block (csrc/sim/guest_ring.c: shadow avail
                idx, last used idx, free-buffer ring, per-buffer state)
        seq     TX: one u64 next sequence number per flow of the queue
        hdrs    TX split/indirect chains: one 16-byte net-header slot per buffer
        tables  TX indirect chains: one 2-entry (32-byte) table per buffer
    then for each queue, page aligned: nslots buffers of buf_size bytes
    (nslots = size, or size / 2 for split TX chains: two descriptors a frame)

RX buffer i is always descriptor i (one device-writable descriptor of the whole
buffer).  TX chains: "single" (header + frame in one descriptor), "split"
(descriptor 2i: header, NEXT -> 2i + 1: frame) or "indirect" (descriptor i:
INDIRECT -> table i: header, NEXT -> frame).

Migration: everything the driver must find again lives in guest RAM (the
rings and the private blocks, including the TX sequence numbers), so after
``pause()``, a copy of guest RAM to a destination and ``remap(new_memory)``
plus ``attach()`` to the destination VF's eventfds, ``resume()`` continues
from the indexes in memory, taking the interrupts raised while it was paused
(a paused vCPU loses none; nothing else makes it poll, as in a real guest: a
device that completes entries without interrupting stalls it).  The NAPI
state (scheduled, missed) is kernel memory the model keeps outside guest RAM.
The checker's per-flow state is the observer's,
outside guest RAM: a guest that lost state shows up as duplicates or loss.

Guest CPU: ``GuestCosts`` gives the time a pair's core spends per interrupt,
per poll or TX batch, per frame and per kick (``GuestCosts.scaled``: a slower
guest, ~50x under TCG); the core does one thing at a time, an interrupt's
entry cost elapses before the poll it schedules touches the ring, a poll
consumes at its start and its other effects on the rings (avail idx, kicks,
interrupt re-enable) become visible when its work is done, and ``utilisation()`` tells whether the guest
is what limits a run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from sim._native import ffi, lib
from sim import virtio_regs as vr
from sim.traffic import (DEFAULT_DST_MAC, DEFAULT_SRC_MAC, Arrivals, CheckCounts, Checker,
                         SizeDist, Stream, mac_bytes)
from sim.frames import WIRE_OVERHEAD
from sim.ring_layout import ring_layout, used_ring_bytes
from sim.world import World

_tx_xmit = lib.ifc_gvq_tx_xmit
_tx_clean = lib.ifc_gvq_tx_clean

PAGE = 4096
DEFAULT_BASE = 0x10_0000

# Feature bits that change what the driver does on its rings.
DATAPATH_FEATURES = vr.feature_mask(vr.F_VERSION_1, vr.F_NET_MRG_RXBUF, vr.F_EVENT_IDX,
                                    vr.F_INDIRECT_DESC)
# What this driver accepts when a device offers it (negotiate()).  The rest of
# the net bits it takes are harmless here: MQ pairs are set by whoever starts
# the device, and the one control command the model sends (ANNOUNCE_ACK) goes
# to the QEMU role, which owns the control queue (see config_interrupt).
SUPPORTED_FEATURES = DATAPATH_FEATURES | vr.feature_mask(
    vr.F_NET_MAC, vr.F_NET_MTU, vr.F_NET_STATUS, vr.F_NET_MQ, vr.F_NET_CTRL_VQ,
    vr.F_NET_GUEST_ANNOUNCE, vr.F_ACCESS_PLATFORM, vr.F_ORDER_PLATFORM)

ETH_P_ARP = 0x0806
GUEST_IP = bytes([10, 0, 0, 2])    # the address the model's gratuitous ARPs announce


def gratuitous_arp(mac: bytes, ip: bytes = GUEST_IP) -> bytes:
    """What ``netdev_notify_peers`` makes IPv4 send (arp_send(ARPOP_REQUEST, ...,
    ip, dev, ip, NULL, dev_addr, NULL)): a broadcast ARP request for the
    interface's own address, padded to the 60-byte Ethernet minimum."""
    arp = ((1).to_bytes(2, "big") + (0x0800).to_bytes(2, "big") + bytes([6, 4])
           + (1).to_bytes(2, "big") + mac + ip + bytes(6) + ip)
    frame = b"\xff" * 6 + mac + ETH_P_ARP.to_bytes(2, "big") + arp
    return frame + bytes(60 - len(frame))

TX_CHAINS = ("single", "split", "indirect")
INTERRUPTS = ("msix", "intx")
MAX_SKB_FRAGS = 17             # 4 KiB pages (skbuff.h 348-352)
RX_SCRATCH = 65536 + 64       # the largest frame merged over RX buffers


def negotiate(offered: int, wanted: int = SUPPORTED_FEATURES) -> int:
    """The features this driver accepts from an offer.

    GUEST_ANNOUNCE only with CTRL_VQ (virtnet_validate_features 3639-3661
    refuses one without the other; the model drops it instead)."""
    features = offered & wanted & SUPPORTED_FEATURES
    if not features >> vr.F_NET_CTRL_VQ & 1:
        features &= ~(1 << vr.F_NET_GUEST_ANNOUNCE)
    return features


def net_header_len(features: int) -> int:
    """12 bytes (num_buffers present) with VERSION_1 or MRG_RXBUF, else 10."""
    return 12 if features & vr.feature_mask(vr.F_VERSION_1, vr.F_NET_MRG_RXBUF) else 10


def _align(value: int, align: int) -> int:
    return (value + align - 1) // align * align


@dataclass(frozen=True)
class GuestCosts:
    """Guest CPU time per unit of work, in ns (one core per queue pair).

    Defaults describe a lean kernel driver on a modern core: an interrupt
    that finds the core idle costs ~1 us before the poll starts, each frame a
    couple of hundred ns (so one core handles ~4-5 Mpps of combined RX + TX,
    enough for 100 GbE at 1518 B over 4 pairs but far from 64 B line rate).
    """

    irq_ns: float = 1000.0       # interrupt entry until the NAPI poll runs
    poll_ns: float = 200.0       # per RX poll: bookkeeping, refill, publish
    rx_frame_ns: float = 200.0   # per received frame
    tx_batch_ns: float = 200.0   # per TX batch: reclaim, publish
    tx_frame_ns: float = 200.0   # per sent frame
    kick_ns: float = 100.0       # per kick (a doorbell write)

    def __post_init__(self) -> None:
        for name in ("irq_ns", "poll_ns", "rx_frame_ns", "tx_batch_ns", "tx_frame_ns", "kick_ns"):
            if getattr(self, name) < 0:
                raise ValueError(f"GuestCosts.{name} must not be negative")

    def scaled(self, factor: float) -> "GuestCosts":
        """Every cost times ``factor`` (a slower guest: about 50 under TCG)."""
        if factor <= 0:
            raise ValueError("a guest cost scale must be positive")
        return GuestCosts(*(getattr(self, f) * factor for f in
                            ("irq_ns", "poll_ns", "rx_frame_ns", "tx_batch_ns", "tx_frame_ns",
                             "kick_ns")))


@dataclass(frozen=True)
class QueueLayout:
    """Where one virtqueue lives in guest-physical memory."""

    index: int
    size: int
    nslots: int
    buf_size: int
    desc: int
    avail: int
    used: int
    priv: int
    seq: int       # TX: per-flow sequence numbers (0 for RX)
    hdrs: int      # TX split/indirect: header slots (0 otherwise)
    tables: int    # TX indirect: descriptor tables (0 otherwise)
    bufs: int

    @property
    def is_tx(self) -> bool:
        return self.index % 2 == 1


def plan_layout(queue_pairs: int, queue_size: int, *, rx_buffer_size: int, tx_buffer_size: int,
                tx_chain: str = "single", tx_flows: int = 1,
                base: int = DEFAULT_BASE) -> tuple[list[QueueLayout], int]:
    """(per-queue layout, end GPA) of a guest with these rings (see the module doc)."""
    if tx_chain not in TX_CHAINS:
        raise ValueError(f"tx_chain must be one of {', '.join(TX_CHAINS)}, not {tx_chain!r}")
    if not 1 <= queue_size <= 32768 or queue_size & (queue_size - 1):
        raise ValueError(f"queue size {queue_size} is not a power of two in 1..32768")
    if tx_chain == "split" and queue_size < 2:
        raise ValueError("split TX chains need a queue of at least 2 entries")
    rings = []
    addr = base
    for q in range(2 * queue_pairs):
        tx = q % 2 == 1
        nslots = queue_size // 2 if tx and tx_chain == "split" else queue_size
        desc, avail, used, _ = ring_layout(_align(addr, PAGE), queue_size)
        priv = _align(used + used_ring_bytes(queue_size), 64)
        addr = priv + lib.ifc_gvq_priv_size(nslots)
        seq = hdrs = tables = 0
        if tx:
            seq = _align(addr, 64)
            addr = seq + 8 * tx_flows
            if tx_chain != "single":
                hdrs = _align(addr, 64)
                addr = hdrs + 16 * nslots
            if tx_chain == "indirect":
                tables = _align(addr, 64)
                addr = tables + 32 * nslots
        rings.append((q, nslots, desc, avail, used, priv, seq, hdrs, tables))
    layouts = []
    for q, nslots, desc, avail, used, priv, seq, hdrs, tables in rings:
        buf_size = tx_buffer_size if q % 2 else rx_buffer_size
        bufs = _align(addr, PAGE)
        addr = bufs + nslots * buf_size
        layouts.append(QueueLayout(q, queue_size, nslots, buf_size, desc, avail, used, priv, seq,
                                   hdrs, tables, bufs))
    return layouts, _align(addr, PAGE)


class _Queue:
    """One virtqueue: its C view, eventfds and counters."""

    def __init__(self, guest: "GuestNet", layout: QueueLayout, flags: int, hdr_len: int):
        self.guest = guest
        self.layout = layout
        self.index = layout.index
        self.is_tx = layout.is_tx
        self.c = ffi.new("ifc_gvq *")
        c = self.c
        c.desc, c.avail, c.used, c.priv = layout.desc, layout.avail, layout.used, layout.priv
        c.bufs, c.hdrs, c.tables = layout.bufs, layout.hdrs, layout.tables
        c.size, c.nslots, c.buf_size = layout.size, layout.nslots, layout.buf_size
        c.hdr_len, c.flags = hdr_len, flags
        self.scratch = None
        if not self.is_tx and flags & lib.IFC_GVQ_F_MRG:
            self.scratch = ffi.new("uint8_t[]", RX_SCRATCH)
            c.scratch, c.scratch_size = self.scratch, RX_SCRATCH
        self.kick_fd = -1
        self.call_fd = -1
        self.notify: Callable[[], None] | None = None   # a host notifier (see attach)
        self.kicks = 0
        self.kicks_suppressed = 0
        self.interrupts = 0      # MSI-X: interrupts taken on this queue's vector
        self.handled = 0         # vring_interrupt found new used entries (callback ran)
        self.irq_none = 0        # vring_interrupt returned IRQ_NONE
        self.irq_pending = False # an interrupt raised while the guest was paused
        self.polls = 0
        self.broken = ""
        self.stats = None        # RX: ifc_check_stats (the guest's checker)
        self.stream: Stream | None = None   # TX
        self._watcher = None

    def bind(self, memory, fresh: bool) -> None:
        self.c.mem = ffi.cast("uint8_t *", memory.address)
        self.c.mem_size = memory.size
        rc = lib.ifc_gvq_init(self.c, 1 if fresh else 0)
        if rc != 0:
            raise ValueError(f"queue {self.index}: the ring layout does not fit guest RAM or the "
                             "driver-private block in memory is not consistent")

    def kick(self) -> None:
        if self.notify is not None:
            self.kicks += 1
            self.notify()
        elif self.kick_fd >= 0:
            self.kicks += 1
            self.guest.world.signal_fd(self.kick_fd)

    def publish(self) -> bool:
        """Publish the shadow avail idx; kick if the device asked for it.  True if kicked."""
        if lib.ifc_gvq_publish(self.c):
            self.kick()
            return True
        self.kicks_suppressed += 1
        return False


class _Wake:
    """A pair's wake-up: a one-shot event as light as a simpy Event can be.

    ``wake()`` triggers it (scheduled now, like ``Event.succeed()``), its
    callbacks run when simpy processes it; a triggered one stays triggered
    until the core takes a fresh one before it sleeps again."""

    __slots__ = ("callbacks", "triggered")
    _ok = True

    def __init__(self):
        self.callbacks: list = []
        self.triggered = False


class _Pair:
    """One queue pair, its two NAPI instances and the guest core that serves it.

    NAPI state as Linux keeps it (``include/linux/netdevice.h``): ``*_sched``
    is NAPI_STATE_SCHED (a poll is owed), ``*_missed`` NAPIF_STATE_MISSED
    (``napi_schedule_prep`` found the poll already scheduled, so
    ``napi_complete_done`` returns false and NAPI polls once more)."""

    def __init__(self, guest: "GuestNet", index: int, rx: _Queue, tx: _Queue):
        self.guest = guest
        self.index = index
        self.rx = rx
        self.tx = tx
        self.world = guest.world
        self.wake_ev = _Wake()
        self.rx_sched = False
        self.rx_missed = False
        self.rx_irq = False          # the next RX poll pays an interrupt's entry cost
        self.tx_sched = False        # TX NAPI (virtnet_poll_tx) owed
        self.tx_missed = False
        self.tx_irq = False
        self.tx_active = False
        self.tx_stopped = False      # netif_stop_subqueue: too few free slots
        self.tx_next = 0
        self.tx_limit: int | None = None
        self.tx_backlog = 0          # arrivals mode: frames due, not sent yet
        self.credit = 0.0            # TX: offered wire bytes not sent yet
        self.credit_time = 0
        self.timer_at: int | None = None
        self.refill_at: int | None = None   # refill_work queued (delayed work)
        self.rx_disabled = False     # napi_disable'd while refill_work runs
        self.arrivals: Arrivals | None = None   # TX arrivals mode
        self.tx_raw: list[bytes] = []            # frames the stack sends (announcements)
        self.refill_works = 0
        self.alloc_failures = 0
        self.debt_ns = 0.0           # CPU time owed for work done after a busy period
        self.busy_cycles = 0

    # kept for readers of the old name: the TX queue waits for room
    @property
    def tx_blocked(self) -> bool:
        return self.tx_stopped

    @property
    def rx_scheduled(self) -> bool:
        return self.rx_sched

    def wake(self) -> None:
        ev = self.wake_ev
        if not ev.triggered:
            ev.triggered = True
            self.world.schedule_now(ev)

    def _timer(self, at: int) -> None:
        if self.timer_at == at:
            self.timer_at = None
            self.wake()


class GuestNet:
    """A guest virtio-net driver over split rings in ``memory`` (guest RAM, GPA 0 = offset 0).

    ``features`` is the negotiated feature set (see ``negotiate``); the
    datapath bits change the driver: VERSION_1 or MRG_RXBUF -> 12-byte net
    header (else 10), MRG_RXBUF -> RX frames may span buffers (num_buffers
    honoured), EVENT_IDX -> used_event / avail_event instead of the flags,
    INDIRECT_DESC -> ``tx_chain="indirect"`` is allowed.

    RX frames are checked against flows ``rx_flow_base .. + rx_flows - 1``.
    TX: each pair sends ``tx_flows`` flows (pair p: ``tx_flow_base + p *
    tx_flows`` upwards) of ``tx_sizes`` at ``tx_rate_gbps`` / pairs each
    (layer-1 rate, like ``sim.traffic.Generator``), at most ``tx_frames`` per
    pair; ``tx_rate_gbps=0`` sends nothing.  A pair's core sends a batch when
    ``tx_batch`` frames' worth of rate has accrued, or after ``tx_wait_ns``
    with whatever has (so slow rates do not wait for a full batch).

    ``fresh=False`` adopts rings already in ``memory`` (a guest whose RAM was
    restored) instead of initialising them; ``ring_base`` starts every index
    of fresh rings at that value instead of 0, as rings restored after a
    migration would be (it makes the u16 wrap-around quick to reach).

    ``interrupts``: ``"msix"`` (a vector per queue) or ``"intx"`` (one shared
    line, the ISR read).  ``rx_alloc_fail``: the chance that an RX refill
    (GFP_ATOMIC) runs out of memory part way, so ``refill_work`` refills
    later.  ``tx_pps`` (instead of ``tx_rate_gbps``): frames per second over
    all pairs from ``sim.traffic.Arrivals`` (``tx_pattern``, ``tx_burst``,
    ``tx_on_us``, ``tx_off_us``), each pair sending what has arrived.
    """

    def __init__(self, world: World, memory, *, features: int, queue_pairs: int = 1,
                 queue_size: int = 256, base: int = DEFAULT_BASE, rx_buffer_size: int = 1536,
                 tx_buffer_size: int = 1536, tx_chain: str = "single",
                 costs: GuestCosts = GuestCosts(), napi_budget: int = 64, tx_batch: int = 64,
                 rx_flows: int = 1, rx_flow_base: int = 0, rx_max_frame: int = 1514,
                 tx_rate_gbps: float = 0.0, tx_sizes: SizeDist | str | int = 1518,
                 tx_flows: int = 1, tx_flow_base: int = 0x1000, tx_flow_run: int = 1,
                 tx_frames: int | None = None, tx_wait_ns: float = 10_000.0,
                 mac: bytes | str = DEFAULT_DST_MAC, peer_mac: bytes | str = DEFAULT_SRC_MAC,
                 name: str = "guest", trace_polls: bool = False, fresh: bool = True,
                 ring_base: int = 0, interrupts: str = "msix", rx_alloc_fail: float = 0.0,
                 tx_pps: float = 0.0, tx_pattern: str = "constant", tx_burst: int = 1,
                 tx_on_us: float = 0.0, tx_off_us: float = 0.0,
                 link_up_announce: bool = False):
        if queue_pairs < 1:
            raise ValueError("a guest needs at least one queue pair")
        if napi_budget < 1 or tx_batch < 1:
            raise ValueError("napi_budget and tx_batch must be at least 1")
        if tx_chain == "indirect" and not features >> vr.F_INDIRECT_DESC & 1:
            raise ValueError("indirect TX chains need VIRTIO_F_INDIRECT_DESC")
        if interrupts not in INTERRUPTS:
            raise ValueError(f"interrupts must be one of {', '.join(INTERRUPTS)}, not {interrupts!r}")
        if not 0.0 <= rx_alloc_fail <= 1.0:
            raise ValueError(f"rx_alloc_fail is a probability, not {rx_alloc_fail}")
        if tx_pps < 0 or (tx_pps and tx_rate_gbps):
            raise ValueError("give tx_rate_gbps or tx_pps, not both (and neither negative)")
        self.world = world
        self.memory = memory
        self.features = features
        self.name = name
        self.queue_pairs = queue_pairs
        self.queue_size = queue_size
        self.costs = costs
        self.napi_budget = napi_budget
        self.tx_batch = tx_batch
        self.tx_chain = tx_chain
        self.trace_polls = trace_polls
        self.hdr_len = net_header_len(features)
        self.mrg_rxbuf = bool(features >> vr.F_NET_MRG_RXBUF & 1)
        self.event_idx = bool(features >> vr.F_EVENT_IDX & 1)
        if not self.mrg_rxbuf and rx_buffer_size < self.hdr_len + rx_max_frame:
            raise ValueError(f"RX buffers of {rx_buffer_size} B cannot hold a {rx_max_frame}-byte "
                             f"frame and the {self.hdr_len}-byte header without MRG_RXBUF")
        if rx_buffer_size <= self.hdr_len:
            raise ValueError(f"RX buffers of {rx_buffer_size} B leave no room after the header")
        if not isinstance(tx_sizes, SizeDist):
            tx_sizes = SizeDist.parse(tx_sizes, world.rng(f"{name}.tx_sizes"))
        self.tx_sizes = tx_sizes
        tx_room = tx_buffer_size - (self.hdr_len if tx_chain == "single" else 0)
        if tx_sizes.max_length > tx_room:
            raise ValueError(f"TX frames of {tx_sizes.max_length} B do not fit {tx_buffer_size}-byte "
                             f"TX buffers with {tx_chain} chains")
        self.tx_flows = tx_flows
        self.tx_flow_base = tx_flow_base
        self.layout, self.end = plan_layout(queue_pairs, queue_size, rx_buffer_size=rx_buffer_size,
                                            tx_buffer_size=tx_buffer_size, tx_chain=tx_chain,
                                            tx_flows=tx_flows, base=base)
        if self.end > memory.size:
            raise ValueError(f"the rings and buffers need {self.end:#x} bytes of guest RAM, "
                             f"it has {memory.size:#x}")

        flags = lib.IFC_GVQ_F_EVENT_IDX if self.event_idx else 0
        self.checker = Checker(rx_flows, rx_flow_base)
        self.queues: list[_Queue] = []
        self.pairs: list[_Pair] = []
        self.mac = mac_bytes(mac)
        self.peer_mac = mac_bytes(peer_mac)
        for p in range(queue_pairs):
            rx = _Queue(self, self.layout[2 * p],
                        flags | (lib.IFC_GVQ_F_MRG if self.mrg_rxbuf else 0), self.hdr_len)
            txflags = flags | {"single": 0, "split": lib.IFC_GVQ_F_TX_SPLIT,
                               "indirect": lib.IFC_GVQ_F_TX_INDIRECT}[tx_chain]
            tx = _Queue(self, self.layout[2 * p + 1], txflags, self.hdr_len)
            rx.stats = self.checker.new_stats()
            self.queues += [rx, tx]
            pair = _Pair(self, p, rx, tx)
            pair.tx_limit = tx_frames
            self.pairs.append(pair)
        self._bind(memory, fresh)
        for pair in self.pairs:
            lay = pair.tx.layout
            seq = ffi.cast("uint64_t *", memory.address + lay.seq)
            pair.tx.stream = Stream(tx_sizes, flows=tx_flows, flow_base=tx_flow_base + pair.index * tx_flows,
                                    flow_run=tx_flow_run, dst_mac=self.peer_mac, src_mac=self.mac,
                                    seq=seq)
            pair.tx_active = tx_rate_gbps > 0 or tx_pps > 0
        # TX arrivals mode (tx_pps): the pairs' sources start with the guest
        self._tx_arrivals_kw = dict(pattern=tx_pattern, burst=tx_burst, on_us=tx_on_us,
                                    off_us=tx_off_us)
        if tx_pps > 0:
            Arrivals(world, tx_pps / queue_pairs, **self._tx_arrivals_kw)   # validate now
        self.tx_arrivals = True if tx_pps > 0 else None
        self.tx_pps = tx_pps
        self.interrupts = interrupts
        self.isr = 0                 # INTx: QEMU's ISR (bit 0: a queue, read-to-clear)
        self._line_pending = False
        self.intx_interrupts = 0     # INTx: vp_interrupt calls that found the ISR set
        self.irq_none = 0            # vp_interrupt calls that returned IRQ_NONE
        self.rx_alloc_fail = rx_alloc_fail
        self._alloc_rng = world.rng(f"{name}.alloc")
        self._refill_delay = max(1, world.cycles(costs.irq_ns))   # a kworker wake-up
        # netif_stop_subqueue below 2 + MAX_SKB_FRAGS free slots (a ring too
        # small for that stops only when full)
        self._tx_stop_free = 2 + MAX_SKB_FRAGS if queue_size >= 4 * (2 + MAX_SKB_FRAGS) else 1
        self._xmit = ffi.new("struct ifc_gvq_xmit *")     # what _tx_work's C call did
        self.tx_rate_gbps = tx_rate_gbps
        # Offered wire bytes per cycle, per pair.
        self._tx_bpc = tx_rate_gbps * 1e9 / 8 / world.clock_hz / queue_pairs
        self._tx_mean_wire = tx_sizes.mean_length + WIRE_OVERHEAD
        self._tx_wait = max(1, world.cycles(tx_wait_ns))
        self._cyc = world.clock_hz / 1e9
        self._refilled = ffi.new("int64_t *")
        if fresh:
            for q in self.queues:
                if ring_base and lib.ifc_gvq_rebase(q.c, ring_base & 0xFFFF) != 0:
                    raise ValueError(f"queue {q.index}: cannot start the ring at {ring_base}")
            for pair in self.pairs:
                lib.ifc_gvq_refill(pair.rx.c, pair.rx.layout.nslots)
                lib.ifc_gvq_publish(pair.rx.c)   # nobody to kick yet
        self.paused = False
        self._resume_ev = world.env.event()
        self.started = False
        self.started_at = 0
        self.errors: list[str] = []
        # The announce path (config_interrupt): QEMU's side is given by attach_control
        self.link_up_announce = link_up_announce
        self.announces = 0           # gratuitous ARPs queued (link-up and S_ANNOUNCE)
        self.announce_times: list[int] = []
        self.announce_acks = 0
        self.config_interrupts = 0
        self.config_pending = False  # a config interrupt raised while paused
        self._read_status: Callable[[], int] | None = None
        self._ack_announce: Callable[[], bool] | None = None
        world.record(name, "guest_init", pairs=queue_pairs, size=queue_size, hdr_len=self.hdr_len,
                     mrg=self.mrg_rxbuf, event_idx=self.event_idx, tx_chain=tx_chain,
                     fresh=fresh, interrupts=interrupts)

    # ------------------------------------------------------------------------------
    # layout and wiring
    # ------------------------------------------------------------------------------
    @property
    def num_queues(self) -> int:
        return 2 * self.queue_pairs

    def queue_addresses(self, index: int) -> tuple[int, int, int]:
        """(desc, avail, used) guest-physical addresses of queue ``index``."""
        lay = self.layout[index]
        return lay.desc, lay.avail, lay.used

    def ring_indexes(self, index: int) -> tuple[int, int]:
        """(avail idx, used idx) as published in guest memory."""
        lay = self.layout[index]
        view = self.memory.view
        avail = int.from_bytes(view[lay.avail + 2:lay.avail + 4], "little")
        used = int.from_bytes(view[lay.used + 2:lay.used + 4], "little")
        return avail, used

    def _bind(self, memory, fresh: bool) -> None:
        for q in self.queues:
            q.bind(memory, fresh)

    def attach(self, index: int, kick_fd: int, call_fd: int,
               notify: Callable[[], None] | None = None) -> None:
        """Kick queue ``index`` through ``kick_fd``; take its interrupts from ``call_fd``.

        Each queue needs a call eventfd of its own (it is drained on every
        interrupt); it is made non-blocking if it is not.  -1 leaves a side
        unconnected (no kicks are sent / no interrupts are taken).

        ``notify``: a host notifier.  The guest's kick is its MMIO write to the
        device's notify page, which lands there directly; ``notify()`` makes
        that write and ``kick_fd`` is not signalled (no eventfd, no relay on
        the path, as with a vhost host notifier)."""
        q = self.queues[index]
        self._unwatch(q)
        q.kick_fd, q.call_fd = kick_fd, call_fd
        q.notify = notify
        if call_fd >= 0:
            # Watchers may be called when the fd is not readable: the drain
            # must never block the simulation.
            if os.get_blocking(call_fd):
                os.set_blocking(call_fd, False)
            q._watcher = (self._intx_handler(q) if self.interrupts == "intx"
                          else self._msix_handler(q))
            self.world.watch_fd(call_fd, q._watcher)
        self.world.record(self.name, "attach", queue=index, kick=kick_fd >= 0 or notify is not None,
                          call=call_fd >= 0)

    def detach(self, index: int | None = None) -> None:
        """Forget the eventfds of one queue (or all): no kicks, no interrupts."""
        for q in self.queues if index is None else [self.queues[index]]:
            self._unwatch(q)
            q.kick_fd = q.call_fd = -1
            q.notify = None
        self.world.record(self.name, "detach", queue=-1 if index is None else index)

    def _unwatch(self, q: _Queue) -> None:
        watcher = q._watcher
        if watcher is not None and q.call_fd >= 0:
            self.world.unwatch_fd(q.call_fd, watcher)
        q._watcher = None

    def remap(self, memory) -> None:
        """Continue on another copy of guest RAM (a migration destination).

        The rings, private blocks and TX sequence numbers are taken from the
        new memory as they are; the checker's flow state is kept.
        """
        if memory.size < self.end:
            raise ValueError(f"the new guest RAM ({memory.size:#x} bytes) is smaller than the layout")
        self.memory = memory
        self._bind(memory, fresh=False)
        for pair in self.pairs:
            pair.tx.stream.c.seq = ffi.cast("uint64_t *", memory.address + pair.tx.layout.seq)
            pair.tx.stream._seq = pair.tx.stream.c.seq
            pair.rx.broken = pair.tx.broken = ""
        self.world.record(self.name, "remap", size=memory.size)

    # ------------------------------------------------------------------------------
    # running
    # ------------------------------------------------------------------------------
    def start(self) -> None:
        """The interface comes up (virtnet_open 1696-1725): the RX rings were
        filled at construction; virtnet_napi_enable and virtnet_napi_tx_enable
        each schedule one poll through virtqueue_napi_schedule, whose disable
        really runs (used_event = 0 with EVENT_IDX) -- a poll entered other
        than from an interrupt.  TX production begins."""
        if self.started:
            return
        self.started = True
        self.started_at = self.world.now
        for pair in self.pairs:
            pair.credit_time = self.world.now
            pair.tx_next = self.world.now
            if self.tx_arrivals is not None:
                pair.arrivals = Arrivals(self.world, self.tx_pps / self.queue_pairs,
                                         name=f"{self.name}.tx{pair.index}",
                                         **self._tx_arrivals_kw)
            if self._napi_schedule_prep(pair, tx=False):
                lib.ifc_gvq_disable_cb(pair.rx.c)
            if self._napi_schedule_prep(pair, tx=True):
                lib.ifc_gvq_disable_cb(pair.tx.c)
            self._core_start(pair)
        if self.link_up_announce:
            self.announce()
        self.world.record(self.name, "guest_start")

    def pause(self) -> None:
        """Stop the guest CPUs (a migration's stop-and-copy): no ring changes until resume."""
        if self.paused:
            return
        self.paused = True
        self.world.record(self.name, "pause")

    def resume(self) -> None:
        """Run again: the interrupts raised while paused are taken now (MSI-X:
        each pending vector; INTx: the line, if the ISR is set)."""
        if not self.paused:
            return
        self.paused = False
        ev, self._resume_ev = self._resume_ev, self.world.env.event()
        now = self.world.now
        for pair in self.pairs:
            pair.credit_time = now      # the application was frozen too: no credit accrued
            if pair.arrivals is not None:
                pair.arrivals.take(now)  # nor did it produce frames meanwhile
            pair.wake()
        self.world.record(self.name, "resume")
        ev.succeed()
        if self.interrupts == "intx":
            if self.isr:
                self._line_pending = False
                self._raise_intx()
        else:
            if self.config_pending:
                self.config_pending = False
                self._vp_config_changed()
            for q in self.queues:
                if q.irq_pending:
                    q.irq_pending = False
                    q.interrupts += 1
                    self._vring_interrupt(q)

    def kick_all(self) -> None:
        """Kick every attached queue once (e.g. after attaching to a new device)."""
        for q in self.queues:
            q.kick()

    def stop_tx(self) -> None:
        for pair in self.pairs:
            pair.tx_active = False

    # --- interrupts -------------------------------------------------------------------
    # Delivery as vp_find_vqs sets it up (virtio_pci_common.c 397-417):
    #   msix: one vector per queue; the handler is vring_interrupt itself and
    #         the ISR is never read (vp_find_vqs_msix 284-356);
    #   intx: one shared line; vp_interrupt (82-100) reads the ISR, which
    #         clears it (0: IRQ_NONE), then scans every queue through
    #         vring_interrupt.  The call eventfds stand for QEMU's guest
    #         notifiers: each one readable sets ISR bit 0 and raises the line
    #         (QEMU reads the notifier, virtio_irq -> ISR |= 1 -> INTx).
    # While the guest is paused (stop-and-copy) interrupts stay pending and
    # are delivered at resume, as a stopped vCPU would take them.
    def _drain(self, q: _Queue) -> bool:
        try:
            os.eventfd_read(q.call_fd)
        except (BlockingIOError, OSError):
            return False
        return True

    def _msix_handler(self, q: _Queue):
        def on_irq(_fd: int) -> None:
            try:                # (= self._drain(q), inline: once per interrupt)
                os.eventfd_read(q.call_fd)
            except (BlockingIOError, OSError):
                return
            if self.paused:
                q.irq_pending = True
                return
            q.interrupts += 1
            self._vring_interrupt(q)
        return on_irq

    def _intx_handler(self, q: _Queue):
        def on_notifier(_fd: int) -> None:
            if not self._drain(q):
                return
            self._raise_intx()
        return on_notifier

    def _raise_intx(self) -> None:
        self.isr |= 1
        if not self._line_pending and not self.paused:
            # Level-triggered: every notifier read before the guest takes the
            # interrupt lands in the same ISR read.
            self._line_pending = True
            self.world.call_at(self.world.now, lambda _ev: self._vp_interrupt())

    def _vp_interrupt(self) -> None:
        """vp_interrupt: read-and-clear the ISR, then vring_interrupt on every queue."""
        self._line_pending = False
        if self.paused:
            return                      # the ISR stays set; resume() raises the line again
        isr, self.isr = self.isr, 0
        if not isr:
            self.irq_none += 1
            return
        self.intx_interrupts += 1
        if isr & 2:
            self._vp_config_changed()   # and still IRQ_NONE unless a queue has work
        handled = False
        for q in self.queues:
            handled |= self._vring_interrupt(q)
        if not handled:
            self.irq_none += 1

    # --- config changes and announce (A.6) ----------------------------------------------
    # With vhost-user, QEMU owns both the config space (status) and the control
    # queue (B.4: never handed to the back-end): attach_control gives the model
    # QEMU's side of them, ``read_status()`` (the config status field) and
    # ``ack_announce()`` (virtio_net_handle_announce: True = VIRTIO_NET_OK).
    def attach_control(self, read_status: Callable[[], int],
                       ack_announce: Callable[[], bool]) -> None:
        self._read_status = read_status
        self._ack_announce = ack_announce

    def config_interrupt(self) -> None:
        """QEMU's virtio_notify_config: the config vector (MSI-X), or ISR bit 1
        and the line (INTx).  Taken at resume when the guest is paused."""
        self.config_interrupts += 1
        if self.interrupts == "intx":
            self.isr |= 2
            if not self._line_pending and not self.paused:
                self._line_pending = True
                self.world.call_at(self.world.now, lambda _ev: self._vp_interrupt())
            return
        if self.paused:
            self.config_pending = True
            return
        self._vp_config_changed()

    def _vp_config_changed(self) -> None:
        """virtnet_config_changed (3315-3320) only schedules the config work,
        which runs on a kworker (its wake-up: an interrupt's entry cost)."""
        delay = max(1, self.world.cycles(self.costs.irq_ns))
        self.world.call_at(self.world.now + delay, lambda _ev: self._config_work())

    def _config_work(self) -> None:
        """virtnet_config_changed_work (3282-3313): nothing without STATUS; with
        VIRTIO_NET_S_ANNOUNCE, netdev_notify_peers (a gratuitous ARP) then
        virtnet_ack_link_announce (class 3, command 0 on the control queue,
        which QEMU handles: the model calls its handler directly)."""
        if self.paused:
            self._resume_ev.callbacks.append(lambda _ev: self._config_work())
            return
        if not self.features >> vr.F_NET_STATUS & 1 or self._read_status is None:
            return
        status = self._read_status()
        self.world.record(self.name, "config_changed", status=status)
        if status & vr.NET_S_ANNOUNCE:
            self.announce()
            if self.features >> vr.F_NET_GUEST_ANNOUNCE & 1 and self._ack_announce is not None:
                ok = self._ack_announce()
                self.announce_acks += 1
                self.world.record(self.name, "announce_ack", ok=int(ok))

    def announce(self) -> None:
        """netdev_notify_peers: a gratuitous ARP from the guest's MAC, through
        the TX queue of pair 0 (dev_queue_xmit)."""
        pair = self.pairs[0]
        pair.tx_raw.append(gratuitous_arp(self.mac))
        self.announces += 1
        self.announce_times.append(self.world.now)
        self.world.record(self.name, "announce", mac=self.mac.hex())
        pair.wake()

    def _vring_interrupt(self, q: _Queue) -> bool:
        """vring_interrupt (virtio_ring.c 2445-2473): IRQ_NONE unless the queue has
        a new used entry; with EVENT_IDX sets event_triggered; then the callback:
        ``skb_recv_done`` (RX) or ``skb_xmit_done`` (TX)."""
        if q.broken or not lib.ifc_gvq_interrupt(q.c):
            q.irq_none += 1
            return False
        q.handled += 1
        pair = self.pairs[q.index // 2]
        if q.is_tx:
            # skb_xmit_done (409-422): disable_cb, then TX NAPI
            lib.ifc_gvq_disable_cb(q.c)
            if self._napi_schedule_prep(pair, tx=True):
                lib.ifc_gvq_disable_cb(q.c)
                pair.tx_irq = True
                pair.wake()
        else:
            # skb_recv_done (1475-1481) -> virtqueue_napi_schedule (386-393): the
            # disable (a no-op with event_triggered set) only if
            # napi_schedule_prep succeeds; otherwise NAPIF_STATE_MISSED.
            if self._napi_schedule_prep(pair, tx=False):
                lib.ifc_gvq_disable_cb(q.c)
                pair.rx_irq = True
                pair.wake()
        return True

    @staticmethod
    def _napi_schedule_prep(pair: _Pair, *, tx: bool) -> bool:
        """napi_schedule_prep (net/core/dev.c): SCHED already set -> MISSED, false."""
        if tx:
            if pair.tx_sched:
                pair.tx_missed = True
                return False
            pair.tx_sched = True
            return True
        if pair.rx_disabled:
            return False                # napi_disable'd by refill_work (NAPIF_STATE_DISABLE)
        if pair.rx_sched:
            pair.rx_missed = True
            return False
        pair.rx_sched = True
        return True

    def _napi_schedule(self, pair: _Pair, *, tx: bool) -> None:
        """virtqueue_napi_schedule from outside an interrupt (virtnet_napi_enable,
        a re-check): the disable really runs (used_event = 0 with EVENT_IDX)."""
        if self._napi_schedule_prep(pair, tx=tx):
            lib.ifc_gvq_disable_cb((pair.tx if tx else pair.rx).c)
            pair.wake()

    # --- the core -----------------------------------------------------------------------
    # A pair's core is a chain of callbacks rather than a simpy process: the
    # same steps at the same cycles, each scheduled exactly where the process
    # would have resumed (its first step an urgent event, a timeout per busy
    # period, the wake event or the resume event otherwise), without resuming
    # a generator every time.  In process terms:
    #
    #     loop:  paused -> wait for resume
    #            work (refill_work, RX poll, TX poll, start_xmit batch) -> busy
    #                for its CPU time, then (waiting out a pause) finish it
    #                (publish, kicks, napi_complete); loop
    #            idle -> arm the TX timer; pay CPU debt, or wait for a wake-up
    #
    # A poll consumes at the start of its busy period and its ring effects
    # (refill kick, re-enabling callbacks) become visible at the end.
    def _core_start(self, pair: _Pair) -> None:
        self.world.call_first(lambda _ev: self._core(pair))

    def _core(self, pair: _Pair) -> None:
        """Run the core from the top of its loop until it has to wait."""
        world = self.world
        env = world.env
        costs = self.costs
        budget = self.napi_budget
        while True:
            if self.paused:
                self._resume_ev.callbacks.append(lambda _ev: self._core(pair))
                return
            ns = 0.0
            rx_n = -1
            txp_n = -1
            tx_n = -1
            refill = False
            now = env._now
            if pair.rx_irq or pair.tx_irq:
                # The interrupt's entry (hard irq, softirq dispatch) runs before
                # the poll it scheduled touches the ring.
                pair.rx_irq = pair.tx_irq = False
                c = int((costs.irq_ns + pair.debt_ns) * self._cyc + 0.999999)
                pair.debt_ns = 0.0
                if c:
                    pair.busy_cycles += c
                    world.call_with(env._now + c, self._core, pair)
                    return
            if pair.refill_at is not None and pair.refill_at <= now and not pair.rx_sched:
                refill = True
                ns += costs.poll_ns + self._refill_work(pair)
            if pair.rx_sched and not pair.rx.broken:
                self._cleantx(pair)
                rx_n = self._rx_work(pair, budget)
                ns += costs.poll_ns + max(rx_n, 0) * costs.rx_frame_ns
            elif pair.rx_sched:
                pair.rx_sched = pair.rx_missed = False
            if pair.tx_sched and not pair.tx.broken:
                txp_n = self._tx_poll(pair)
                ns += costs.tx_batch_ns
            elif pair.tx_sched:
                pair.tx_sched = pair.tx_missed = False
            if pair.tx_raw and not pair.tx_stopped and not pair.tx.broken:
                raw_n = self._tx_raw_work(pair)
                tx_n = raw_n
                ns += costs.tx_batch_ns + raw_n * costs.tx_frame_ns
            if pair.tx_active and not pair.tx_stopped and not pair.tx.broken:
                if self.tx_arrivals is not None:
                    pair.tx_backlog += pair.arrivals.take(now)
                    due = pair.tx_backlog > 0
                else:
                    due = now >= pair.tx_next
                if due:
                    sent = self._tx_work(pair)
                    tx_n = max(tx_n, 0) + sent
                    ns += costs.tx_batch_ns + max(sent, 0) * costs.tx_frame_ns
            if refill or rx_n >= 0 or txp_n >= 0 or tx_n >= 0:
                ns += pair.debt_ns
                pair.debt_ns = 0.0
                c = int(ns * self._cyc + 0.999999)
                pair.busy_cycles += c
                world.call_at(env._now + c,
                              lambda _ev: self._core_done(pair, refill, rx_n, txp_n, tx_n))
                return
            # Idle: sleep until an interrupt, queued work or the next TX frame is due.
            if pair.wake_ev.triggered:
                pair.wake_ev = _Wake()
            at = None
            if pair.tx_active and not pair.tx_stopped and not pair.tx.broken:
                at = pair.arrivals.next_at() if self.tx_arrivals is not None else pair.tx_next
            if pair.refill_at is not None and not pair.rx_sched:
                at = pair.refill_at if at is None else min(at, pair.refill_at)
            if at is not None:
                now = env._now
                if at <= now:
                    continue
                if pair.timer_at is None or pair.timer_at > at or pair.timer_at < now:
                    pair.timer_at = at
                    world.call_with(at, pair._timer, at)
            if pair.debt_ns:
                c = int(pair.debt_ns * self._cyc + 0.999999)
                pair.debt_ns = 0.0
                pair.busy_cycles += c
                world.call_with(env._now + c, self._core, pair)
                return
            pair.wake_ev.callbacks.append(lambda _ev: self._core(pair))
            return

    def _core_done(self, pair: _Pair, refill: bool, rx_n: int, txp_n: int, tx_n: int) -> None:
        """The CPU time of the work has passed: its effects become visible."""
        if self.paused:
            self._resume_ev.callbacks.append(
                lambda _ev: self._core_done(pair, refill, rx_n, txp_n, tx_n))
            return
        if refill:
            self._refill_finish(pair)
        if rx_n >= 0:
            self._rx_finish(pair, rx_n, self.napi_budget)
        if txp_n >= 0:
            self._tx_poll_finish(pair)
        if tx_n >= 0:
            self._tx_finish(pair)
        self._core(pair)

    # --- RX: virtnet_poll ------------------------------------------------------------
    def _rx_work(self, pair: _Pair, budget: int) -> int:
        """virtnet_receive (virtio_net.c 1542-1587): up to ``budget`` packets, then
        the refill if more than min(budget, ring)/2 buffers are free
        (try_fill_recv, GFP_ATOMIC: ``rx_alloc_fail`` makes an allocation fail)."""
        q = pair.rx
        stats = q.stats
        bad_before = stats.corrupted
        refilled = self._refilled
        refill_max = q.layout.nslots
        if self.rx_alloc_fail and self._alloc_rng.random() < self.rx_alloc_fail:
            refill_max = self._alloc_rng.randrange(0, max(1, q.layout.nslots // 4))
        n = lib.ifc_gvq_rx_poll(q.c, budget, self.checker.c, stats, refill_max, refilled)
        q.polls += 1
        if n < 0:
            self._broken(q)
            return 0
        if stats.corrupted != bad_before:
            reason, flow, seq = Checker.last_bad(stats)
            self.world.record(self.name, "rx_bad", queue=q.index,
                              count=stats.corrupted - bad_before, reason=reason, flow=flow,
                              seq=seq)
        if refilled[0] < 0:
            self._broken(q)
        elif q.c.refill_wanted and refilled[0] < q.c.refill_wanted:
            # try_fill_recv failed (-ENOMEM): schedule_delayed_work(&vi->refill, 0)
            pair.alloc_failures += 1
            if pair.refill_at is None:
                pair.refill_at = self.world.now + self._refill_delay
            self.world.record(self.name, "rx_alloc_failed", queue=q.index,
                              added=refilled[0], wanted=q.c.refill_wanted)
        if self.trace_polls:
            self.world.record(self.name, "rx_poll", queue=q.index, frames=n,
                              entries=q.c.last_entries)
        return n

    def _rx_finish(self, pair: _Pair, n: int, budget: int) -> None:
        q = pair.rx
        if q.broken:
            pair.rx_sched = pair.rx_missed = False
            return
        # try_fill_recv's single kick decision, before callbacks are re-enabled
        if q.publish():
            pair.debt_ns += self.costs.kick_ns
        if n >= budget:
            return          # a full budget: NAPI polls again, callbacks untouched
        # virtqueue_napi_complete: enable_cb_prepare (used_event = last_used),
        # napi_complete_done (false when MISSED), virtqueue_poll re-check.
        done = not pair.rx_missed
        pair.rx_missed = False
        if not lib.ifc_gvq_napi_complete(q.c, 1 if done else 0):
            pair.rx_sched = False

    def _refill_work(self, pair: _Pair) -> float:
        """refill_work (1520-1540): napi_disable (the poll is idle here),
        try_fill_recv(GFP_KERNEL) -- which the model lets succeed -- with its kick,
        then virtnet_napi_enable (a poll, entered not from an interrupt)."""
        q = pair.rx
        pair.refill_works += 1
        pair.rx_disabled = True
        if not q.broken:
            if lib.ifc_gvq_refill(q.c, q.layout.nslots) < 0:
                self._broken(q)
        self.world.record(self.name, "refill_work", queue=q.index)
        return 0.0

    def _refill_finish(self, pair: _Pair) -> None:
        pair.refill_at = None
        pair.rx_disabled = False
        if pair.rx.broken:
            return
        if pair.rx.publish():
            pair.debt_ns += self.costs.kick_ns
        self._napi_schedule(pair, tx=False)

    # --- TX: start_xmit, virtnet_poll_tx, virtnet_poll_cleantx ----------------------------
    def _reclaim(self, q: _Queue) -> bool:
        if lib.ifc_gvq_tx_reclaim(q.c) < 0:
            self._broken(q)
            return False
        return True

    def _cleantx(self, pair: _Pair) -> None:
        """virtnet_poll_cleantx (1635-1661), at the start of every RX poll (not
        charged): do { disable_cb; free_old_xmit_skbs } while
        (!enable_cb_delayed); wake the queue if enough slots are free."""
        q = pair.tx
        if q.broken:
            return
        free = _tx_clean(q.c)        # the loop, in C
        if free < 0:
            self._broken(q)
        elif pair.tx_stopped and free >= self._tx_stop_free:
            pair.tx_stopped = False       # netif_tx_wake_queue

    def _maybe_wake_tx(self, pair: _Pair) -> None:
        if pair.tx_stopped and lib.ifc_gvq_num_free(pair.tx.c) >= self._tx_stop_free:
            pair.tx_stopped = False       # netif_tx_wake_queue

    def _tx_poll(self, pair: _Pair) -> int:
        """virtnet_poll_tx (1727-1771): disable_cb and free every completion (the
        budget is ignored), wake the queue if 19 or more slots are free."""
        q = pair.tx
        before = q.c.completed
        lib.ifc_gvq_disable_cb(q.c)
        if not self._reclaim(q):
            return 0
        self._maybe_wake_tx(pair)
        return q.c.completed - before

    def _tx_poll_finish(self, pair: _Pair) -> None:
        q = pair.tx
        if q.broken:
            pair.tx_sched = pair.tx_missed = False
            return
        done = not pair.tx_missed
        pair.tx_missed = False
        if not lib.ifc_gvq_napi_complete(q.c, 1 if done else 0):
            pair.tx_sched = False

    def _tx_want(self, pair: _Pair) -> int:
        if self.tx_arrivals is not None:
            return min(self.tx_batch, pair.tx_backlog)
        now = self.world.env.now
        mean = self._tx_mean_wire
        cap = 2.0 * self.tx_batch * mean
        pair.credit = min(cap, pair.credit + (now - pair.credit_time) * self._tx_bpc)
        pair.credit_time = now
        return min(self.tx_batch, int(pair.credit / mean))

    def _tx_work(self, pair: _Pair) -> int:
        """A batch of start_xmit calls (1820-1896, the 6.1.y form with TX NAPI):
        each reaps first (disable_cb + free_old_xmit_skbs); the last packet of
        the batch (no xmit_more) re-arms with enable_cb_delayed (used_event 3/4
        of the outstanding chains ahead), looping while that finds more done;
        a packet that leaves fewer than ``_tx_stop_free`` slots stops the queue,
        which enable_cb_delayed re-arms (a TX NAPI poll if already past)."""
        q = pair.tx
        c = q.c
        want = self._tx_want(pair)
        stream = q.stream
        if pair.tx_limit is not None:
            want = min(want, pair.tx_limit - stream.c.frames)
            if want <= 0 and stream.c.frames >= pair.tx_limit:
                pair.tx_active = False
                return 0
        n = 0
        if want > 0:
            # The ring part (reap, room check, the posts and the last
            # packet's re-arm loop) in one C call: csrc/sim/guest_ring.c.
            x = self._xmit
            _tx_xmit(c, want, self._tx_stop_free, stream.c, x)
            n = x.frames
            if x.broken:
                self._broken(q)
                return n
            if x.sent:
                wire = x.bytes + WIRE_OVERHEAD * n
                if self.tx_arrivals is not None:
                    pair.tx_backlog -= n
                else:
                    pair.credit -= wire
                if x.num_free < self._tx_stop_free:
                    pair.tx_stopped = True    # netif_stop_subqueue
                    if not lib.ifc_gvq_enable_cb_delayed(c):
                        # 6.1.y ("correctly enable callback during start_xmit"):
                        # already past: schedule TX NAPI
                        if self._napi_schedule_prep(pair, tx=True):
                            lib.ifc_gvq_disable_cb(c)
        if self.trace_polls:
            self.world.record(self.name, "tx_batch", queue=q.index, frames=n)
        q.polls += 1
        return n

    def _tx_raw_work(self, pair: _Pair) -> int:
        """start_xmit of frames the stack built (announcements): reap, post, the
        last packet's enable_cb_delayed; a frame without a free slot waits."""
        q = pair.tx
        c = q.c
        lib.ifc_gvq_disable_cb(c)
        if not self._reclaim(q):
            return 0
        n = 0
        while pair.tx_raw and lib.ifc_gvq_num_free(c) > 0:
            frame = pair.tx_raw[0]
            got = lib.ifc_gvq_tx_post_frame(c, frame, len(frame))
            if got < 0:
                self._broken(q)
                return n
            if got == 0:
                break
            pair.tx_raw.pop(0)
            n += 1
        while not lib.ifc_gvq_enable_cb_delayed(c):
            lib.ifc_gvq_disable_cb(c)
            if not self._reclaim(q):
                return n
        return n

    def _tx_finish(self, pair: _Pair) -> None:
        q = pair.tx
        if q.broken:
            return
        if q.publish():                   # kick if kick || netif_xmit_stopped
            pair.debt_ns += self.costs.kick_ns
        if self.tx_arrivals is not None or not self._tx_bpc:
            return
        deficit = self.tx_batch * self._tx_mean_wire - pair.credit
        wait = int(deficit / self._tx_bpc + 0.999999) if deficit > 0 else 0
        pair.tx_next = self.world.now + min(wait, self._tx_wait)

    def _broken(self, q: _Queue) -> None:
        if q.broken:
            return
        code = q.c.error
        q.broken = _RING_ERRORS.get(code, f"error {code}")
        message = f"queue {q.index}: {q.broken} (value {q.c.error_value})"
        self.errors.append(message)
        self.world.record(self.name, "ring_error", queue=q.index, error=q.broken,
                          value=q.c.error_value)

    # ------------------------------------------------------------------------------
    # results
    # ------------------------------------------------------------------------------
    def rx_counts(self, pair: int | None = None) -> CheckCounts:
        """What the RX consumers checked: one pair, or all of them."""
        pairs = self.pairs if pair is None else [self.pairs[pair]]
        total = CheckCounts()
        for p in pairs:
            total = total + CheckCounts.of(p.rx.stats)
        return total

    def rx_totals(self) -> tuple[int, int]:
        """(frames, bytes) the RX consumers checked: ``rx_counts()``'s two, without
        building it (runs sample them every few simulated us)."""
        frames = nbytes = 0
        for p in self.pairs:
            st = p.rx.stats
            frames += st.frames
            nbytes += st.bytes
        return frames, nbytes

    def tx_frames(self, pair: int | None = None) -> int:
        pairs = self.pairs if pair is None else [self.pairs[pair]]
        return sum(p.tx.stream.c.frames for p in pairs)

    def tx_bytes(self, pair: int | None = None) -> int:
        pairs = self.pairs if pair is None else [self.pairs[pair]]
        return sum(p.tx.stream.c.bytes for p in pairs)

    def tx_sent_per_flow(self) -> list[int]:
        """Frames sent per TX flow, all pairs, in flow-id order from ``tx_flow_base``."""
        out: list[int] = []
        for p in self.pairs:
            out += p.tx.stream.sent_per_flow()
        return out

    def utilisation(self, since: int | None = None) -> list[float]:
        """Busy fraction of each pair's core since start."""
        start = self.started_at if since is None else since
        elapsed = max(1, self.world.now - start)
        return [min(1.0, p.busy_cycles / elapsed) for p in self.pairs]

    def counts(self) -> dict:
        """Totals and per-queue counters (plain data, for reports and tests)."""
        queues = []
        for q in self.queues:
            row = {"queue": q.index, "kicks": q.kicks, "kicks_suppressed": q.kicks_suppressed,
                   "interrupts": q.interrupts, "handled": q.handled, "irq_none": q.irq_none,
                   "polls": q.polls, "broken": q.broken,
                   "completed": q.c.completed, "posted": q.c.made_available}
            if q.is_tx:
                row.update(frames=q.stream.c.frames, bytes=q.stream.c.bytes)
            else:
                row.update(CheckCounts.of(q.stats).as_dict())
            queues.append(row)
        rx = self.rx_counts()
        return {"tx_frames": self.tx_frames(), "tx_bytes": self.tx_bytes(),
                "rx": rx.as_dict(), "queues": queues, "interrupts": self.interrupts,
                "intx_interrupts": self.intx_interrupts, "irq_none": self.irq_none,
                "refill_works": sum(p.refill_works for p in self.pairs),
                "alloc_failures": sum(p.alloc_failures for p in self.pairs)}


_RING_ERRORS = {
    lib.IFC_GVQ_E_ID: "used id outside the ring",
    lib.IFC_GVQ_E_NOT_POSTED: "used id the device does not hold",
    lib.IFC_GVQ_E_LEN: "used length out of range",
    lib.IFC_GVQ_E_NUM_BUFFERS: "bad num_buffers",
    lib.IFC_GVQ_E_PARTIAL: "num_buffers beyond the published used entries",
    lib.IFC_GVQ_E_TOO_LONG: "merged frame too long",
    lib.IFC_GVQ_E_USED_IDX: "used idx more than the ring size ahead",
    lib.IFC_GVQ_E_PRIV: "driver-private block in guest RAM is corrupt",
}

__all__ = ["GuestNet", "GuestCosts", "QueueLayout", "plan_layout", "negotiate", "net_header_len",
           "SUPPORTED_FEATURES", "DATAPATH_FEATURES", "TX_CHAINS"]
