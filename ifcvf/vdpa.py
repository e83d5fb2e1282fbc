"""The vDPA driver: the ops a vhost-user back-end calls, and the policy behind them.

One ``VdpaDevice`` per VF.  It owns the VF's DMA mappings (guest memory with
IOVA = GPA, the dirty log at IOVA_LOG_BASE, mediated rings from
IOVA_MEDIATED_RINGS), its MSI-X routing (vector 0 for config changes, vector
1+i to vring i's call eventfd, or to the relay's own eventfd while the
software relay interposes), the kick relay, and the live-migration mode.  The
back-end pushes down what the driver needs as arguments (a ``DeviceSetup`` of
negotiated features, guest memory, vrings and log at ``dev_conf``; the new
features, log or vrings with each change) and takes back what the driver
produces as return values (ring states at ``dev_close``): the driver never
calls back into the back-end, except to report a config interrupt.

Two ways to migrate:
- hardware logging: the log is DMA-mapped and the VF's LM block programmed;
  the VF marks the pages of the packet buffers it writes;
- software relay (``sw-live-migration=1``): the RX queues' used rings are
  re-pointed at mediated rings we own; the C relay copies each used entry to
  the guest's ring, marking every device-writable buffer of the chain in the
  log, then signals the guest.

Where DPDK's driver stops short, this one does not: clearing LOG_ALL (a
cancelled migration) turns logging off, or takes the VF back to direct mode,
and unmaps what it mapped; a second SET_LOG_BASE moves logging to the new log;
errors are returned and undone, not logged and dropped.
"""
from __future__ import annotations

import logging
import os
import select
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from hal.api import HalError, HostBuffer, PciFunction
from ifcvf import ids
from ifcvf.devargs import Devargs
from ifcvf.dirtylog import DirtyLog, LogRangeError
from ifcvf.hw import HwError, IfcvfHw, QueueConfig, RingState
from ifcvf.iova import place
from ifcvf.relay import MediatedRing, MemoryTable, NotifyQueue, NotifyRelay, RelayError, RelayQueue
from ifcvf.stats import DeviceCounters, MigrationStats, QueueStats, RelayCounters, VfStats
from ifcvf.vring import used_ring_bytes

log = logging.getLogger("ifcvf.vdpa")

# Features the back-end adds to the VF's own, as DPDK does: the guest announces
# itself after migration (the VF cannot send RARP), QEMU handles the control
# queue and link status itself, and LOG_ALL is what makes migration possible.
EXTRA_FEATURES = (ids.bit(ids.Feature.NET_GUEST_ANNOUNCE) | ids.bit(ids.Feature.NET_CTRL_VQ)
                  | ids.bit(ids.Feature.NET_STATUS) | ids.bit(ids.Feature.PROTOCOL_FEATURES)
                  | ids.bit(ids.Feature.LOG_ALL))

# Bits that mean something to vhost-user only, never to the VF.
VHOST_ONLY = ids.bit(ids.Feature.LOG_ALL) | ids.bit(ids.Feature.PROTOCOL_FEATURES)
NOTIFY_PAGE = 4096    # what QEMU maps for a host notifier
# While the software relay interposes it also polls, adaptively: the VF reads
# used_event from the guest's avail ring, which the guest sets from what the
# relay showed it, so the VF completes entries silently whenever the guest's
# value is behind it (see ifc_notify_set_poll).  20 us while that may be so,
# backing off to 1 ms otherwise (the guest may move used_event back, and the
# VF's request for a kick after draining its ring reaches the guest only
# through the relay).
RELAY_POLL_MIN_NS = 20_000
RELAY_POLL_MAX_NS = 1_000_000


class ProbeError(Exception):
    """The function cannot be driven; the message says why and what to do."""


class NotClaimed(ProbeError):
    """No ``vdpa=1``: the function is left to other drivers, as DPDK leaves it to virtio PMD."""


class VdpaError(Exception):
    """An op failed; the back-end reports it to the front-end."""


@dataclass
class Vring:
    """What the driver needs of one vring (addresses are guest-physical)."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    log_gpa: int
    last_avail: int
    last_used: int
    kick_fd: int
    call_fd: int
    enabled: bool


class LogArea(Protocol):
    """The dirty log from SET_LOG_BASE."""

    memory: HostBuffer   # whole pages holding the log (what the VF's IOMMU maps)
    offset: int          # where the log starts in it
    size: int            # bytes of log
    log: DirtyLog        # exactly those bytes


class GuestRegion(Protocol):
    gpa: int
    size: int
    mapping: HostBuffer  # the region's memory
    mmap_offset: int     # where the region starts in it


class GuestMemoryView(Protocol):
    """Guest RAM as the front-end's memory table gave it."""

    regions: Sequence[GuestRegion]

    def view(self, gpa: int, length: int) -> memoryview: ...

    def c_table(self) -> list[tuple[int, int, int]]:
        """(gpa, size, host address) of each region, for the C relay."""


@dataclass
class DeviceSetup:
    """What dev_conf is given: the device as the front-end set it up."""

    features: int
    memory: GuestMemoryView
    vrings: list[Vring]
    log: LogArea | None = None


class ConfigWatcher:
    """Vector 0 (the VF's config-change interrupt) to the back-end (a hal.api.Poller)."""

    def __init__(self, name: str, fd: int, on_change: Callable[[], None]):
        self.name = name
        self.fd = fd
        self.on_change = on_change
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fds(self) -> list[int]:
        return [self.fd]

    def step(self) -> list[int]:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            return []
        self.on_change()
        return []

    def next_poll_ns(self) -> int:
        return 0     # every config change comes with an interrupt

    def poll(self) -> list[int]:
        return []

    def run(self) -> None:
        while True:
            ready, _, _ = select.select([self.fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            self.step()

    def stop(self) -> None:
        os.write(self._stop_w, b"x")

    def close(self) -> None:
        os.close(self._stop_r)
        os.close(self._stop_w)


@dataclass
class SwRelay:
    """What the software relay adds while it interposes on the RX used rings."""

    table: MemoryTable
    rings: dict[int, MediatedRing] = field(default_factory=dict)
    iovas: dict[int, tuple[int, int]] = field(default_factory=dict)
    queues: dict[int, RelayQueue] = field(default_factory=dict)
    intr_fds: dict[int, int] = field(default_factory=dict)


@dataclass
class Running:
    """What exists while the datapath runs; torn down in reverse."""

    setup: DeviceSetup
    mapped: list[tuple[int, int]] = field(default_factory=list)
    config_fd: int = -1
    config_watch: ConfigWatcher | None = None
    relay: NotifyRelay | None = None
    queues: dict[int, QueueConfig] = field(default_factory=dict)
    notify_offsets: dict[int, int] = field(default_factory=dict)
    log_mapping: tuple[int, int] | None = None
    sw: SwRelay | None = None
    #: Why the VF is stopped while the guest runs (no usable dirty log while
    #: LOG_ALL is set), with the ring states it stopped at; None: not paused.
    paused: str | None = None
    paused_states: dict[int, RingState] = field(default_factory=dict)
    #: Vrings stopped while the VF ran (SET_VRING_ENABLE 0), and where.
    stopped: dict[int, RingState] = field(default_factory=dict)


class VdpaDevice:
    """Probe-time checks plus the vDPA ops for one VF."""

    def __init__(self, fn: PciFunction, devargs: Devargs, *, name: str | None = None):
        self.fn = fn
        self.devargs = devargs
        self.name = name or fn.address
        if not devargs.vdpa:
            raise NotClaimed(f"{fn.address}: not claimed: vdpa=1 is not in its devargs "
                             "(without it the function is left to other drivers)")
        pci = fn.ids
        entry = ids.match_ifcvf(pci.vendor, pci.device, pci.subsystem_vendor, pci.subsystem_device)
        if entry is None:
            if not ids.is_virtio_net(pci.vendor, pci.device, pci.subsystem_device):
                raise ProbeError(f"{fn.address}: {pci} is neither an IFCVF nor a virtio-net function")
            if not devargs.generic_virtio_net:
                raise ProbeError(f"{fn.address}: {pci} is a virtio-net function outside the IFCVF ID table; "
                                 "add generic-virtio-net=1 to its devargs to drive it anyway")
        elif ids.virtio_device_type(pci.device, pci.subsystem_device) != ids.VIRTIO_ID_NET:
            raise ProbeError(f"{fn.address}: {entry.name} is a block device; only net is supported")
        self.kind = entry.name if entry else "generic virtio-net"
        try:
            self.hw = IfcvfHw(fn)
        except (HwError, HalError) as err:
            raise ProbeError(str(err)) from None
        if not self.hw.has_lm_block and not devargs.sw_live_migration:
            raise ProbeError(f"{fn.address}: does not support hardware-assisted live migration "
                             f"({self.hw.lm_absent_reason}); add sw-live-migration=1 to its devargs")
        self.device_features = self.hw.device_features()
        self.max_queue_pairs = min(ids.MAX_QUEUE_PAIRS, self.hw.queue_pairs)
        if self.max_queue_pairs < 1:
            raise ProbeError(f"{fn.address}: the function has no data queue pair "
                             f"({self.hw.num_queues} queues)")
        self.max_queue_size = self.hw.max_queue_size(0)
        msix = fn.msix_vectors()
        if msix < 3:
            raise ProbeError(f"{fn.address}: {msix} MSI-X vectors; at least 3 are needed "
                             "(config + one per queue of a pair)")
        self.features = (self.device_features & ~ids.bit(ids.Feature.ACCESS_PLATFORM)) | EXTRA_FEATURES
        self.running: Running | None = None
        self.logging = False
        # Statistics (ifcvf.stats): cumulative per vring, and the migration as seen from here.
        self._totals: dict[int, RelayCounters] = {}
        self._phase = "none"
        self._migrations = self._switch_overs = self._pauses = self._log_marks = 0
        self._logall_since: int | None = None     # clock ns LOG_ALL was set at
        self._still_since: int | None = None      # clock ns the rings stopped at (paused or switch-over)
        self._downtime_ns = 0
        self._last_precopy_s: float | None = None
        self._last_downtime_s: float | None = None
        log.info("%s: %s, %d queue pairs, LM block: %s", self.name, self.kind, self.max_queue_pairs,
                 "yes" if self.hw.has_lm_block else f"no ({self.hw.lm_absent_reason})")

    # --- what the back-end asks at connect time -------------------------------
    def get_features(self) -> int:
        return self.features

    def get_queue_num(self) -> int:
        return self.max_queue_pairs

    @property
    def max_vrings(self) -> int:
        return 2 * self.max_queue_pairs

    @property
    def mode(self) -> str:
        if self.running is None:
            return "stopped"
        if self.running.paused is not None:
            return "paused"
        return "sw-relay" if self.running.sw else ("hw-logging" if self.logging else "direct")

    def broken_vrings(self) -> dict[int, str]:
        """Relayed vrings the relay refused to serve (a hostile ring), with the reason.

        The relay touched nothing for the offending entry and stopped that
        queue; the VF and every other queue keep running.
        """
        run = self.running
        if run is None or run.relay is None or run.sw is None:
            return {}
        out = {}
        for q in run.sw.queues:
            error = run.relay.broken(q)
            if error is not None:
                out[q] = str(error)
        return out

    def running_vrings(self) -> list[int]:
        return sorted(self.running.queues) if self.running else []

    # --- dev_conf / dev_close ----------------------------------------------------
    def dev_conf(self, setup: DeviceSetup, on_config_change: Callable[[], None] = lambda: None) -> None:
        """Start the datapath for every enabled vring; on failure undo everything.

        ``on_config_change`` runs (on the interrupt poller) when the VF raises
        its config interrupt."""
        if self.running:
            raise VdpaError(f"{self.name}: already configured")
        run = Running(setup)
        self.running = run
        try:
            self._start(run, on_config_change)
        except (HwError, HalError, VdpaError, RelayError, OSError, ValueError) as err:
            self._teardown(run, save_state=False)
            self.running = None
            raise VdpaError(f"{self.name}: cannot configure the VF: {err}") from None
        self._migration_started(run)

    def _vrings(self, run: Running) -> list[Vring]:
        return [v for v in run.setup.vrings if v.index < self.max_vrings]

    def _start(self, run: Running, on_config_change: Callable[[], None]) -> None:
        dev = run.setup
        for region in dev.memory.regions:
            self.fn.dma_map(region.gpa, region.mapping, region.mmap_offset, region.size)
            run.mapped.append((region.gpa, region.size))
        run.config_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        run.config_watch = ConfigWatcher(f"{self.name}-config", run.config_fd, on_config_change)
        self.fn.start_poller(run.config_watch)
        run.queues = {v.index: self._queue_config(v) for v in self._vrings(run) if v.enabled}
        run.notify_offsets = {q: self.hw.notify_offset(q) for q in range(self.max_vrings)}
        if dev.features & ids.bit(ids.Feature.LOG_ALL) and dev.log is None:
            # Nothing may be written that the log cannot show: start stopped.
            run.paused_states = {q: RingState(c.last_used, c.last_used, c.last_avail)
                                 for q, c in run.queues.items()}
            run.paused = "LOG_ALL without a usable dirty log"
            self._route_msix(run)
            log.error("%s: VF left stopped: %s", self.name, run.paused)
        elif dev.features & ids.bit(ids.Feature.LOG_ALL) and self.devargs.sw_live_migration:
            self._start_sw(run, {})
        else:
            # With LOG_ALL the log is on before DRIVER_OK: no DMA goes unlogged.
            self._start_direct(run, logged=bool(dev.features & ids.bit(ids.Feature.LOG_ALL)))
        log.info("%s: datapath up (%s), vrings %s", self.name, self.mode, sorted(run.queues))

    def _queue_config(self, v: Vring, last: RingState | None = None) -> QueueConfig:
        avail, used = (last.last_avail, last.last_used) if last else (v.last_avail, v.last_used)
        return QueueConfig(v.index, v.size, v.desc, v.avail, v.used, avail, used,
                           ids.MSIX_QUEUE_VECTOR_BASE + v.index)

    def _iova_window(self, run: Running, preferred: int, size: int, what: str) -> int:
        taken = list(run.mapped)
        if run.log_mapping:
            taken.append(run.log_mapping)
        if run.sw:
            taken += list(run.sw.iovas.values())
        iova = place(self.fn.iova_ranges(), preferred, size, taken)
        if iova is None:
            raise VdpaError(f"{self.name}: no room for the {what} ({size:#x} bytes) in the IOVA ranges "
                            f"the IOMMU allows: {[(hex(a), hex(b)) for a, b in self.fn.iova_ranges()]}")
        return iova

    def _route_msix(self, run: Running) -> None:
        vrings = self._vrings(run)
        count = 1 + max((v.index + 1 for v in vrings), default=0)
        if count > self.fn.msix_vectors():
            raise VdpaError(f"{self.name}: {count} MSI-X vectors needed, the VF has {self.fn.msix_vectors()}")
        fds = [-1] * count
        fds[ids.MSIX_CONFIG_VECTOR] = run.config_fd
        for v in vrings:
            relayed = run.sw.intr_fds.get(v.index) if run.sw else None
            fds[ids.MSIX_QUEUE_VECTOR_BASE + v.index] = v.call_fd if relayed is None else relayed
        self.fn.set_msix(fds)

    def _enabled_pairs(self, run: Running) -> int:
        return len({q // 2 for q in run.queues})

    def _doorbell(self, run: Running, q: int):
        """Where the C relay rings queue q: the BAR address on VFIO, a callback on the simulator."""
        offset = run.notify_offsets[q]
        address = self.hw.notify_region.address_of(offset)
        return address if address is not None else (lambda qid, off=offset: self.hw.kick(qid, off))

    def _start_relay(self, run: Running) -> None:
        specs = []
        for v in self._vrings(run):
            relay = run.sw.queues.get(v.index) if run.sw else None
            if v.kick_fd < 0 and relay is None:
                continue
            specs.append(NotifyQueue(
                v.index, kick_fd=v.kick_fd if v.kick_fd >= 0 else None, doorbell=self._doorbell(run, v.index),
                relay=relay, intr_fd=run.sw.intr_fds.get(v.index) if relay else None,
                call_fd=v.call_fd if relay and v.call_fd >= 0 else None))
        run.relay = NotifyRelay(self.name, specs, poll_min_ns=RELAY_POLL_MIN_NS,
                                poll_max_ns=RELAY_POLL_MAX_NS)
        self.fn.start_poller(run.relay)

    def _stop_relay(self, run: Running) -> None:
        if run.relay is not None:
            self.fn.stop_poller(run.relay)
            self._fold_relay(run.relay)
            run.relay.close()
            run.relay = None

    def _start_direct(self, run: Running, states: dict[int, RingState] | None = None, *,
                      logged: bool = False) -> None:
        self._route_msix(run)
        configs = [self._queue_config(v, (states or {}).get(v.index))
                   for v in self._vrings(run) if v.index in run.queues]
        run.queues = {c.index: c for c in configs}
        log_range = self._map_log(run) if logged else None
        try:
            self.hw.start(run.setup.features & ~VHOST_ONLY, configs, mq_pairs=self._enabled_pairs(run),
                          log=log_range)
        except (HwError, HalError):
            self._unmap_log(run)
            raise
        self.logging = log_range is not None
        self._start_relay(run)

    def dev_close(self) -> dict[int, RingState]:
        """Stop the datapath and unmap; each running vring's state, to resume from."""
        run = self.running
        if run is None:
            return {}
        self.running = None
        states = self._teardown(run, save_state=True)
        self._migration_stopped(run)
        log.info("%s: datapath down", self.name)
        return states

    def _stop_hw(self, run: Running) -> dict[int, RingState]:
        """Stop the VF and return each running queue's state (from the used ring if need be)."""
        try:
            status = self.hw.status()
        except (HwError, HalError):
            status = 0
        if status == 0xFF:
            log.error("%s: the VF reads all ones (device status %#04x): it is gone from the bus "
                      "(surprise removal); ring state comes from the guest's used rings", self.name, status)
        elif status & ids.Status.NEEDS_RESET:
            # A queue broke (a buffer it could not reach, a malformed chain): the
            # VF stopped that queue's work on its own; say so, it explains lost frames.
            log.error("%s: the VF reports DEVICE_NEEDS_RESET (status %#04x): a queue met a "
                      "descriptor or buffer it could not use and stopped", self.name, status)
        try:
            states = self.hw.stop(sorted(run.queues))
        except (HwError, HalError) as err:
            log.error("%s: stop: %s; resetting", self.name, err)
            states = {}
            try:
                self.hw.reset()
            except (HwError, HalError) as err2:
                log.error("%s: reset: %s", self.name, err2)
        return {q: states.get(q) or self._state_from_used_ring(run, q) for q in run.queues}

    def _teardown(self, run: Running, *, save_state: bool) -> dict[int, RingState]:
        self._stop_relay(run)
        if run.config_watch is not None:
            self.fn.stop_poller(run.config_watch)
            run.config_watch.close()
            run.config_watch = None
        logged = self.logging or run.sw is not None or run.paused is not None
        if run.paused is not None:
            states, run.paused = run.paused_states, None
        else:
            states = self._stop_hw(run)
        if run.sw is not None:
            states = self._stop_sw(run, states)
        self._disable_logging(run)
        if logged and save_state:
            self._mark_used_rings_dirty(run)
        self._release(run)
        return dict(sorted({**run.stopped, **states}.items())) if save_state else {}

    def _release(self, run: Running) -> None:
        errors = []
        try:
            self.fn.set_msix([])
        except HalError as err:
            errors.append(str(err))
        if run.config_fd >= 0:
            os.close(run.config_fd)
            run.config_fd = -1
        for gpa, size in reversed(run.mapped):
            try:
                self.fn.dma_unmap(gpa, size)
            except HalError as err:
                errors.append(str(err))
        run.mapped.clear()
        if errors:
            log.error("%s: teardown: %s", self.name, "; ".join(errors))

    def _state_from_used_ring(self, run: Running, q: int) -> RingState:
        """A device without a stop command was reset: its progress is the used index."""
        queue = run.queues[q]
        if run.sw and q in run.sw.rings:
            used = run.sw.rings[q].used_idx
        else:
            used = int.from_bytes(run.setup.memory.view(queue.used + 2, 2), "little")
        return RingState(used, used, used)

    def _mark_used_rings_dirty(self, run: Running) -> None:
        # IFCVF logs packet buffers only; the used rings it (or our relay) wrote are ours to log.
        area = run.setup.log
        if area is None:
            return
        for v in self._vrings(run):
            if v.index in run.queues:
                try:
                    area.log.mark(v.log_gpa, used_ring_bytes(v.size))
                    self._log_marks += 1
                except LogRangeError as err:
                    log.error("%s: vring %d: cannot log its used ring: %s", self.name, v.index, err)

    # --- software relay (sw-live-migration=1) --------------------------------------------
    def _start_sw(self, run: Running, states: dict[int, RingState]) -> None:
        """Start the VF with every RX used ring re-pointed at a mediated ring we relay from."""
        if states and not self.hw.has_lm_block and any(s.last_avail for s in states.values()):
            raise VdpaError(f"{self.name}: cannot switch a running VF to the software relay: without "
                            f"an LM block ({self.hw.lm_absent_reason}) its rings cannot resume where they were")
        vrings = {v.index: v for v in self._vrings(run) if v.index in run.queues}
        for q, v in vrings.items():
            run.queues[q] = self._queue_config(v, states.get(q))
        self._build_sw(run, {q: v for q, v in vrings.items() if q % 2 == 0}, states)
        self._route_msix(run)
        configs = list(run.queues.values())
        self.hw.start(run.setup.features & ~VHOST_ONLY, configs, mq_pairs=self._enabled_pairs(run))
        self._start_relay(run)
        self._wake_guest(run, sorted(run.sw.queues))
        for q in run.queues:  # and make the VF look at every ring again
            self.hw.kick(q, run.notify_offsets[q])

    def _build_sw(self, run: Running, rx: dict[int, Vring], states: dict[int, RingState]) -> None:
        """Mediated rings, relay queues and interrupt eventfds for the RX vrings ``rx``."""
        area = run.setup.log
        if area is None:
            raise VdpaError(f"{self.name}: LOG_ALL without a log (SET_LOG_BASE never came)")
        sw = SwRelay(MemoryTable(run.setup.memory.c_table()))
        run.sw = sw
        event_idx = bool(run.setup.features >> ids.Feature.RING_EVENT_IDX & 1)
        rings = {q: MediatedRing(v.size, name=f"{self.name}-mediated-{q}") for q, v in sorted(rx.items())}
        sw.rings.update(rings)
        iova = self._iova_window(run, ids.IOVA_MEDIATED_RINGS, sum(r.nbytes for r in rings.values()) or 4096,
                                 "mediated rings")
        for q, v in sorted(rx.items()):
            config = self._queue_config(v, states.get(q))
            ring = rings[q]
            self.fn.dma_map(iova, ring.memory, 0, ring.nbytes)
            sw.iovas[q] = (iova, ring.nbytes)
            ring.used_idx = config.last_used
            ring.avail_idx = config.last_avail
            sw.queues[q] = RelayQueue(sw.table, v.size, v.desc, v.avail, v.used, ring,
                                      last_idx=config.last_used, event_idx=event_idx,
                                      log=area.log, log_used_gpa=v.log_gpa)
            sw.intr_fds[q] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            # The device writes its used entries to the mediated ring from now on.
            run.queues[q] = QueueConfig(q, config.size, config.desc, config.avail,
                                        iova + ring.used_offset, config.last_avail,
                                        config.last_used, config.vector)
            iova += ring.nbytes
        log.info("%s: software relay interposed on RX vrings %s", self.name, sorted(sw.queues))

    def _stop_sw(self, run: Running, states: dict[int, RingState]) -> dict[int, RingState]:
        """After the VF stopped: relay what is left, drop the mediated rings."""
        sw, run.sw = run.sw, None
        vrings = {v.index: v for v in self._vrings(run)}
        signalled = []
        for q, relay in sw.queues.items():
            try:
                batch = relay.relay_all()
            except RelayError as err:
                log.error("%s: vring %d: final relay refused: %s", self.name, q, err)
            else:
                # An interrupt the guest asked for must not be lost with the
                # relay: with EVENT_IDX it would never ask again.
                if batch.signal and vrings[q].call_fd >= 0:
                    os.eventfd_write(vrings[q].call_fd, 1)
                    signalled.append(vrings[q].call_fd)
            used = relay.last_idx
            states[q] = RingState(used, used, states[q].hw_avail if q in states else used)
        self._release_sw(sw)
        self.fn.eventfds_written(signalled)
        # The relayed queues run on the guest's own used rings from now on.
        for q in sw.queues:
            v = next(v for v in self._vrings(run) if v.index == q)
            run.queues[q] = self._queue_config(v, states[q])
        return states

    def _release_sw(self, sw: SwRelay) -> None:
        """Unmap and free what _build_sw made (all of it, or as far as it got)."""
        for q, (iova, size) in sw.iovas.items():
            try:
                self.fn.dma_unmap(iova, size)
            except HalError as err:
                log.error("%s: unmapping mediated ring %d: %s", self.name, q, err)
        for q, relay in sw.queues.items():
            self._total(q).pages_logged += relay.pages_logged
            relay.close()
        for ring in sw.rings.values():
            ring.close()
        for fd in sw.intr_fds.values():
            os.close(fd)

    def _wake_guest(self, run: Running, queues: list[int]) -> None:
        """After the relay took over (or handed back) these queues: relay what is
        pending and signal each guest once, whatever its used_event says.

        The VF's entries of the stop drain and the relay's first ones may sit
        behind a used_event the guest will not move until it is told (Linux
        leaves it at 0 while it polls), so a guest left waiting would wait
        forever.  One spurious interrupt per switch is harmless (Linux
        tolerates 99,900 unhandled in 100,000); DPDK's relay does the same."""
        written: list[int] = []
        for q in queues:
            if run.relay is not None and run.sw is not None and q in run.sw.queues:
                written += run.relay.catch_up(q).signalled
            call_fd = next((v.call_fd for v in self._vrings(run) if v.index == q), -1)
            if call_fd >= 0 and call_fd not in written:
                os.eventfd_write(call_fd, 1)
                written.append(call_fd)
        self.fn.eventfds_written(written)

    def _switch(self, run: Running, to_sw: bool) -> None:
        """Between direct and relayed operation while the guest runs.

        With IFCVF's per-queue stop command only the RX queues pause, for a
        stop handshake and a re-programming; TX keeps running and the device
        is never reset.  Without it the whole device is stopped and restarted,
        which only works while its rings are still at index 0.
        """
        self._stop_relay(run)
        try:
            if self.hw.has_stop_command:
                self._switch_rx_queues(run, to_sw)
            else:
                states = self._stop_hw(run)
                if run.sw is not None:
                    states = self._stop_sw(run, states)
                if to_sw:
                    try:
                        self._start_sw(run, states)
                    except (HwError, HalError, RelayError, VdpaError, OSError, ValueError):
                        self._abandon_sw(run)
                        self._start_direct(run, states)
                        raise
                else:
                    self._start_direct(run, states)
        except (HwError, HalError, RelayError, VdpaError, OSError, ValueError) as err:
            raise VdpaError(f"{self.name}: switching to {'software relay' if to_sw else 'direct mode'} "
                            f"failed: {err}") from None

    def _abandon_sw(self, run: Running) -> None:
        """A switch to the relay failed part-way: drop what it built, and point
        the RX queues back at the guest's own rings."""
        sw, run.sw = run.sw, None
        self._stop_relay(run)
        if sw is None:
            return
        self._release_sw(sw)

    def _switch_rx_queues(self, run: Running, to_sw: bool) -> None:
        rx = [q for q in sorted(run.queues) if q % 2 == 0]
        states = {q: self.hw.stop_queue(q) for q in rx}
        if run.sw is not None:
            states = self._stop_sw(run, states)
        vrings = {v.index: v for v in self._vrings(run)}
        direct = {q: self._queue_config(vrings[q], states[q]) for q in rx}
        if not to_sw:
            run.queues.update(direct)
            self._resume_rx(run, rx)
            return
        try:
            self._build_sw(run, {q: vrings[q] for q in rx}, states)
            self._resume_rx(run, rx)
        except (HwError, HalError, RelayError, VdpaError, OSError, ValueError):
            # Back to direct mode exactly as it was: the guest's own rings, from
            # where the stop left them, its own vectors, and no relay remains.
            self._abandon_sw(run)
            for q in rx:
                self.hw.stop_queue(q)
            run.queues.update(direct)
            self._resume_rx(run, rx)
            raise

    def _resume_rx(self, run: Running, rx: list[int]) -> None:
        """Restart the stopped RX queues as run.queues says, relay, wake the guest."""
        self._route_msix(run)
        for q in rx:
            self.hw.enable_queue(run.queues[q])
        self._start_relay(run)
        self._wake_guest(run, rx)
        for q in rx:
            self.hw.kick(q, run.notify_offsets[q])

    # --- runtime changes ---------------------------------------------------------
    def vring_fds_changed(self, vrings: list[Vring]) -> None:
        """A kick or call eventfd was replaced while running: re-route vectors and kicks."""
        run = self.running
        if run is None:
            return
        run.setup.vrings = list(vrings)
        self._stop_relay(run)
        try:
            self._route_msix(run)
            self._start_relay(run)
        except (HalError, OSError, ValueError) as err:
            raise VdpaError(f"{self.name}: re-routing eventfds: {err}") from None

    def set_vring_state(self, index: int, enable: bool,
                        vrings: list[Vring] | None = None) -> RingState | None:
        """SET_VRING_ENABLE while configured: start or stop one queue (the guest's ethtool -L).

        ``vrings``: the vrings as they are now, if they changed.  Returns the
        state a stopped queue stopped at (None otherwise); dev_close reports
        it again."""
        if not 0 <= index < self.max_vrings:
            raise VdpaError(f"{self.name}: vring {index} out of range (0..{self.max_vrings - 1})")
        run = self.running
        if run is None:
            return None
        if vrings is not None:
            run.setup.vrings = list(vrings)
        if enable == (index in run.queues):
            return None
        if not self.hw.has_stop_command:
            raise VdpaError(f"{self.name}: the function cannot start or stop single queues "
                            "(no IFCVF stop command); re-negotiate instead")
        if run.sw is not None or run.paused is not None:
            # Accepted, and applied when the relay hands back or the VF restarts
            # (_reconcile_vrings): refusing would leave the front-end's view and
            # ours apart for good.
            log.info("%s: vring %d %s once the %s", self.name, index, "starts" if enable else "stops",
                     "software relay hands back" if run.sw is not None else "VF restarts")
            return None
        state = None
        try:
            if enable:
                vring = next((v for v in self._vrings(run) if v.index == index), None)
                if vring is None:
                    raise VdpaError(f"{self.name}: vring {index} is not set up")
                config = self._queue_config(vring)
                run.queues[index] = config
                self.hw.set_mq(self._enabled_pairs(run))
                self.hw.enable_queue(config)
                run.stopped.pop(index, None)
            else:
                state = self.hw.stop_queue(index)
                del run.queues[index]
                self.hw.set_mq(self._enabled_pairs(run))
                run.stopped[index] = state
            self._stop_relay(run)
            self._route_msix(run)
            self._start_relay(run)
        except (HwError, HalError) as err:
            raise VdpaError(f"{self.name}: vring {index}: {err}") from None
        return state

    def set_features(self, features: int, log_area: LogArea | None) -> None:
        """Called for every SET_FEATURES (with the log as it is): LOG_ALL on or
        off changes the migration mode.

        Turning logging on never fails towards QEMU, which aborts the VM when
        LOG_ALL is refused at migration start: if logging cannot be had (no
        usable log, a mapping or a switch that fails), the VF is stopped
        instead, so that nothing it could write escapes the log, and restarts
        when a usable log comes or LOG_ALL is cleared.  Turning it off that
        fails raises VdpaError with nothing changed."""
        run = self.running
        want = bool(features & ids.bit(ids.Feature.LOG_ALL))
        if run is None:
            return
        old = run.setup.features, run.setup.log
        run.setup.features, run.setup.log = features, log_area
        had = bool(old[0] & ids.bit(ids.Feature.LOG_ALL))
        if want and not had:
            self._begin_migration()
        elif had and not want:
            self._end_still()
            self._phase = "cancelled"
        if run.paused is not None:
            if not want or run.setup.log is not None:
                self._resume(run, logged=want)
            return
        try:
            if self.devargs.sw_live_migration:
                if want != (run.sw is not None):
                    self._switch(run, to_sw=want)
                    log.info("%s: %s", self.name, "software relay on" if want else "back to direct mode")
                    if not want:
                        self._reconcile_vrings(run)
            elif want and not self.logging:
                self._enable_logging(run)
            elif not want and self.logging:
                self._disable_logging(run)
        except VdpaError as err:
            if not want:
                run.setup.features, run.setup.log = old
                raise
            self._pause(run, f"dirty logging could not start: {err}")

    def set_log(self, log_area: LogArea | None, reason: str = "") -> None:
        """A new SET_LOG_BASE: ``log_area``, or None when it was unusable (``reason``).

        QEMU reads only the log it sent last.  A usable one: logging moves to
        it, or a VF stopped for want of one restarts.  None, or logging that
        cannot move: a VF that logs stops, so that nothing it writes escapes
        the log."""
        run = self.running
        if run is None:
            return
        run.setup.log = log_area
        if log_area is None:
            if run.paused is None and (self.logging or run.sw is not None):
                self._pause(run, f"the new dirty log is unusable: {reason}")
            return
        if run.paused is not None:
            if run.setup.features & ids.bit(ids.Feature.LOG_ALL) and run.setup.log is not None:
                self._resume(run, logged=True)
            return
        try:
            if run.sw is not None:
                area = run.setup.log
                for q, relay in run.sw.queues.items():
                    vring = next(v for v in self._vrings(run) if v.index == q)
                    try:
                        relay.set_log(area.log, vring.log_gpa)
                    except RelayError as err:
                        raise VdpaError(f"vring {q}: new log refused: {err}") from None
            elif self.logging:
                self._disable_logging(run)
                self._enable_logging(run)
        except VdpaError as err:
            self._pause(run, f"logging could not move to the new log: {err}")

    # --- stopped for want of a log --------------------------------------------------
    def _pause(self, run: Running, reason: str) -> None:
        """Stop the VF with every ring state saved; the guest loses its network,
        never a dirty page."""
        self._stop_relay(run)
        states = self._stop_hw(run)
        if run.sw is not None:
            states = self._stop_sw(run, states)
        self._disable_logging(run)
        run.paused_states = states
        run.paused = reason
        self._paused_now()
        log.error("%s: VF stopped until a usable dirty log comes or LOG_ALL is cleared: %s",
                  self.name, reason)

    def _resume(self, run: Running, *, logged: bool) -> None:
        states, reason = run.paused_states, run.paused
        run.paused, run.paused_states = None, {}
        try:
            if logged and self.devargs.sw_live_migration:
                self._start_sw(run, states)
            else:
                self._start_direct(run, states, logged=logged)
        except (HwError, HalError, RelayError, VdpaError, OSError, ValueError) as err:
            if run.sw is not None:
                self._abandon_sw(run)
            run.paused, run.paused_states = f"{reason}; restart failed: {err}", states
            log.error("%s: VF stays stopped: %s", self.name, run.paused)
            return
        self._end_still()
        self._phase = "logging" if logged else "cancelled"
        self._wake_guest(run, sorted(run.queues))
        log.info("%s: VF restarted (%s) after: %s", self.name, self.mode, reason)
        if run.sw is None:
            self._reconcile_vrings(run)

    def _reconcile_vrings(self, run: Running) -> None:
        """Start or stop the vrings whose SET_VRING_ENABLE came while they could not change."""
        for v in self._vrings(run):
            if v.enabled != (v.index in run.queues):
                try:
                    self.set_vring_state(v.index, v.enabled)
                except VdpaError as err:
                    log.error("%s: vring %d: %s", self.name, v.index, err)

    # --- statistics ------------------------------------------------------------------
    def _total(self, q: int) -> RelayCounters:
        return self._totals.setdefault(q, RelayCounters())

    def _fold_relay(self, relay: NotifyRelay) -> None:
        """A relay is about to go: keep what it counted."""
        for q in relay.specs:
            s = relay.stats(q)
            self._total(q).add(RelayCounters(s.kicks, s.interrupts, s.relayed, s.signals, s.polls,
                                             s.relay_kicks))

    def _now(self) -> int:
        return self.fn.clock.now_ns()

    def _begin_migration(self) -> None:
        self._migrations += 1
        self._phase = "logging"
        self._logall_since = self._now()
        self._still_since = None
        self._downtime_ns = 0
        self._last_precopy_s = self._last_downtime_s = None

    def _paused_now(self) -> None:
        self._pauses += 1
        self._phase = "paused"
        if self._still_since is None:
            self._still_since = self._now()

    def _end_still(self) -> None:
        """The rings run again: what they stood still counts as downtime."""
        if self._still_since is not None:
            self._downtime_ns += self._now() - self._still_since
            self._still_since = None
            self._last_downtime_s = self._downtime_ns / 1e9

    def _migration_started(self, run: Running) -> None:
        if self._phase == "switched-over":
            self._end_still()
            self._phase = "restarted"
        if run.setup.features & ids.bit(ids.Feature.LOG_ALL):
            self._begin_migration()
            if run.paused is not None:
                self._paused_now()

    def _migration_stopped(self, run: Running) -> None:
        if not run.setup.features & ids.bit(ids.Feature.LOG_ALL):
            return
        self._switch_overs += 1
        self._phase = "switched-over"
        now = self._now()
        if self._logall_since is not None:
            self._last_precopy_s = (now - self._logall_since) / 1e9
        if self._still_since is None:
            self._still_since = now
        self._last_downtime_s = None

    def stats(self, device: DeviceCounters | None = None) -> VfStats:
        """A snapshot of this VF's counters; ``device``: what the device itself counted, if
        anyone can tell (the simulator's model), merged per queue."""
        run = self.running
        live: dict[int, RelayCounters] = {q: RelayCounters(**vars(c)) for q, c in self._totals.items()}
        broken = self.broken_vrings()
        if run is not None and run.relay is not None:
            for q in run.relay.specs:
                s = run.relay.stats(q)
                live.setdefault(q, RelayCounters()).add(RelayCounters(
                    s.kicks, s.interrupts, s.relayed, s.signals, s.polls, s.relay_kicks))
        if run is not None and run.sw is not None:
            for q, relay in run.sw.queues.items():
                live.setdefault(q, RelayCounters()).pages_logged += relay.pages_logged
        device_queues = device.queues if device is not None else {}
        queues = [QueueStats(index=q, direction="rx" if q % 2 == 0 else "tx",
                             running=run is not None and q in run.queues,
                             relayed_by_sw=run is not None and run.sw is not None and q in run.sw.queues,
                             driver=live.get(q, RelayCounters()), broken=broken.get(q),
                             device=device_queues.get(q))
                  for q in range(self.max_vrings)]
        migration = MigrationStats(
            mode="sw-relay" if self.devargs.sw_live_migration else "hw-logging",
            phase=self._phase, migrations=self._migrations, switch_overs=self._switch_overs,
            pauses=self._pauses, log_marks=self._log_marks, last_precopy_s=self._last_precopy_s,
            last_downtime_s=self._last_downtime_s)
        return VfStats(name=self.name, kind=self.kind, state=self.mode,
                       features=run.setup.features if run is not None else 0,
                       queue_pairs=self.max_queue_pairs, migration=migration, queues=queues,
                       device=device)

    # --- hardware dirty logging --------------------------------------------------------
    def _map_log(self, run: Running) -> tuple[int, int]:
        """DMA-map the log in whole pages; the (IOVA, size) of the log bytes for the VF."""
        area = run.setup.log
        if area is None:
            raise VdpaError(f"{self.name}: LOG_ALL without a log (SET_LOG_BASE never came)")
        page = 4096
        start = area.offset - area.offset % page
        length = -(-(area.offset + area.size - start) // page) * page
        iova = self._iova_window(run, ids.IOVA_LOG_BASE, length, "dirty log")
        try:
            self.fn.dma_map(iova, area.memory, start, length)
        except HalError as err:
            raise VdpaError(f"{self.name}: cannot map the dirty log: {err}") from None
        run.log_mapping = (iova, length)
        return iova + area.offset - start, area.size

    def _unmap_log(self, run: Running) -> None:
        if run.log_mapping:
            try:
                self.fn.dma_unmap(*run.log_mapping)
            except HalError as err:
                log.error("%s: unmapping the dirty log: %s", self.name, err)
            run.log_mapping = None

    def _enable_logging(self, run: Running) -> None:
        iova, size = self._map_log(run)
        try:
            self.hw.enable_logging(iova, size)
        except (HwError, HalError) as err:
            self._unmap_log(run)
            raise VdpaError(f"{self.name}: cannot enable hardware logging: {err}") from None
        self.logging = True
        log.info("%s: hardware dirty logging on (%d bytes of log)", self.name, size)

    def _disable_logging(self, run: Running) -> None:
        if self.logging:
            try:
                self.hw.disable_logging()
            except (HwError, HalError) as err:
                log.error("%s: disabling hardware logging: %s", self.name, err)
        self._unmap_log(run)
        self.logging = False

    # --- host notifiers ----------------------------------------------------------------
    def get_notify_area(self, index: int):
        """The doorbell page QEMU may map into the guest for vring ``index``, or None.

        QEMU maps exactly the page it is given and places it at
        queue_notify_off * multiplier in the guest's notify region, so the page
        must hold this queue's doorbell alone, at its start: the doorbell page
        aligned, and queues a page or more apart (or all on one register,
        multiplier 0).  Anything else would send kicks to another queue's
        doorbell; such VFs keep the eventfd kick relay."""
        run = self.running
        if run is None or index not in run.notify_offsets:
            return None
        offset = run.notify_offsets[index]
        multiplier = self.hw.caps.notify_off_multiplier
        if offset % NOTIFY_PAGE or (multiplier and multiplier < NOTIFY_PAGE):
            return None
        return self.fn.notify_area(self.hw.caps.notify.bar, offset)

    def close(self) -> None:
        self.dev_close()
        self.fn.close()
