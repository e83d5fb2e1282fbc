"""The SW-assisted live-migration relay: Python face of csrc/driver/relay.c and csrc/driver/notify.c.

* ``MemoryTable``: guest memory as C sees it (up to 8 GPA regions with host addresses).
* ``MediatedRing``: a driver-owned split ring in host memory (the device's used ring
  during SW-assisted migration).
* ``RelayQueue``: one queue's used-ring relay (mediated -> guest used ring, dirty
  logging of every device-writable buffer).  ``relay()`` is one C call per wake-up.
* ``NotifyRelay``: the kick/interrupt loop (a ``hal.api.Poller``): ``run()`` blocks in C
  with the GIL released (VFIO backend, on a thread), ``step()`` polls once (simulator).

The exact relay semantics (checks, order, what an error leaves untouched) are in the
comment above ``ifc_relay_used`` in csrc/driver/ifcvf_native.h; tests/relay_oracle.py restates
them in Python and the property tests keep the two equal.

Lifetimes: C keeps raw pointers into the memory table copy, the scratch array, the log,
the mediated ring and every RelayQueue a NotifyRelay drives.  The objects here hold
references to all of them; keep a RelayQueue / NotifyRelay alive while C may use it, and
close the NotifyRelay (which stops its loop) before dropping the memory it points into.
"""
from __future__ import annotations

import os
import logging
import struct
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

from hal.memory import PAGE_SIZE, HostMemory, align_up
from ifcvf._native import ffi, lib
from ifcvf.dirtylog import DirtyLog
from ifcvf.vring import split_ring_layout, used_elem_offset

log = logging.getLogger("ifcvf.relay")

MAX_REGIONS = lib.IFC_MEM_MAX_REGIONS
MAX_RING_SIZE = lib.IFC_VRING_MAX_SIZE
DESC_F_NEXT = lib.IFC_VRING_DESC_F_NEXT
DESC_F_WRITE = lib.IFC_VRING_DESC_F_WRITE
DESC_F_INDIRECT = lib.IFC_VRING_DESC_F_INDIRECT
AVAIL_F_NO_INTERRUPT = lib.IFC_VRING_AVAIL_F_NO_INTERRUPT
#: Default scratch capacity: writable descriptors per call, per ring slot.
CAPACITY_PER_SLOT = 4

ERROR_NAMES = {
    lib.IFC_ERR_RANGE: "RANGE", lib.IFC_ERR_ARG: "ARG", lib.IFC_ERR_RING: "RING",
    lib.IFC_ERR_MEM: "MEM", lib.IFC_ERR_SYS: "SYS", lib.IFC_ERR_BUSY: "BUSY",
}
REASON_NAMES = {
    getattr(lib, name): name[len("IFC_RELAY_E_"):]
    for name in dir(lib) if name.startswith("IFC_RELAY_E_") and name != "IFC_RELAY_E_COUNT"
}


def reason_text(reason: int) -> str:
    return ffi.string(lib.ifc_relay_reason_text(reason)).decode()


class RelayError(ValueError):
    """A relay or set-up call refused its input; nothing was written.

    ``code`` is the negative C code (IFC_ERR_RING/MEM/RANGE/ARG), ``reason`` an
    IFC_RELAY_E_* value (``reason_name`` / ``reason_text`` say it in words),
    ``used_idx`` the free-running used index of the failing entry, ``desc`` the
    descriptor index in its table (``indirect``: in an indirect table), ``value``
    the offending value and ``length`` the descriptor or range length.
    """

    def __init__(self, code: int, reason: int, used_idx: int = 0, desc: int = 0,
                 indirect: bool = False, value: int = 0, length: int = 0):
        self.code = code
        self.reason = reason
        self.used_idx = used_idx
        self.desc = desc
        self.indirect = indirect
        self.value = value
        self.length = length
        super().__init__(self._describe())

    @property
    def reason_name(self) -> str:
        return REASON_NAMES.get(self.reason, str(self.reason))

    @property
    def reason_text(self) -> str:
        return reason_text(self.reason)

    @classmethod
    def from_result(cls, res) -> "RelayError":
        return cls(res.rc, res.reason, res.err_idx, res.err_desc, bool(res.err_indirect),
                   res.err_value, res.err_len)

    def _describe(self) -> str:
        where = ""
        if self.reason in _ENTRY_REASONS:
            table = "indirect table" if self.indirect else "ring"
            where = f" (used entry {self.used_idx}, {table} descriptor {self.desc})"
        return (f"{ERROR_NAMES.get(self.code, self.code)}/{self.reason_name}: {self.reason_text}"
                f"{where}: value {self.value:#x}, length {self.length:#x}")

    def __reduce__(self):
        return (RelayError, (self.code, self.reason, self.used_idx, self.desc, self.indirect,
                             self.value, self.length))


_ENTRY_REASONS = {
    lib.IFC_RELAY_E_DESC_ID, lib.IFC_RELAY_E_NEXT, lib.IFC_RELAY_E_LOOP,
    lib.IFC_RELAY_E_INDIRECT_NEXT, lib.IFC_RELAY_E_INDIRECT_NESTED, lib.IFC_RELAY_E_INDIRECT_POS,
    lib.IFC_RELAY_E_INDIRECT_LEN, lib.IFC_RELAY_E_INDIRECT_ADDR, lib.IFC_RELAY_E_BUF_ADDR,
    lib.IFC_RELAY_E_BUF_LOG,
}


class MemoryTable:
    """Guest memory for C: (gpa, size, host_address) regions, checked here and in C.

    A guest range is valid when it lies inside one region.  Regions must be
    non-empty, must not wrap 2**64 and must not overlap in GPA space.
    """

    def __init__(self, regions: Iterable[tuple[int, int, int]]):
        self.regions = [tuple(int(v) for v in r) for r in regions]
        if len(self.regions) > MAX_REGIONS:
            raise ValueError(f"{len(self.regions)} memory regions; at most {MAX_REGIONS}")
        for i, (gpa, size, hva) in enumerate(self.regions):
            if not (0 <= gpa < 1 << 64 and 0 < size and gpa + size <= 1 << 64):
                raise ValueError(f"region {i}: gpa {gpa:#x} size {size:#x} is not a 64-bit range")
            if not (0 < hva and hva + size <= 1 << 64):
                raise ValueError(f"region {i}: host address {hva:#x} size {size:#x} is invalid")
            for j, (ogpa, osize, _) in enumerate(self.regions[:i]):
                if gpa < ogpa + osize and ogpa < gpa + size:
                    raise ValueError(f"region {i} [{gpa:#x}, {gpa + size:#x}) overlaps region {j}")
        self.cdata = ffi.new("struct ifc_mem_table *")
        self.cdata.nregions = len(self.regions)
        for i, (gpa, size, hva) in enumerate(self.regions):
            self.cdata.regions[i].gpa = gpa
            self.cdata.regions[i].size = size
            self.cdata.regions[i].hva = hva
        if lib.ifc_mem_table_check(self.cdata) != lib.IFC_OK:  # the C rules are the law
            raise ValueError("memory table refused by ifc_mem_table_check")

    def translate(self, gpa: int, length: int) -> int | None:
        """Host address of [gpa, gpa+length) if it lies inside one region."""
        for rgpa, size, hva in self.regions:
            if length > 0 and rgpa <= gpa and gpa + length <= rgpa + size:
                return hva + gpa - rgpa
        return None


class MediatedRing:
    """A driver-owned split ring in memfd memory (page aligned, DMA-mappable).

    During SW-assisted migration the device writes used elements here; only the
    used ring and the avail ring's trailing used_event are used.
    """

    def __init__(self, size: int, *, align: int = PAGE_SIZE, name: str = "ifcvf-mediated"):
        if size <= 0 or size > MAX_RING_SIZE or size & (size - 1):
            raise ValueError(f"ring size {size} is not a power of two in 1..{MAX_RING_SIZE}")
        self.size = size
        _, self.avail_offset, self.used_offset, end = split_ring_layout(0, size, align)
        self.nbytes = align_up(end, PAGE_SIZE)
        self.memory = HostMemory(self.nbytes, name)
        self.address = self.memory.address
        self.desc_address = self.address
        self.avail_address = self.address + self.avail_offset
        self.used_address = self.address + self.used_offset

    def _u16(self, offset: int, value: int | None = None) -> int:
        # One 16-bit load or store through cffi: struct.pack_into zeroes its target
        # before writing it, so a concurrent reader (the relay thread, the device)
        # could see a transient 0 index.
        cell = ffi.cast("uint16_t *", self.address + offset)
        if value is None:
            return cell[0]
        cell[0] = value & 0xFFFF
        return value

    @property
    def used_idx(self) -> int:
        return self._u16(self.used_offset + 2)

    @used_idx.setter
    def used_idx(self, value: int) -> None:
        self._u16(self.used_offset + 2, value)

    @property
    def avail_idx(self) -> int:
        return self._u16(self.avail_offset + 2)

    @avail_idx.setter
    def avail_idx(self, value: int) -> None:
        self._u16(self.avail_offset + 2, value)

    @property
    def used_event(self) -> int:
        """The avail ring's trailing u16: the device interrupts once used->idx passes it."""
        return self._u16(self.avail_offset + 4 + 2 * self.size)

    def put_used(self, idx: int, desc_id: int, length: int) -> None:
        """Write used element ``idx`` (free-running) as a device would; the index is not moved."""
        struct.pack_into("<II", self.memory.view, self.used_offset + used_elem_offset(idx % self.size),
                         desc_id, length)

    def close(self) -> None:
        self.memory.close()


class RelayBatch(NamedTuple):
    count: int        # entries relayed
    signal: bool      # the guest asked for an interrupt
    more: bool        # entries remain: call again
    old_idx: int
    new_idx: int


def _log_pointer(log) -> tuple[object, int, object]:
    """(uint8_t * cdata, size, keep-alive) for a DirtyLog or a writable buffer; NULL for None.

    The pointer is taken through a temporary ``ffi.from_buffer`` and the memory is
    kept valid by holding a memoryview (an export on the underlying object), not a
    long-lived from_buffer object: CPython 3.11 can crash when the cyclic garbage
    collector clears a memoryview that a from_buffer object still exports.
    """
    if log is None:
        return ffi.NULL, 0, None
    # A view of our own (an export of its own), so DirtyLog.release() or closing
    # the log's mmap cannot free the memory while C may still write to it.
    view = memoryview(log._view if isinstance(log, DirtyLog) else log).cast("B")
    if view.readonly:
        raise ValueError("the dirty log must be writable")
    tmp = ffi.from_buffer("uint8_t[]", view, require_writable=True)
    ptr = ffi.cast("uint8_t *", tmp)
    del tmp
    return ptr, len(view), (log, view)


class RelayQueue:
    """The used-ring relay of one queue (``ifc_relay_queue``).

    Ring addresses are guest-physical and translated through ``memory`` now;
    ``mediated`` is a MediatedRing or any object with host ``avail_address`` and
    ``used_address``.  ``last_idx`` is the first used index to relay (the vring
    base).  ``log`` is a DirtyLog, a writable buffer or None (no logging);
    ``log_used_gpa`` turns on logging of the guest used ring at that log address.
    ``capacity``: writable descriptors per call (default 4 per ring slot).
    Raises RelayError when the set-up is refused.
    """

    def __init__(self, memory: MemoryTable, size: int, desc_gpa: int, avail_gpa: int,
                 used_gpa: int, mediated, *, last_idx: int = 0, event_idx: bool = False,
                 log=None, log_used_gpa: int | None = None, capacity: int | None = None):
        capacity = CAPACITY_PER_SLOT * size if capacity is None else capacity
        if not 0 <= capacity < 1 << 32:
            raise ValueError(f"capacity {capacity} is not a 32-bit count")
        self.memory = memory
        self.mediated = mediated
        self.size = size
        self.event_idx = event_idx
        self.broken: RelayError | None = None
        self._scratch = ffi.new("struct ifc_relay_range[]", max(capacity, 1))
        log_ptr, log_size, self._log = _log_pointer(log)
        self._res = ffi.new("struct ifc_relay_result *")
        cfg = ffi.new("struct ifc_relay_config *")
        cfg.size = size if 0 <= size < 1 << 32 else 0
        cfg.flags = ((lib.IFC_RELAY_F_EVENT_IDX if event_idx else 0)
                     | (lib.IFC_RELAY_F_LOG_USED if log_used_gpa is not None else 0))
        cfg.desc_gpa, cfg.avail_gpa, cfg.used_gpa = desc_gpa, avail_gpa, used_gpa
        cfg.used_log_gpa = log_used_gpa or 0
        cfg.m_avail, cfg.m_used = mediated.avail_address, mediated.used_address
        cfg.log, cfg.log_size = log_ptr, log_size
        cfg.scratch, cfg.capacity = self._scratch, capacity
        cfg.last_idx = last_idx & 0xFFFF
        self.cdata = ffi.new("struct ifc_relay_queue *")
        if lib.ifc_relay_queue_init(self.cdata, cfg, memory.cdata, self._res) != lib.IFC_OK:
            raise RelayError.from_result(self._res)
        self._relay = lib.ifc_relay_used

    @property
    def last_idx(self) -> int:
        """The next used index to relay (= the guest used->idx last published)."""
        return self.cdata.last

    @property
    def relayed(self) -> int:
        return self.cdata.relayed

    @property
    def pages_logged(self) -> int:
        """Buffer pages marked in the dirty log, all calls (a page per buffer range)."""
        return self.cdata.pages_logged

    def relay(self, max_entries: int = 0) -> RelayBatch:
        """One C call: relay up to max_entries (0: all pending).  RelayError marks the queue broken.

        One Python thread at a time per RelayQueue (the result buffer is shared);
        C serialises this against a NotifyRelay driving the same queue."""
        if self.broken is not None:
            raise self.broken
        res = self._res
        rc = self._relay(self.cdata, max_entries, res)
        if rc < 0:
            self.broken = RelayError.from_result(res)
            raise self.broken
        return RelayBatch(rc, bool(res.signal), bool(res.more), res.old_idx, res.new_idx)

    def relay_all(self, max_calls: int = 64) -> RelayBatch:
        """Call relay() while it reports more (bounded); the summed batch."""
        first = self.relay()
        count, signal, more = first.count, first.signal, first.more
        new_idx = first.new_idx
        for _ in range(max_calls - 1):
            if not more:
                break
            batch = self.relay()
            count += batch.count
            signal |= batch.signal
            more, new_idx = batch.more, batch.new_idx
        return RelayBatch(count, signal, more, first.old_idx, new_idx)

    def set_log(self, log, log_used_gpa: int | None = None) -> None:
        """Swap the dirty log (None stops logging); refused (RelayError) if the used ring's
        log range does not fit the new log, in which case the old log stays."""
        ptr, size, keep = _log_pointer(log)
        rc = lib.ifc_relay_queue_set_log(self.cdata, ptr, size, int(log_used_gpa is not None),
                                         log_used_gpa or 0, self._res)
        if rc != lib.IFC_OK:
            raise RelayError.from_result(self._res)
        self._log = keep  # keep the new buffer alive, drop the old

    def close(self) -> None:
        """Make the C queue refuse further calls and drop the buffers it pointed into
        (so a log or guest mmap can be closed).  No NotifyRelay may still use it."""
        self.cdata.ready = 0
        self._log = self._scratch = None
        self.cdata.cfg.log = ffi.NULL
        self.cdata.cfg.scratch = ffi.NULL


@dataclass
class NotifyQueue:
    """What the notify relay does for one queue index.

    ``doorbell``: the host address of the queue's 16-bit notify register (VFIO
    BAR mmap), or a callable(qid) that rings it (the simulator; step() only).
    ``relay`` with ``intr_fd``: the device's interrupt eventfd for this queue is
    relayed (used entries copied, then ``call_fd`` written if the guest asked).
    """

    qid: int
    kick_fd: int | None = None
    doorbell: int | Callable[[int], None] | None = None
    relay: RelayQueue | None = None
    intr_fd: int | None = None
    call_fd: int | None = None


@dataclass(frozen=True)
class QueueStats:
    kicks: int
    interrupts: int
    relayed: int
    signals: int
    polls: int        # relays without an interrupt (adaptive polls)
    relay_kicks: int  # doorbells rung for the guest (it published past a stale avail_event)
    broken: RelayError | None


class Relayed(NamedTuple):
    entries: int
    signalled: list[int]   # eventfds written (guest call fds, re-armed interrupt fds)


class NotifyRelay:
    """Kick and interrupt relay over one epoll set, in C (a hal.api.Poller).

    ``start()``/``stop()`` run the loop on a thread of its own; ``run()`` blocks
    the caller instead (for a HAL that owns the thread); ``step()`` handles what
    is pending without blocking and returns the eventfds it wrote.
    """

    EVENTS = 64 * lib.IFC_NOTIFY_EVENTS_PER_FD

    def __init__(self, name: str, queues: Sequence[NotifyQueue], *, poll_min_ns: int = 0,
                 poll_max_ns: int = 0):
        self.name = name
        #: Adaptive polls of the relayed queues (see ifc_notify_set_poll): a device
        #: completes entries without interrupting whenever the guest's used_event
        #: is behind it, so the relay cannot wait for interrupts alone.
        if not 0 <= poll_min_ns <= max(poll_max_ns, poll_min_ns) < 1 << 32:
            raise ValueError(f"poll periods {poll_min_ns}..{poll_max_ns} ns are not 32-bit")
        self.poll_min_ns = poll_min_ns
        self.poll_max_ns = max(poll_max_ns, poll_min_ns)
        self.specs = {q.qid: q for q in queues}
        if len(self.specs) != len(queues):
            raise ValueError("two NotifyQueue entries share a queue index")
        count = max(self.specs, default=-1) + 1
        if count > lib.IFC_NOTIFY_MAX_QUEUES or any(q < 0 for q in self.specs):
            raise ValueError(f"queue indexes must lie in 0..{lib.IFC_NOTIFY_MAX_QUEUES - 1}")
        self._queues = ffi.new("struct ifc_notify_queue[]", max(count, 1))
        self._forward: dict[int, Callable[[int], None]] = {}
        for i in range(count):
            cq = self._queues[i]
            cq.kick_fd = cq.intr_fd = cq.call_fd = -1
            spec = self.specs.get(i)
            if spec is None:
                continue
            if spec.kick_fd is not None:
                if spec.doorbell is None:
                    raise ValueError(f"queue {i}: a kick fd needs a doorbell")
                cq.kick_fd = spec.kick_fd
            if callable(spec.doorbell):
                self._forward[i] = spec.doorbell
            elif spec.doorbell is not None:
                cq.doorbell = spec.doorbell
            if spec.intr_fd is not None:
                if spec.relay is None:
                    raise ValueError(f"queue {i}: an interrupt fd needs a RelayQueue")
                cq.intr_fd = spec.intr_fd
            if spec.relay is not None:
                cq.relay = spec.relay.cdata
            cq.call_fd = -1 if spec.call_fd is None else spec.call_fd
        self._ctx = ffi.new("struct ifc_notify_ctx *")
        rc = lib.ifc_notify_init(self._ctx, self._queues, count)
        if rc != lib.IFC_OK:
            raise OSError(self._ctx.sys_errno, f"notify relay {name}: ifc_notify_init failed "
                          f"({ERROR_NAMES.get(rc, rc)})")
        if poll_min_ns and any(q.relay is not None for q in queues):
            rc = lib.ifc_notify_set_poll(self._ctx, self.poll_min_ns, self.poll_max_ns)
            if rc != lib.IFC_OK:
                lib.ifc_notify_close(self._ctx)
                raise OSError(self._ctx.sys_errno, f"notify relay {name}: no poll timer "
                              f"({ERROR_NAMES.get(rc, rc)})")
        self._events = ffi.new("struct ifc_notify_event[]", self.EVENTS)
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._errors: dict[int, RelayError] = {}
        self.closed = False

    # --- the Poller protocol --------------------------------------------------
    def fds(self) -> list[int]:
        fds = []
        for spec in self.specs.values():
            fds += [fd for fd in (spec.kick_fd, spec.intr_fd) if fd is not None]
        return fds

    def step(self) -> list[int]:
        """Poll once (epoll timeout 0): forward kicks with callable doorbells, relay
        interrupts; return the eventfds written (call fds, re-armed interrupt fds)."""
        n = lib.ifc_notify_step(self._ctx, self._events, self.EVENTS)
        if n < 0:
            raise OSError(self._ctx.sys_errno, f"notify relay {self.name}: step failed "
                          f"({ERROR_NAMES.get(n, n)})")
        return self._consume(self._events, n)

    def next_poll_ns(self) -> int:
        """How soon a relayed queue wants polling without an interrupt (0: none).

        The simulator calls poll() that much later in modelled time; run()
        does the same on a timerfd."""
        return lib.ifc_notify_next_poll(self._ctx)

    def poll(self) -> list[int]:
        """Relay every queue that asked for a poll, now; the eventfds written."""
        n = lib.ifc_notify_poll(self._ctx, self._events, self.EVENTS)
        if n < 0:
            raise OSError(self._ctx.sys_errno, f"notify relay {self.name}: poll failed")
        return self._consume(self._events, n)

    def run(self) -> None:
        """Block relaying until stop(); the loop runs in C without the GIL."""
        missing = [q for q, s in self.specs.items() if s.kick_fd is not None and q in self._forward]
        if missing:
            raise ValueError(f"queues {missing} have callable doorbells: only step() can forward them")
        rc = lib.ifc_notify_run(self._ctx)
        if rc != lib.IFC_OK:
            raise OSError(self._ctx.sys_errno, f"notify relay {self.name}: run failed "
                          f"({ERROR_NAMES.get(rc, rc)})")

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the loop to return; if start() made the thread, join it (TimeoutError if it
        does not finish in time).  The loop first handles every fd that was readable
        when it saw the request.  A request made while no loop runs is kept for the
        next run() (start() clears it)."""
        if self.closed:
            return
        lib.ifc_notify_stop(self._ctx)
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                self._thread = thread
                raise TimeoutError(f"notify relay {self.name} did not stop within {timeout} s")
            if self._thread_error is not None:
                err, self._thread_error = self._thread_error, None
                raise err

    # --- thread management ----------------------------------------------------
    def start(self) -> None:
        """Run the loop on a thread of its own."""
        if self._thread is not None:
            raise RuntimeError(f"notify relay {self.name} is already running")
        # A stop() made while nothing ran leaves its request in the stop eventfd
        # (so a stop racing a starting run() is never lost); a fresh start drops it.
        try:
            os.eventfd_read(self._ctx.stop_fd)
        except BlockingIOError:
            pass

        def main() -> None:
            try:
                self.run()
            except BaseException as err:  # reported by stop()
                self._thread_error = err

        self._thread = threading.Thread(target=main, name=f"ifc-noti-{self.name}", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- per-queue ------------------------------------------------------------
    def catch_up(self, qid: int) -> Relayed:
        """Relay queue ``qid`` now (safe while the loop runs); RelayError if it is broken."""
        if qid not in self.specs or self.specs[qid].relay is None:
            raise ValueError(f"queue {qid} is not relayed")
        # Its own event buffer: a catch-up may run while step() or run() does.
        events = ffi.new("struct ifc_notify_event[]", lib.IFC_NOTIFY_EVENTS_PER_FD)
        n = lib.ifc_notify_catch_up(self._ctx, qid, events, lib.IFC_NOTIFY_EVENTS_PER_FD)
        if n < 0:
            raise ValueError(f"ifc_notify_catch_up refused queue {qid} ({ERROR_NAMES.get(n, n)})")
        entries = sum(events[i].count for i in range(n) if events[i].kind == lib.IFC_NOTIFY_EV_RELAY)
        signalled = self._consume(events, n)
        error = self.broken(qid)
        if error is not None:
            raise error
        return Relayed(entries, signalled)

    def broken(self, qid: int) -> RelayError | None:
        """The error that stopped relaying this queue, if any."""
        if qid in self._errors:
            return self._errors[qid]
        cq = self._queues[qid]
        if cq.broken == 0:
            return None
        self._errors[qid] = error = RelayError.from_result(cq.error)
        return error

    def stats(self, qid: int) -> QueueStats:
        cq = self._queues[qid]
        return QueueStats(cq.kicks, cq.interrupts, cq.relayed, cq.signals, cq.polls, cq.relay_kicks,
                          self.broken(qid))

    def _consume(self, events, n: int) -> list[int]:
        signalled: list[int] = []
        for i in range(n):
            ev = events[i]
            kind = ev.kind
            if kind == lib.IFC_NOTIFY_EV_KICK_FORWARD:
                self._forward[ev.qid](ev.qid)
            elif kind in (lib.IFC_NOTIFY_EV_SIGNAL, lib.IFC_NOTIFY_EV_REARM):
                if ev.fd not in signalled:
                    signalled.append(ev.fd)
            elif kind == lib.IFC_NOTIFY_EV_BROKEN:
                error = self.broken(ev.qid)
                log.error("%s: vring %d: relay stopped: %s", self.name, ev.qid, error)
        return signalled

    def close(self) -> None:
        """Stop the loop (if running) and release the epoll set; queue fds stay open."""
        if self.closed:
            return
        self.stop()
        if self._ctx.busy:
            raise RuntimeError(f"notify relay {self.name}: stop the thread running run() "
                               f"before close()")
        self.closed = True
        lib.ifc_notify_close(self._ctx)

    def __enter__(self) -> "NotifyRelay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
