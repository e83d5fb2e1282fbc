"""Split-ring queue engines of the simulated IFCVF VF: TX (odd queues) and RX (even queues).

An engine is transaction-level: a wake-up (a *round*) takes a batch of avail
entries (at most ``engine_batch``), does all the ring work for them in one C
call (``csrc/sim/simdp.c``: walk and validate every chain, copy frames, write
RX buffers, mark dirty pages), computes the PCIe and wire timestamps of the
batch arithmetically, and schedules one event for its completion, where the
used entries are published and the interrupt decision is taken.  An idle
engine schedules nothing (clock gating); it wakes on a doorbell (TX, and RX
waiting for buffers) or on frames from the wire (RX).

Timeline of a round started at cycle t (all on the function's shared
``PcieLink``; each read costs its requests upstream, its completions
downstream and one read latency; writes are posted and ordered)::

    t   -> t1  read avail->idx (2 B)
    t1  -> t2  read the avail ring entries of the batch (1 request, 2 when it wraps)
    t2  -> t3  read the descriptors: contiguous ones coalesced into requests up to
               MRRS; one more read latency per dependent level (a NEXT that is not
               the following descriptor, an indirect table)
    TX: t3 -> t4  read every buffer (header included): requests by MRRS,
               completions by MPS; frame i is ready once its last completion is
               in and leaves on the wire at max(ready, wire free) (store and
               forward, ``Port.transmit(..., ready=...)``)
        t4 -> t5  write the used elements and used->idx; t5 = visible
    RX: t3 -> t4  write header + frame into the buffers (TLPs by MPS), plus the
               dirty-log words when logging is on
        t4 -> t5  write the used elements and used->idx; t5 = visible
    t5         publish: used entries become visible to the driver; MSI-X if the
               driver asked for it (the message lands ``msix_ns`` later)

Pipelining: the next round of a queue may start once there may be more work
(the batch was full) and fewer than ``engine_fetch_depth`` rounds of the
queue are still fetching descriptors.  TX also stops fetching while the
frames already fetched would keep the wire busy for longer than the
``tx_buffer_bytes`` on-device buffer drains.

Frames from the wire wait in a per-RX-queue FIFO (``rx_fifo_bytes``) until
a round places them; frames that do not fit are dropped and counted.  A
round runs when frames arrive (if no round is waiting for its pipeline
slot), and while the FIFO holds frames and buffers exist.  Without buffers
the engine asks for a kick and sleeps.

Notifications, virtio 1.x 2.7.7 / 2.7.10: after publishing, the device
interrupts unless the driver suppressed it (VRING_AVAIL_F_NO_INTERRUPT, or
with EVENT_IDX vring_need_event(used_event, new, old) is false).  Kicks:
with EVENT_IDX the device writes avail_event = last_avail when it goes idle
(the next avail entry triggers a kick); without it, it sets
VRING_USED_F_NO_NOTIFY while busy and clears it when idle.  Going idle
re-checks the ring after asking for kicks, so no kick is ever missed.

Validation (any violation: ``fn.mark_needs_reset(reason)`` with the reason,
the queue stops, the trace and ``fn.iommu.faults`` show it, nothing is
written for the offending chain): ring addresses mapped and aligned, avail
idx at most size ahead, ids < size, chains no longer than their table,
INDIRECT only with the feature, at the head, without NEXT, not nested, with
a length that is a non-zero multiple of 16 of at most size entries, every
buffer and table inside IOMMU mappings, TX buffers device-readable, RX
buffers device-writable, mergeable RX buffers at least a net header long.
A device that needs a reset fetches nothing more (every queue); rounds
already fetched complete.  Without bus mastering no round runs.

Stop (IFCVF's queue_enable = 0): no new round; rounds already fetched
complete (TX frames leave on the wire and get used entries, RX DMA
finishes), then ``done()``: ``last_avail == last_used`` on the QueueState.
Frames waiting in the RX FIFO are dropped.  A reset aborts: nothing in
flight is published.

Dirty logging: while BAR 4 logging is on, every 4 KiB page of every RX
buffer range the device writes gets its bit (bit = IOVA / 4096, IOVA = GPA as
the driver maps guest memory) in the bitmap at IOVA [base, end), set through
the IOMMU with an atomic OR.  TX writes no packet buffer; used-ring writes
are never logged (the driver marks used rings at stop).  A page whose bit
lies beyond ``end`` or on an unmapped log IOVA is a recorded logging fault,
not a write.  ``dirty_log_skip_fraction`` skips that share of marks (seeded
from ``world.rng``) and lists the pages in ``Datapath.skipped_pages``.
"""
from __future__ import annotations

from array import array
from collections import deque
from typing import Callable

from sim._native import ffi, lib
from sim import virtio_regs as vr
from sim.dma import SegmentTable
from sim.frames import U8S, U32S, FrameBatch
from sim.pcie import COMMAND
from sim.pcie_link import PcieLink
from sim.queue_state import IdleEngine, QueueState
from sim.wire import BufferPool, Port


ETH_HLEN = 14
VLAN_HLEN = 4
_ZERO_TIME = array("q", [0])
_SKIP_CAP = 4096
_rx_round = lib.ifc_dp_rx_round
_fifo_push = lib.ifc_dp_fifo_push

_MEMORY_ERRORS = {
    lib.IFC_DP_E_DESC_ADDR: "read", lib.IFC_DP_E_AVAIL_ADDR: "read",
    lib.IFC_DP_E_USED_ADDR: "write", lib.IFC_DP_E_INDIRECT_ADDR: "read",
}


def header_length(features: int) -> int:
    """virtio-net header bytes: 12 with VERSION_1 or MRG_RXBUF, else 10 (virtio 5.1.6)."""
    if features >> vr.F_VERSION_1 & 1 or features >> vr.F_NET_MRG_RXBUF & 1:
        return 12
    return 10


def _text(code: int) -> str:
    return ffi.string(lib.ifc_dp_error_text(code)).decode()


class Datapath:
    """The device side of one VF's datapath: PCIe link, wire port, dirty log, RX steering.

    ``steering``: a ``sim.steering.FlowSteering`` (what `ifcvf serve` installs)
    learns each transmitted batch's flows and splits each received batch by
    flow over the pairs in use.  Without it, ``steer``: None sends every
    received frame to the RX queue of pair 0; a callable ``steer(batch) ->
    pair`` picks the pair for each received batch (the scenarios' test frames).
    """

    def __init__(self, fn):
        cfg = fn.config
        self.fn = fn
        self.world = fn.world
        self.config = cfg
        self.name = fn.name
        self.link = PcieLink(fn.world, gen=cfg.pcie_gen, lanes=cfg.pcie_lanes, mps=cfg.pcie_mps,
                             mrrs=cfg.pcie_mrrs, rcb=cfg.pcie_rcb,
                             completions_at_rcb=cfg.pcie_completions_at_rcb,
                             read_latency_ns=cfg.pcie_read_latency_ns,
                             write_latency_ns=cfg.pcie_write_latency_ns)
        self.port = Port(fn.world, f"{fn.name}.port", cfg.wire_gbps)
        self.port.on_receive(self.receive)
        self.mem = SegmentTable(fn.iommu)
        self.max_frame = cfg.mtu + ETH_HLEN + VLAN_HLEN
        self.kick_to_fetch = fn.world.cycles(cfg.kick_to_fetch_ns)
        self.tx_drain = int(cfg.tx_buffer_bytes * 8 * fn.world.clock_hz // (cfg.wire_gbps * 10**9))
        self.steer: Callable[[FrameBatch], int] | None = None
        self.steering = None        # sim.steering.FlowSteering
        self.rx_no_queue = 0
        # Dirty logging state shared by the RX engines (one bitmap per function).
        self.log = ffi.new("struct ifc_dp_log *")
        self._skipped = ffi.new("uint64_t[]", _SKIP_CAP)
        self.log.skipped = self._skipped
        self.log.skipped_cap = _SKIP_CAP
        fraction = cfg.dirty_log_skip_fraction
        if fraction > 0:
            self.log.skip_threshold = min(1 << 63, round(fraction * (1 << 63)))
            self.log.rng = fn.world.rng(f"{fn.name}.dirty_log_skip").getrandbits(64)
        # Bus mastering, as every round checks it: kept from the command
        # register by a hook on its writes (the only way it changes), instead
        # of decoding config space each time.
        self.bus_master = fn.pci.bus_master
        fn.pci.on_write(COMMAND, 2, self._command_written)
        self.skipped_pages: list[int] = []
        self._skipped_seen: set[int] = set()
        self._log_faults_seen = 0
        self._log_unmapped_seen = 0

    # --- plumbing -----------------------------------------------------------------
    def _command_written(self) -> None:
        self.bus_master = self.fn.pci.bus_master

    def engine_for(self, fn, queue: QueueState):
        """The engine factory: RX for even queues, TX for odd ones, idle for the control vq."""
        if queue.index >= 2 * fn.config.queue_pairs:
            return IdleEngine(queue)
        return RxEngine(self, queue) if queue.index % 2 == 0 else TxEngine(self, queue)

    def refresh_mem(self) -> int:
        """Rebuild the C IOMMU table if the mappings changed; the current generation."""
        if self.mem.refresh():
            self.log.cache_host = ffi.NULL
            self.log.cache_size = 0
        return self.mem.generation

    def log_for_round(self):
        """The C log context with BAR 4's logging state applied (NULL when off)."""
        lm = self.fn.lm
        rng = lm.log_range() if lm is not None else None
        log = self.log
        if rng is None:
            log.on = 0
            return ffi.NULL
        log.base, log.end = rng
        log.on = 1
        log.word_open = 0
        log.words = 0
        return log

    def after_log(self, qid: int) -> None:
        """Collect skipped pages and report logging faults of the last C call."""
        log = self.log
        n = log.skipped_n
        if n:
            kept = min(n, _SKIP_CAP)
            seen = self._skipped_seen
            for i in range(kept):
                page = self._skipped[i]
                if page not in seen:
                    seen.add(page)
                    self.skipped_pages.append(page)
            if n > kept:
                self.world.record(self.name, "dirty_log_skips_unlisted", qid=qid, count=n - kept)
            log.skipped_n = 0
        if log.range_faults != self._log_faults_seen:
            count = log.range_faults - self._log_faults_seen
            self._log_faults_seen = log.range_faults
            self.world.record(self.name, "dirty_log_fault", qid=qid, count=count,
                              last_page=log.last_range_fault, base=log.base, end=log.end,
                              reason="page beyond the log end")
        if log.unmapped_faults != self._log_unmapped_seen:
            count = log.unmapped_faults - self._log_unmapped_seen
            self._log_unmapped_seen = log.unmapped_faults
            self.fn.iommu.record_fault(log.last_unmapped_fault, 1, "write",
                                       "dirty log page not mapped")
            self.world.record(self.name, "dirty_log_fault", qid=qid, count=count,
                              last_iova=log.last_unmapped_fault, reason="log not mapped")

    def log_counts(self) -> dict:
        log = self.log
        return {"marks": log.marks, "set": log.set, "skipped": log.skips,
                "range_faults": log.range_faults, "unmapped_faults": log.unmapped_faults}

    # --- the wire -----------------------------------------------------------------
    def receive(self, batch: FrameBatch) -> None:
        """Frames from the port (called at the last frame's arrival)."""
        if self.steering is not None:
            for pair, part in self.steering.split(batch):
                self._deliver(pair, part)
            return
        self._deliver(self.steer(batch) if self.steer is not None else 0, batch)

    def _deliver(self, pair: int, batch: FrameBatch) -> None:
        qid = 2 * pair
        engine = self.fn.queues[qid].engine if 0 <= pair < self.config.queue_pairs else None
        if not isinstance(engine, RxEngine):
            self.rx_no_queue += len(batch.lengths)
            self.world.record(self.name, "rx_no_queue", pair=pair, frames=len(batch.lengths))
            return
        engine.receive(batch)

    def stats(self) -> dict:
        queues = {}
        for queue in self.fn.queues:
            engine = queue.engine
            if isinstance(engine, _Engine):
                queues[queue.index] = engine.counters()
        stats = {"queues": queues, "port": self.port.counters(), "log": self.log_counts(),
                 "rx_no_queue": self.rx_no_queue,
                 "pcie": {"up_bytes": self.link.up_bytes, "down_bytes": self.link.down_bytes}}
        if self.steering is not None:
            stats["steering"] = self.steering.counters()
        return stats


class _Engine:
    """What TX and RX engines share: binding, the round/completion machinery, stop."""

    kind = "?"
    write = False

    def __init__(self, dp: Datapath, queue: QueueState):
        self.dp = dp
        self.fn = dp.fn
        self.world = dp.world
        self.env = dp.world.env
        self.queue = queue
        self.qid = queue.index
        self.source = f"{dp.name}.q{queue.index}"
        self._trace = dp.world.trace
        # The segment table's fast path needs a domain that counts its changes.
        self._domain = dp.mem.domain if hasattr(dp.mem.domain, "generation") else None
        self._link_c = dp.link.c
        self.cq = ffi.new("struct ifc_dp_vq *")
        self.round = ffi.new("struct ifc_dp_round *")
        self.times = ffi.new("struct ifc_dp_times *")
        self.batch = dp.config.engine_batch
        self.depth = dp.config.engine_fetch_depth
        self.running = False
        self.broken: str | None = None
        self._bufs = None
        self._bound = -1
        self._epoch = 0             # bumped by start and aborts: stale completions do nothing
        self._qepoch = 0            # queue.epoch the engine works for
        self._token = 0             # bumped by start/stop: stale round wake-ups do nothing
        self._scheduled = False
        self._blocked = False
        self._halted = False
        self._notify_on = True
        self._pending: deque = deque()
        # (ids, lens) C arrays of rounds not in flight any more, for reuse: a
        # round's C call writes its used ids straight into one and the
        # completion publishes from it, so nothing is copied in between.
        self._free: list = []
        self._in_flight = 0         # used entries fetched, not yet published
        self._fetching: deque = deque(maxlen=self.depth)
        self._done_cb: Callable[[], None] | None = None
        self.rounds = 0
        self.chains = 0
        self.frames = 0
        self.bytes = 0
        self.dropped = 0
        self.interrupts = 0
        self.kicks = 0
        self.idles = 0

    # --- the QueueEngine protocol ---------------------------------------------------
    def start(self) -> None:
        q, cq, cfg = self.queue, self.cq, self.dp.config
        self._token += 1
        self._epoch += 1
        self._qepoch = q.epoch
        self.running = True
        self.broken = None
        self._scheduled = self._blocked = self._halted = False
        self._pending.clear()
        self._in_flight = 0
        self._fetching.clear()
        self._done_cb = None
        features = self.fn.driver_features
        ffi.memmove(cq, bytes(ffi.sizeof("struct ifc_dp_vq")), ffi.sizeof("struct ifc_dp_vq"))
        self._bufs = ffi.new("struct ifc_dp_buf[]", q.size)
        cq.bufs, cq.bufs_cap = self._bufs, q.size
        cq.size = q.size
        cq.desc_iova, cq.avail_iova, cq.used_iova = q.desc, q.avail, q.used
        cq.flags = ((lib.IFC_DP_F_EVENT_IDX if features >> vr.F_EVENT_IDX & 1 else 0)
                    | (lib.IFC_DP_F_INDIRECT if features >> vr.F_INDIRECT_DESC & 1 else 0)
                    | (lib.IFC_DP_F_MRG if features >> vr.F_NET_MRG_RXBUF & 1 else 0))
        cq.hdr_len = header_length(features)
        cq.max_frame = self.dp.max_frame
        cq.min_frame = ETH_HLEN
        cq.mps, cq.mrrs, cq.cpl_unit = cfg.pcie_mps, cfg.pcie_mrrs, self.dp.link.cpl_unit
        cq.last_avail, cq.last_used = q.last_avail & 0xFFFF, q.last_used & 0xFFFF
        self._bound = -1
        self._free = []
        self._allocate()
        self.world.record(self.source, "engine_start", kind=self.kind, size=q.size,
                          hdr=cq.hdr_len, flags=cq.flags, last_avail=cq.last_avail,
                          last_used=cq.last_used)
        if not self.fn.bus_master:
            self._block()
            return
        if not self._bind():
            return
        self._notify_on = True
        lib.ifc_dp_notify_enable(cq)
        self._on_start()

    def kick(self) -> None:
        self.kicks += 1
        if not self.running or self.broken:
            return
        self._blocked = False
        self._on_kick()

    def stop(self, done: Callable[[], None]) -> None:
        reset = not self.queue.stopping
        self.running = False
        self._token += 1
        self._scheduled = False
        self._qepoch = self.queue.epoch
        self._on_stop()
        if self._pending and reset:
            self._abort("reset")
        if not self._pending:
            self.world.record(self.source, "engine_stopped", last_avail=self.cq.last_avail,
                              last_used=self.cq.last_used, reset=reset)
            done()
            return
        self._done_cb = done

    # --- plumbing -------------------------------------------------------------------
    def _allocate(self) -> None:
        pass

    def _on_start(self) -> None:
        pass

    def _on_kick(self) -> None:
        pass

    def _on_stop(self) -> None:
        pass

    def _bind(self) -> bool:
        """(Re)translate the rings when the IOMMU changed; False (and a fault) if they are gone."""
        domain = self._domain
        if domain is not None:
            # Nothing mapped or unmapped since the table was built and bound:
            # what refresh_mem() would find, without the calls (every round asks).
            bound = self._bound
            if domain.generation == bound and self.dp.mem.generation == bound:
                return True
        generation = self.dp.refresh_mem()
        if generation == self._bound:
            return True
        cq = self.cq
        cq.mem = self.dp.mem.mem
        if lib.ifc_dp_vq_bind(cq) != lib.IFC_OK:
            self._fault()
            return False
        self._bound = generation
        return True

    def _block(self) -> None:
        if not self._blocked:
            self._blocked = True
            self.world.record(self.source, "dma_blocked", reason="bus mastering is off")

    def _may_fetch(self) -> bool:
        """Checks at the start of every round."""
        if not self.running or self.broken:
            return False
        if self.fn.needs_reset:
            if not self._halted:
                self._halted = True
                self.world.record(self.source, "engine_halted", reason="device needs reset")
            return False
        if not self.dp.bus_master:           # = fn.bus_master (see Datapath)
            self._block()
            return False
        return self._bind()

    def _schedule(self, cycle: int) -> None:
        self._scheduled = True
        token = self._token
        self.world.call_with(cycle, self._wake, token)

    def _wake(self, token: int) -> None:
        if token != self._token:
            return
        self._scheduled = False
        # _may_fetch()'s answer when all is well, inline (every round asks)
        domain, bound = self._domain, self._bound
        if (self.running and not self.broken and self.dp.bus_master and domain is not None
                and domain.generation == bound and self.dp.mem.generation == bound
                and not self.fn.needs_reset):
            self._round()
        elif self._may_fetch():
            self._round()

    def _round(self) -> None:
        raise NotImplementedError

    def _slot(self, now: int, gap: int = 1) -> int:
        """Earliest start of another round by the fetch-depth rule (``gap`` after now)."""
        fetching = self._fetching
        if len(fetching) == self.depth:
            return max(now + gap, fetching[0])
        return now + gap

    def _complete_later(self, cycle: int, ids, lens, n: int) -> None:
        """Publish ``n`` used entries (C arrays ``ids``, ``lens``) at ``cycle``."""
        self._pending.append((ids, lens, n))
        self._in_flight += n
        epoch = self._epoch
        self.world.call_with(cycle, self._complete, epoch)

    def _complete(self, epoch: int) -> None:
        if epoch != self._epoch or not self._pending:
            return
        if self.queue.epoch != self._qepoch:
            self._abort("reset")
            return
        ids, lens, n = self._pending.popleft()
        self._in_flight -= n
        if not self._bind():     # the used ring was unmapped meanwhile: nothing is written
            self._abort("rings unmapped")
            return
        cq = self.cq
        need = lib.ifc_dp_publish(cq, ids, lens, n)
        self._free.append((ids, lens))
        self.queue.last_used = cq.last_used
        if need > 0:
            self.interrupts += 1
            self.fn.raise_queue_interrupt(self.qid)
        if not self._pending and self._done_cb is not None:
            done, self._done_cb = self._done_cb, None
            self.world.record(self.source, "engine_stopped", last_avail=self.cq.last_avail,
                              last_used=self.cq.last_used, reset=False)
            done()

    def _abort(self, why: str) -> None:
        """Drop every round in flight: nothing more is written to the rings."""
        self.world.record(self.source, "engine_abort", why=why, rounds=len(self._pending),
                          entries=self._in_flight)
        self._pending.clear()
        self._in_flight = 0
        self._epoch += 1
        if self._done_cb is not None:
            done, self._done_cb = self._done_cb, None
            done()

    def _go_idle(self) -> bool:
        """Ask for kicks and re-check; True when the ring has work after all."""
        self.idles += 1
        self._notify_on = True
        if lib.ifc_dp_notify_enable(self.cq) == 1:
            return True
        return False

    def _busy(self) -> None:
        if self._notify_on:
            self._notify_on = False
            lib.ifc_dp_notify_disable(self.cq)

    def _fault(self) -> None:
        cq = self.cq
        code = cq.error
        text = _text(code)
        where = f"avail idx {cq.err_idx}"
        if code >= lib.IFC_DP_E_HEAD_ID:
            where += f", head {cq.err_head}, desc {cq.err_desc}"
            if cq.err_indirect:
                where += " of its indirect table"
        detail = f"value {cq.err_value:#x}"
        if cq.err_iova or code in (lib.IFC_DP_E_BUF_ADDR, lib.IFC_DP_E_INDIRECT_ADDR):
            detail += f", unmapped at {cq.err_iova:#x} (len {cq.err_len:#x})"
        reason = f"vq {self.qid} ({self.kind}): {text} ({where}; {detail})"
        self.broken = reason
        self.world.record(self.source, "engine_fault", code=code, idx=cq.err_idx,
                          head=cq.err_head, desc=cq.err_desc, indirect=cq.err_indirect,
                          value=cq.err_value, iova=cq.err_iova)
        if code in _MEMORY_ERRORS or code == lib.IFC_DP_E_BUF_ADDR:
            direction = _MEMORY_ERRORS.get(code, "write" if self.write else "read")
            self.fn.iommu.record_fault(cq.err_iova, cq.err_len, direction, reason)
        self.fn.mark_needs_reset(reason)

    def counters(self) -> dict:
        return {"kind": self.kind, "rounds": self.rounds, "chains": self.chains,
                "frames": self.frames, "bytes": self.bytes, "dropped": self.dropped,
                "interrupts": self.interrupts, "kicks": self.kicks, "idles": self.idles,
                "last_avail": self.cq.last_avail, "last_used": self.cq.last_used,
                "broken": self.broken}


class TxEngine(_Engine):
    """Guest -> wire: fetch TX chains, send their frames on the VF's port."""

    kind = "tx"
    write = False

    def _allocate(self) -> None:
        n = self.batch
        self._out_cap = n * self.dp.max_frame
        # Frames are copied out of guest memory straight into the memory of
        # the batch that goes on the wire (reused once the receiver drops it).
        self._outs = BufferPool(self._out_cap)
        # Taken from the pool and not handed out yet (a round without frames
        # keeps it for the next); only this engine takes from its pool.
        self._out = None
        self._lens = ffi.new("uint32_t[]", n)
        self._cum = ffi.new("uint64_t[]", n)
        self._ready = ffi.new("int64_t[]", n)
        self._zero_lens = ffi.new("uint32_t[]", n)   # TX used entries have len 0
        self.runts = 0
        self.oversize = 0

    def _on_start(self) -> None:
        # Look at the ring without waiting for a kick: after a migration the
        # guest may have posted before this queue started.  Only when the
        # rings agree with the restored state, though: a used->idx in memory
        # other than last_used means these are not (yet) the rings this
        # state belongs to (a driver restoring indexes before the guest's
        # rings exist); then the engine waits for a doorbell.
        used_idx = lib.ifc_dp_ring_idx(self.cq, 1)
        if used_idx != self.cq.last_used:
            self.world.record(self.source, "engine_waits_for_kick", used_idx=used_idx,
                              last_used=self.cq.last_used)
            return
        self._schedule(self.env.now + self.dp.kick_to_fetch)

    def _on_kick(self) -> None:
        if not self._scheduled:
            self._schedule(max(self.env.now + self.dp.kick_to_fetch, self._slot(self.env.now)))

    def _round(self) -> None:
        now = self.env._now
        cq, r, dp, t = self.cq, self.round, self.dp, self.times
        if self._notify_on:
            self._busy()
        free = self._free
        ids = free.pop()[0] if free else ffi.new("uint32_t[]", self.batch)
        out = self._out
        if out is None:
            out = self._out = self._outs.take()
        out, out_p = out
        n = lib.ifc_dp_tx_round(cq, self._link_c, now, self.batch, out_p, self._out_cap,
                                self._lens, ids, self._cum, self._ready, self._in_flight, r, t)
        self.queue.last_avail = cq.last_avail
        self.rounds += 1
        if n < 0:
            n = 0
        self._fetching.append(t.fetched)
        wire_done = now
        if n:
            frames = r.frames
            if frames:
                lengths = array("I")
                lengths.frombytes(ffi.buffer(self._lens, 4 * frames))
                out_bytes = r.out_bytes
                batch = FrameBatch(memoryview(out)[:out_bytes], lengths, _ZERO_TIME * frames)
                self._out = None          # the batch has it now
                if dp.steering is not None:
                    dp.steering.learn(self.qid // 2, batch)
                wire_done = dp.port.transmit(batch, now, ready=self._ready)
                self.frames += frames
                self.bytes += out_bytes
            visible = t.visible
            self._complete_later(visible, ids, self._zero_lens, n)
            self.chains += n
            if r.dropped:
                self.dropped += r.dropped
                self.runts += r.runts
                self.oversize += r.oversize
                self.world.record(self.source, "tx_dropped", runts=r.runts, oversize=r.oversize)
            # = world.record(source, "tx_round", chains=n, frames=frames, done=visible)
            self._trace.add(f"{now} {self.source} tx_round chains={n} done={visible} "
                            f"frames={frames}\n", "tx_round")
        else:
            free.append((ids, None))
        if cq.error:
            self._fault()
            return
        if n == self.batch:
            start = max(self._slot(now), wire_done - dp.tx_drain)
            self._schedule(start)
        elif self._go_idle():
            self._schedule(self._slot(now))

    def drops(self) -> dict[str, int]:
        """Dropped frames by reason (they add up to ``dropped``): chains shorter than the
        header plus a minimal frame, and frames longer than the MTU allows."""
        return {"runt": getattr(self, "runts", 0), "oversize": getattr(self, "oversize", 0)}

    def counters(self) -> dict:
        c = super().counters()
        c.update(runts=getattr(self, "runts", 0), oversize=getattr(self, "oversize", 0),
                 drops=self.drops())
        return c


class RxEngine(_Engine):
    """Wire -> guest: place received frames into the RX buffers the driver posted."""

    kind = "rx"
    write = True

    def __init__(self, dp: Datapath, queue: QueueState):
        super().__init__(dp, queue)
        # Frames waiting for buffers: the segments (where each batch's next
        # frame is, how many are left) in C, ``struct ifc_dp_fifo``; the
        # batches they point into in ``_fifo``, in the same order.
        self._fifo: deque = deque()
        self._cfifo = ffi.new("struct ifc_dp_fifo *")
        self._cfifo_segs = ffi.new("struct ifc_dp_fifo_seg[]", 16)
        self._cfifo.segs, self._cfifo.cap = self._cfifo_segs, 16
        self._fifo_bytes = 0
        self._fifo_cap = dp.config.rx_fifo_bytes
        self._fit_bytes = ffi.new("uint64_t *")
        self._starved = False
        self.fifo_drops = 0
        self.not_running_drops = 0
        self.stop_drops = 0
        self.too_big = 0
        self.oversize = 0
        self.starvations = 0

    def _allocate(self) -> None:
        self._ids_cap = self.queue.size
        self._starved = False

    def _on_start(self) -> None:
        if self._fifo:
            self._schedule(self.env.now)

    def _on_kick(self) -> None:
        self._starved = False
        if self._fifo and not self._scheduled:
            self._schedule(max(self.env.now + self.dp.kick_to_fetch, self._slot(self.env.now)))

    def _on_stop(self) -> None:
        self._drop_fifo("stopped")

    def _grow_fifo(self) -> None:
        cap = 2 * self._cfifo.cap
        segs = ffi.new("struct ifc_dp_fifo_seg[]", cap)
        lib.ifc_dp_fifo_move(self._cfifo, segs, cap)
        self._cfifo_segs = segs

    def _drop_fifo(self, why: str) -> None:
        if not self._fifo:
            return
        frames = self._cfifo.frames
        self.stop_drops += frames
        self.dropped += frames
        self.world.record(self.source, "rx_fifo_flushed", why=why, frames=frames)
        self._fifo.clear()
        self._fifo_bytes = 0
        cf = self._cfifo
        cf.head = cf.n = cf.frames = cf.bytes = 0

    def receive(self, batch: FrameBatch) -> None:
        blengths = batch.lengths
        n = len(blengths)
        if not n:
            return
        if not self.running or self.broken or self.fn.needs_reset:
            self.not_running_drops += n
            self.dropped += n
            self.world.record(self.source, "rx_dropped", frames=n, why="queue not running")
            return
        nbytes = len(batch.data)
        room = self._fifo_cap - self._fifo_bytes
        count = n
        lengths = None
        if nbytes > room:
            # The frames that fit, in order (C: a 512-frame burst would be a long loop).
            if blengths[0] > room:
                count = nbytes = 0            # not even the first (a full FIFO)
            else:
                lengths = ffi.from_buffer(U32S, blengths)
                count = lib.ifc_frames_fit(lengths, n, room, self._fit_bytes)
                nbytes = self._fit_bytes[0]
            self.fifo_drops += n - count
            self.dropped += n - count
            # = world.record(source, "rx_dropped", frames=n - count, why="fifo full")
            self._trace.add(f"{self.env._now} {self.source} rx_dropped frames={n - count} "
                            "why=fifo_full\n", "rx_dropped")
            if not count:
                return
        if lengths is None:
            lengths = ffi.from_buffer(U32S, blengths)
        view = batch.data
        data = ffi.from_buffer(U8S, view)
        if type(view) is memoryview:
            # A view pins the memory it shows (its own export of it), so the
            # FIFO keeps the view and a plain pointer, not an export of the
            # view: an exported view cannot be cleared by the garbage collector.
            pointer = ffi.cast("uint8_t *", data)
            ffi.release(data)
            data = pointer
        if _fifo_push(self._cfifo, data, lengths, count, nbytes) < 0:
            self._grow_fifo()
            _fifo_push(self._cfifo, data, lengths, count, nbytes)
        self._fifo.append((batch, data, lengths))     # alive while C points into them
        self._fifo_bytes += nbytes
        if not self._scheduled and not self._starved:
            now = self.env.now
            start = self._slot(now, 0)
            if start == now:          # a free fetch slot: the round starts in this event
                self._wake(self._token)
            else:
                self._schedule(start)

    def _round(self) -> None:
        fifo = self._fifo
        if not fifo:
            return
        now = self.env._now
        cq, r, dp, t = self.cq, self.round, self.dp, self.times
        log = dp.log_for_round()
        free = self._free
        cap = self._ids_cap
        if free:
            ids, lens = free.pop()
        else:
            ids, lens = ffi.new("uint32_t[]", cap), ffi.new("uint32_t[]", cap)
        # The fills over the FIFO's batches and the round's PCIe timing, in one
        # C call (csrc/sim/simdp.c); it says how many batches it used up.
        popped = _rx_round(cq, self._link_c, now, self._cfifo, self.batch, ids, lens, cap, log,
                           self._in_flight, r, t)
        for _ in range(popped):
            fifo.popleft()
        self._fifo_bytes -= r.in_bytes
        used = r.chains
        self.queue.last_avail = cq.last_avail
        if log != ffi.NULL:
            dp.after_log(self.qid)
        self.rounds += 1
        self._fetching.append(t.fetched)
        if used:
            visible = t.visible
            self._complete_later(visible, ids, lens, used)
            self.chains += used
            frames = r.frames
            self.frames += frames
            self.bytes += r.frame_bytes
            # = world.record(source, "rx_round", chains=used, frames=frames, done=visible)
            self._trace.add(f"{now} {self.source} rx_round chains={used} done={visible} "
                            f"frames={frames}\n", "rx_round")
        else:
            free.append((ids, lens))
        if r.dropped:
            self.dropped += r.dropped
            self.too_big += r.too_big
            self.oversize += r.oversize
            self.world.record(self.source, "rx_dropped", frames=r.dropped, too_big=r.too_big,
                              oversize=r.oversize)
        if cq.error:
            self._fault()
            return
        if r.starved:
            if self._go_idle():
                self._schedule(self._slot(now))
            else:
                self._starved = True
                self.starvations += 1
                waiting = self._cfifo.frames
                # = world.record(source, "rx_starved", waiting=waiting)
                self._trace.add(f"{now} {self.source} rx_starved waiting={waiting}\n",
                                "rx_starved")
            return
        if used and self._notify_on:
            self._busy()
        if fifo:
            self._schedule(self._slot(now))

    def drops(self) -> dict[str, int]:
        """Dropped frames by reason (they add up to ``dropped``): no room in the RX FIFO;
        arrived while the queue did not run; waiting in the FIFO when the queue stopped;
        bigger than the buffer chain without MRG_RXBUF; longer than the MTU allows."""
        return {"fifo_full": self.fifo_drops, "not_running": self.not_running_drops,
                "flushed_at_stop": self.stop_drops, "too_big": self.too_big,
                "oversize": self.oversize}

    def counters(self) -> dict:
        c = super().counters()
        c.update(drops=self.drops(), fifo_drops=self.fifo_drops, not_running_drops=self.not_running_drops,
                 stop_drops=self.stop_drops, too_big=self.too_big, oversize=self.oversize,
                 starvations=self.starvations, fifo_frames=self._cfifo.frames)
        return c


__all__ = ["Datapath", "TxEngine", "RxEngine", "header_length"]
