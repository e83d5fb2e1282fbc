"""The vDPA driver: the ops a vhost-user back-end calls, and the policy behind them.

One ``VdpaDevice`` per VF.  It owns the VF's DMA mappings (guest memory with
IOVA = GPA, the dirty log at IOVA_LOG_BASE), its MSI-X routing (vector 0 for
config changes, vector 1+i to vring i's call eventfd), the kick relay, and the
live-migration mode.  The back-end gives it a ``VhostDevice`` view (the
negotiated features, guest memory, vrings, the log), as DPDK's vhost library
gives rte_vhost handles to its vDPA drivers.

Where DPDK's driver stops short, this one does not: clearing LOG_ALL (a
cancelled migration) turns logging off and unmaps the log; a second
SET_LOG_BASE re-maps it; errors are returned, not logged and dropped.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Protocol

from hal.api import HalError, PciFunction
from ifcvf import ids
from ifcvf.devargs import Devargs
from ifcvf.hw import HwError, IfcvfHw, QueueConfig, RingState
from ifcvf.notify import NotifyRelay

log = logging.getLogger("ifcvf.vdpa")

PROTOCOL_FEATURES = (
    (1 << 0)     # MQ
    | (1 << 1)   # LOG_SHMFD
    | (1 << 3)   # REPLY_ACK
    | (1 << 5)   # BACKEND_REQ
    | (1 << 10)  # BACKEND_SEND_FD
    | (1 << 11)  # HOST_NOTIFIER
    | (1 << 16)  # STATUS
)

# Features the back-end adds to the VF's own, as DPDK does: the guest announces
# itself after migration (the VF cannot send RARP), QEMU handles the control
# queue and link status itself, and LOG_ALL is what makes migration possible.
EXTRA_FEATURES = (ids.bit(ids.Feature.NET_GUEST_ANNOUNCE) | ids.bit(ids.Feature.NET_CTRL_VQ)
                  | ids.bit(ids.Feature.NET_STATUS) | ids.bit(ids.Feature.PROTOCOL_FEATURES)
                  | ids.bit(ids.Feature.LOG_ALL))

# Bits that mean something to vhost-user only, never to the VF.
VHOST_ONLY = ids.bit(ids.Feature.LOG_ALL) | ids.bit(ids.Feature.PROTOCOL_FEATURES)


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
    memory: object   # HostMemory holding the log
    offset: int      # where the log starts in it
    size: int        # bytes of log


class VhostDevice(Protocol):
    """The back-end's view of one connection, as the driver sees it."""

    features: int
    memory: object   # ifcvf.vhost.memory.GuestMemory

    def vring_views(self) -> list[Vring]: ...

    def log_area(self) -> LogArea | None: ...

    def set_vring_base(self, index: int, last_avail: int, last_used: int) -> None: ...

    def config_changed(self) -> None: ...

    def mark_dirty(self, gpa: int, length: int) -> None: ...


@dataclass
class Running:
    """What exists while the datapath runs; torn down in reverse."""

    dev: VhostDevice
    mapped: list[tuple[int, int]] = field(default_factory=list)
    config_fd: int = -1
    relay: NotifyRelay | None = None
    queues: dict[int, QueueConfig] = field(default_factory=dict)
    notify_offsets: dict[int, int] = field(default_factory=dict)
    log_mapping: tuple[int, int] | None = None


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
        log.info("%s: %s, %d queue pairs, LM block: %s", self.name, self.kind, self.max_queue_pairs,
                 "yes" if self.hw.has_lm_block else f"no ({self.hw.lm_absent_reason})")

    # --- what the back-end asks at connect time -------------------------------
    def get_features(self) -> int:
        return self.features

    def get_protocol_features(self) -> int:
        return PROTOCOL_FEATURES

    def get_queue_num(self) -> int:
        return self.max_queue_pairs

    @property
    def max_vrings(self) -> int:
        return 2 * self.max_queue_pairs

    # --- dev_conf / dev_close ----------------------------------------------------
    def dev_conf(self, dev: VhostDevice) -> None:
        """Start the datapath for every enabled vring; on failure undo everything."""
        if self.running:
            raise VdpaError(f"{self.name}: already configured")
        run = Running(dev)
        self.running = run
        try:
            self._start(run)
        except (HwError, HalError, VdpaError, OSError, ValueError) as err:
            self._teardown(run, save_state=False)
            self.running = None
            raise VdpaError(f"{self.name}: cannot configure the VF: {err}") from None

    def _start(self, run: Running) -> None:
        dev = run.dev
        for region in dev.memory.regions:
            self.fn.dma_map(region.gpa, region.mapping, region.mmap_offset, region.size)
            run.mapped.append((region.gpa, region.size))
        vrings = [v for v in dev.vring_views() if v.index < self.max_vrings]
        run.config_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._route_msix(run, vrings)
        run.queues = {v.index: self._queue_config(v) for v in vrings if v.enabled}
        self.hw.start(dev.features & ~VHOST_ONLY, list(run.queues.values()),
                      mq_pairs=self._enabled_pairs(run))
        run.notify_offsets = {q: self.hw.notify_offset(q) for q in range(self.max_vrings)}
        self._start_relay(run, vrings)
        if dev.features & ids.bit(ids.Feature.LOG_ALL):
            self._enable_logging(run)
        log.info("%s: datapath up, vrings %s", self.name, sorted(run.queues))

    def _queue_config(self, v: Vring) -> QueueConfig:
        return QueueConfig(v.index, v.size, v.desc, v.avail, v.used, v.last_avail, v.last_used,
                           ids.MSIX_QUEUE_VECTOR_BASE + v.index)

    def _route_msix(self, run: Running, vrings: list[Vring]) -> None:
        count = 1 + max((v.index + 1 for v in vrings), default=0)
        fds = [-1] * count
        fds[ids.MSIX_CONFIG_VECTOR] = run.config_fd
        for v in vrings:
            fds[ids.MSIX_QUEUE_VECTOR_BASE + v.index] = v.call_fd
        if count > self.fn.msix_vectors():
            raise VdpaError(f"{self.name}: {count} MSI-X vectors needed, the VF has {self.fn.msix_vectors()}")
        self.fn.set_msix(fds)

    def _enabled_pairs(self, run: Running) -> int:
        return len({q // 2 for q in run.queues})

    def _start_relay(self, run: Running, vrings: list[Vring]) -> None:
        kicks = {v.index: v.kick_fd for v in vrings if v.kick_fd >= 0}
        offsets = run.notify_offsets
        run.relay = NotifyRelay(f"{self.name}-notify", kicks,
                                doorbell=lambda q: self.hw.kick(q, offsets[q]),
                                config_fd=run.config_fd, on_config=run.dev.config_changed)
        self.fn.start_poller(run.relay)

    def dev_close(self) -> None:
        """Stop the datapath, save every ring's state into the vhost device, unmap."""
        run = self.running
        if run is None:
            return
        self.running = None
        self._teardown(run, save_state=True)
        log.info("%s: datapath down", self.name)

    def _teardown(self, run: Running, *, save_state: bool) -> None:
        if run.relay:
            self.fn.stop_poller(run.relay)
            run.relay.close()
            run.relay = None
        errors = []
        try:
            states = self.hw.stop(sorted(run.queues))
        except (HwError, HalError) as err:
            errors.append(str(err))
            states = {}
            try:
                self.hw.reset()
            except (HwError, HalError) as err2:
                errors.append(str(err2))
        if save_state:
            for q in sorted(run.queues):
                state = states.get(q) or self._state_from_used_ring(run, q)
                run.dev.set_vring_base(q, state.last_avail, state.last_used)
        if self.logging:
            self._disable_logging(run)
            if save_state:
                self._mark_used_rings_dirty(run)
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
        view = run.dev.memory.view(queue.used + 2, 2)
        used = int.from_bytes(view, "little")
        return RingState(used, used, used)

    def _mark_used_rings_dirty(self, run: Running) -> None:
        # IFCVF logs packet buffers only; the used rings it wrote are ours to log.
        for v in run.dev.vring_views():
            if v.index in run.queues:
                run.dev.mark_dirty(v.log_gpa, 6 + 8 * v.size)

    def running_vrings(self) -> list[int]:
        return sorted(self.running.queues) if self.running else []

    # --- runtime changes ---------------------------------------------------------
    def vring_fds_changed(self, dev: VhostDevice) -> None:
        """A kick or call eventfd was replaced while running: re-route vectors and kicks."""
        run = self.running
        if run is None:
            return
        vrings = [v for v in dev.vring_views() if v.index < self.max_vrings]
        if run.relay:
            self.fn.stop_poller(run.relay)
            run.relay.close()
            run.relay = None
        try:
            self._route_msix(run, vrings)
            self._start_relay(run, vrings)
        except HalError as err:
            raise VdpaError(f"{self.name}: re-routing eventfds: {err}") from None

    def set_vring_state(self, index: int, enable: bool) -> None:
        """SET_VRING_ENABLE while configured: start or stop one queue (the guest's ethtool -L)."""
        if not 0 <= index < self.max_vrings:
            raise VdpaError(f"{self.name}: vring {index} out of range (0..{self.max_vrings - 1})")
        run = self.running
        if run is None:
            return
        if enable == (index in run.queues):
            return
        if not self.hw.has_stop_command:
            raise VdpaError(f"{self.name}: the function cannot start or stop single queues "
                            "(no IFCVF stop command); re-negotiate instead")
        try:
            if enable:
                vring = next((v for v in run.dev.vring_views() if v.index == index), None)
                if vring is None:
                    raise VdpaError(f"{self.name}: vring {index} is not set up")
                config = self._queue_config(vring)
                run.queues[index] = config
                self.hw.set_mq(self._enabled_pairs(run))
                self.hw.enable_queue(config)
            else:
                state = self.hw.stop_queue(index)
                del run.queues[index]
                self.hw.set_mq(self._enabled_pairs(run))
                run.dev.set_vring_base(index, state.last_avail, state.last_used)
        except (HwError, HalError) as err:
            raise VdpaError(f"{self.name}: vring {index}: {err}") from None

    def set_features(self, features: int) -> None:
        """Called after every SET_FEATURES: LOG_ALL on or off changes the logging mode."""
        run = self.running
        want = bool(features & ids.bit(ids.Feature.LOG_ALL))
        if run is None or want == self.logging:
            return
        if want:
            self._enable_logging(run)
        else:
            self._disable_logging(run)

    def log_base_changed(self) -> None:
        """A new SET_LOG_BASE while logging: move the hardware to the new log."""
        run = self.running
        if run is not None and self.logging:
            self._disable_logging(run)
            self._enable_logging(run)

    # --- hardware dirty logging --------------------------------------------------------
    def _enable_logging(self, run: Running) -> None:
        if self.devargs.sw_live_migration:
            raise VdpaError(f"{self.name}: software-assisted migration is not available yet")
        area = run.dev.log_area()
        if area is None:
            raise VdpaError(f"{self.name}: LOG_ALL without a log (SET_LOG_BASE never came)")
        page = 4096
        start = area.offset - area.offset % page
        length = -(-(area.offset + area.size - start) // page) * page
        try:
            self.fn.dma_map(ids.IOVA_LOG_BASE, area.memory, start, length)
        except HalError as err:
            raise VdpaError(f"{self.name}: cannot map the dirty log: {err}") from None
        run.log_mapping = (ids.IOVA_LOG_BASE, length)
        try:
            self.hw.enable_logging(ids.IOVA_LOG_BASE + area.offset - start, area.size)
        except (HwError, HalError) as err:
            self.fn.dma_unmap(*run.log_mapping)
            run.log_mapping = None
            raise VdpaError(f"{self.name}: cannot enable hardware logging: {err}") from None
        self.logging = True
        log.info("%s: hardware dirty logging on (%d bytes of log)", self.name, area.size)

    def _disable_logging(self, run: Running) -> None:
        self.hw.disable_logging()
        if run.log_mapping:
            self.fn.dma_unmap(*run.log_mapping)
            run.log_mapping = None
        self.logging = False
        log.info("%s: hardware dirty logging off", self.name)

    # --- host notifiers ----------------------------------------------------------------
    def get_notify_area(self, index: int):
        run = self.running
        if run is None or index not in run.notify_offsets:
            return None
        return self.fn.notify_area(self.hw.caps.notify.bar, run.notify_offsets[index])

    def close(self) -> None:
        self.dev_close()
        self.fn.close()
