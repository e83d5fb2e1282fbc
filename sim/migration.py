"""Pre-copy live migration, as QEMU does it, in the QEMU role of the simulator.

The source front-end asks the back-end to log (SET_LOG_BASE, SET_FEATURES
with LOG_ALL, SET_VRING_ADDR with the log flag).  Each iteration copies the
pages found dirty at the previous sync to the destination's RAM at the
migration bandwidth, while the guest and the VF keep running; a sync takes
the vhost log with atomic exchanges of 64-bit words (QEMU's
``vhost_dev_sync_region``, done here by the C ``ifc_log_fetch_clear`` while
nothing else runs) plus the pages the guest's own CPU wrote (KVM's dirty log,
modelled by ``CpuDirtyTracker``).  When what is left fits the downtime limit
the guest is paused, GET_VRING_BASE stops the source VF, a last sync and copy
follow, and the destination VF is started from the ring bases the source
returned.  Memory equality is checked page by page at that moment.

Pages go on QEMU's RAM stream a chunk at a time (sim/ramstream.py: a zero
page is a 9-byte record, any other page 4 KiB and a header): the chunk's pages
are sent as they are now, then the world advances by the chunk's transfer
time, so a page the device writes after it was sent is caught only by the log
- which is the point.  The first iteration sends every page, and never-written
ones cost what they cost QEMU: almost nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from ifcvf.vhost.protocol import log_size
from sim._native import ffi, lib
from sim.frontend import FrontEnd, Region, RingAddresses
from sim.ramstream import RamStream
from sim.world import World

PAGE = 4096
_ONE = re.compile("1")


@dataclass(frozen=True)
class PreCopyConfig:
    """QEMU's knobs, with its defaults where it has them."""

    bandwidth_bytes_per_s: float = 128 << 20     # QEMU's default max-bandwidth, 128 MiB/s
    downtime_limit_ns: int = 300_000_000         # QEMU's default downtime-limit, 300 ms
    max_iterations: int = 30                     # then give up: not converging
    chunk_pages: int = 64                        # stream bytes per simulated step, in pages
    cancel_after: int = 0                        # cancel after this many iterations (0: never)

    def __post_init__(self):
        if self.bandwidth_bytes_per_s <= 0 or self.chunk_pages < 1 or self.max_iterations < 1:
            raise ValueError("migration bandwidth, chunk and iteration count must be positive")


@dataclass
class Iteration:
    index: int
    start_ns: int
    duration_ns: int
    pages_copied: int
    dirty_log_pages: int     # found in the vhost log at the sync that ended it
    dirty_cpu_pages: int     # written by the guest CPU since the previous sync
    remaining_pages: int     # what the next iteration would have to copy
    stream_bytes: int = 0    # what went on the migration stream
    zero_pages: int = 0      # of pages_copied, sent as zero-page records


@dataclass
class Outcome:
    converged: bool
    cancelled: bool
    iterations: list[Iteration] = field(default_factory=list)
    downtime_ns: int = 0
    total_ns: int = 0
    stop_copy_pages: int = 0
    bases: dict[int, int] = field(default_factory=dict)
    mismatched_pages: list[int] = field(default_factory=list)
    memory_compared: bool = False
    switchover_ns: int = 0


class CpuDirtyTracker:
    """The guest CPU's own writes to its RAM, as KVM's dirty log would report them.

    ``always`` are ranges the guest driver writes as it runs (rings, private
    state, TX buffers): every sync reports them dirty while the guest ran.
    ``workload`` is an application that writes ``rate`` bytes/s into random
    pages of [base, base + size) - real writes, so a page that is not copied
    again shows up as a mismatch.
    """

    def __init__(self, world: World, memory, *, always: list[tuple[int, int]] = (),
                 workload_base: int = 0, workload_size: int = 0, rate_bytes_per_s: float = 0.0,
                 name: str = "cpu"):
        self.world = world
        self.memory = memory
        self.always = sorted({p for gpa, size in always for p in range(gpa // PAGE, -(-(gpa + size) // PAGE))})
        self.workload_pages = workload_size // PAGE
        self.workload_first = workload_base // PAGE
        self.rate = rate_bytes_per_s
        self.rng = world.rng(f"{name}.workload")
        self.dirty: set[int] = set()
        self.ran_since_sync = False
        self.paused = False
        self.proc = None
        self.written = 0
        if self.rate > 0 and self.workload_pages:
            self.proc = world.process(self._workload())

    def _workload(self):
        # One page per step at the configured rate: enough resolution for a
        # dirty rate, without one simulation event per byte.
        step = max(1, self.world.cycles(PAGE / self.rate * 1e9 * 16))
        while True:
            yield self.world.timeout(step)
            if self.paused:
                continue
            for _ in range(16):
                page = self.workload_first + self.rng.randrange(self.workload_pages)
                off = page * PAGE + self.rng.randrange(PAGE // 8) * 8
                self.written += 1
                self.memory.view[off:off + 8] = self.written.to_bytes(8, "little")
                self.dirty.add(page)

    def note_running(self) -> None:
        self.ran_since_sync = True

    def collect(self) -> set[int]:
        pages = self.dirty
        self.dirty = set()
        if self.ran_since_sync:
            pages.update(self.always)
        self.ran_since_sync = not self.paused
        return pages


class DirtyLogReader:
    """QEMU's side of the vhost log: it owns the memory and fetches-and-clears it."""

    def __init__(self, memory, size: int):
        self.memory = memory
        self.size = size
        self._ptr = ffi.from_buffer("uint8_t[]", memory.view[:size], require_writable=True)
        self._out = bytearray(size)
        self._out_ptr = ffi.from_buffer("uint8_t[]", self._out)

    def close(self) -> None:
        """Drop the export of the log memory, so closing it unmaps it (and closes
        the mmap's own fd) now, not whenever this reader is collected."""
        ffi.release(self._ptr)

    def fetch_and_clear(self) -> set[int]:
        bits = lib.ifc_log_fetch_clear(self._ptr, self.size, self._out_ptr)
        if bits < 0:
            raise RuntimeError("ifc_log_fetch_clear refused the log")
        if not bits:
            return set()
        # Bit n of the little-endian log is page n: read it off the binary string.
        bits_lsb_first = bin(int.from_bytes(self._out, "little"))[:1:-1]
        return {m.start() for m in _ONE.finditer(bits_lsb_first)}


class PreCopy:
    """One migration of a guest from a source VF to a destination VF."""

    def __init__(self, world: World, *, source: FrontEnd, rings: list[RingAddresses],
                 src_ram, dst_ram, log_memory, cpu: CpuDirtyTracker, config: PreCopyConfig,
                 pause_guest: Callable[[], None], start_destination: Callable[[dict[int, int]], None],
                 resume_on_source: Callable[[], None] | None = None,
                 on_progress: Callable[[str, dict], None] | None = None):
        self.world = world
        self.source = source
        self.rings = rings
        self.log_memory = log_memory
        self.log_size = log_size(src_ram.size)
        self.cpu = cpu
        self.config = config
        self.pause_guest = pause_guest
        self.start_destination = start_destination
        self.resume_on_source = resume_on_source or (lambda: None)
        self.on_progress = on_progress or (lambda phase, info: None)
        self.pages = src_ram.size // PAGE
        self.reader = DirtyLogReader(log_memory, self.log_size)
        self.stream = RamStream(src_ram, dst_ram)

    # --- copying ----------------------------------------------------------------------
    def _copy(self, pages, what: str) -> tuple[int, int]:
        """Send pages on the stream: each chunk's bytes move now, then time passes
        for their transfer at the migration bandwidth.  Returns (stream bytes, zero pages)."""
        todo = self.stream.pages_to_send(pages)
        budget = self.config.chunk_pages * PAGE
        per_byte_ns = 1e9 / self.config.bandwidth_bytes_per_s
        done = stream = zeros = 0
        report_every = max(1, len(todo) // 100)
        next_report = report_every
        while done < len(todo):
            sent = self.stream.send(todo, done, budget)
            done += sent.pages
            stream += sent.bytes
            zeros += sent.zero_pages
            self.world.advance_ns(sent.bytes * per_byte_ns)
            if done >= next_report:
                next_report = done + report_every
                self.on_progress("copy", {"what": what, "done": done, "total": len(todo)})
        return stream, zeros

    def _sync(self) -> tuple[set[int], int, int]:
        log_pages = {p for p in self.reader.fetch_and_clear() if p < self.pages}
        cpu_pages = self.cpu.collect()
        return log_pages | cpu_pages, len(log_pages), len(cpu_pages)

    def _transfer_ns(self, pages: int) -> float:
        return pages * PAGE / self.config.bandwidth_bytes_per_s * 1e9

    # --- the migration ---------------------------------------------------------------------
    def run(self) -> Outcome:
        world = self.world
        start = world.now_ns()
        self.source.set_log_base(self.log_memory.fd, self.log_size)
        self.source.set_log_all(True, self.rings)
        self.reader.fetch_and_clear()       # a fresh start: the whole RAM is sent first
        self.cpu.collect()
        outcome = Outcome(converged=False, cancelled=False)
        todo = range(self.pages)
        self.on_progress("setup", {"pages": self.pages})
        for index in range(1, self.config.max_iterations + 1):
            t0 = world.now_ns()
            stream, zeros = self._copy(todo, f"iteration {index}")
            copied = len(todo)
            dirty, from_log, from_cpu = self._sync()
            todo = sorted(dirty)
            it = Iteration(index, t0, world.now_ns() - t0, copied, from_log, from_cpu, len(dirty),
                           stream, zeros)
            outcome.iterations.append(it)
            self.on_progress("iteration", {"iteration": it})
            if self.config.cancel_after and index >= self.config.cancel_after:
                self.source.set_log_all(False, self.rings)
                outcome.cancelled = True
                outcome.total_ns = world.now_ns() - start
                self.on_progress("cancelled", {})
                return outcome
            if self._transfer_ns(len(dirty)) <= self.config.downtime_limit_ns:
                outcome.converged = True
                break
        if not outcome.converged:
            # QEMU would keep iterating (or throttle the guest); we give up and
            # the guest stays where it is, with logging turned off again.
            self.source.set_log_all(False, self.rings)
            outcome.total_ns = world.now_ns() - start
            self.on_progress("not converged", {})
            return outcome
        self._stop_and_copy(outcome, dirty)
        outcome.total_ns = world.now_ns() - start
        return outcome

    def _stop_and_copy(self, outcome: Outcome, dirty: set[int]) -> None:
        world = self.world
        paused_at = world.now_ns()
        self.pause_guest()
        self.cpu.paused = True
        self.on_progress("stop-and-copy", {})
        outcome.bases = self.source.stop(self.rings)   # GET_VRING_BASE: the source VF stops
        more, _, _ = self._sync()
        final = sorted(dirty | more)
        outcome.stop_copy_pages = len(final)
        self._copy(final, "stop-and-copy")
        outcome.switchover_ns = world.now_ns()
        outcome.mismatched_pages = self.stream.differing_pages()
        outcome.memory_compared = True
        self.start_destination(outcome.bases)
        outcome.downtime_ns = world.now_ns() - paused_at
        self.on_progress("resumed", {})


def regions_of(memory) -> list[Region]:
    return [Region(0, memory.size, memory.fd, memory.address)]
