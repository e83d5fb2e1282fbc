"""The driver's register layer: one class over one IFCVF PCI function.

Everything here is a sequence of config-space and exact-width MMIO accesses
through the HAL; every wait goes through the HAL clock with a timeout.  The
policy (which queues, which features, when) belongs to ``ifcvf.vdpa``.

Start and stop follow the sequences IFCVF hardware expects (reference §3.8,
§3.9): reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK check, MQ register,
per-queue programming including the LM ring-state word, DRIVER_OK; and for
stop: vectors off, ``queue_enable = 0`` as IFCVF's stop command, wait for the
queue to report disabled, only then read the ring state, reset.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from hal.api import HalError, HalTimeout, MmioRegion, PciFunction
from ifcvf import ids
from ifcvf.ids import Common, Status

log = logging.getLogger("ifcvf.hw")


class HwError(Exception):
    """The function does not behave as the driver needs; the message says how."""


class CapabilityError(HwError):
    """The PCI capability list is missing something or points outside the function."""


@dataclass(frozen=True)
class Timeouts:
    """How long the driver waits for the hardware (nanoseconds).

    DPDK polls reset without a timeout and the queue-stop handshake for 10 x
    10 ms; we give both a bound and a clear error instead of a hang.
    """

    reset_ns: int = 1_000_000_000
    queue_stop_ns: int = 100_000_000
    poll_interval_ns: int = 10_000
    config_generation_retries: int = 16


@dataclass(frozen=True)
class CapWindow:
    """Where one virtio structure lives: a BAR, an offset and a length."""

    cfg_type: int
    bar: int
    offset: int
    length: int
    cap_offset: int  # position in config space, for error messages


@dataclass(frozen=True)
class VirtioCaps:
    common: CapWindow
    notify: CapWindow
    notify_off_multiplier: int
    isr: CapWindow
    device: CapWindow
    pci_cfg: int | None       # config-space offset of the PCI-cfg access capability
    msix_table_size: int      # 0 when the function has no MSI-X capability
    bars_used: frozenset[int]  # every BAR a virtio capability points into


class Window:
    """A bounded view of an MMIO region: accesses outside [0, length) are driver bugs."""

    def __init__(self, region: MmioRegion, cap: CapWindow):
        self.region = region
        self.base = cap.offset
        self.length = cap.length
        self.name = {1: "common", 2: "notify", 3: "ISR", 4: "device"}.get(cap.cfg_type, "LM")

    def _at(self, offset: int, width: int) -> int:
        if offset < 0 or offset + width > self.length:
            raise HwError(f"{self.name} config access at {offset:#x} (+{width}) is outside its "
                          f"{self.length:#x}-byte structure")
        return self.base + offset

    def read8(self, off: int) -> int:
        return self.region.read8(self._at(off, 1))

    def read16(self, off: int) -> int:
        return self.region.read16(self._at(off, 2))

    def read32(self, off: int) -> int:
        return self.region.read32(self._at(off, 4))

    def write8(self, off: int, v: int) -> None:
        self.region.write8(self._at(off, 1), v)

    def write16(self, off: int, v: int) -> None:
        self.region.write16(self._at(off, 2), v)

    def write32(self, off: int, v: int) -> None:
        self.region.write32(self._at(off, 4), v)

    def write64(self, off: int, v: int) -> None:
        self.region.write64(self._at(off, 8), v)


def walk_capabilities(fn: PciFunction) -> VirtioCaps:
    """Find the virtio structures, checking each against the BAR it points into."""
    status = fn.config_read(0x06, 2)
    if not status & 0x10:
        raise CapabilityError(f"{fn.address}: no PCI capability list (status {status:#06x})")
    found: dict[int, CapWindow] = {}
    multiplier = 0
    pci_cfg = None
    msix_size = 0
    bars_used = set()
    pos = fn.config_read(0x34, 1) & 0xFC
    seen = set()
    while pos:
        if pos in seen or len(seen) >= 48:
            raise CapabilityError(f"{fn.address}: PCI capability list loops at {pos:#x}")
        if pos < 0x40 or pos > 0xFC:
            raise CapabilityError(f"{fn.address}: capability pointer {pos:#x} is outside config space")
        seen.add(pos)
        cap_id = fn.config_read(pos, 1)
        nxt = fn.config_read(pos + 1, 1) & 0xFC
        if cap_id == ids.PCI_CAP_ID_MSIX:
            msix_size = (fn.config_read(pos + 2, 2) & 0x7FF) + 1
        elif cap_id == ids.PCI_CAP_ID_VNDR:
            cfg_type = fn.config_read(pos + 3, 1)
            if cfg_type == ids.CAP_PCI_CFG:
                pci_cfg = pos if pci_cfg is None else pci_cfg
            elif cfg_type in (ids.CAP_COMMON, ids.CAP_NOTIFY, ids.CAP_ISR, ids.CAP_DEVICE):
                bar = fn.config_read(pos + 4, 1)
                # The first structure of each type is the one to use (virtio 1.x 4.1.4).
                if cfg_type not in found:
                    cap = CapWindow(cfg_type, bar, fn.config_read(pos + 8, 4),
                                    fn.config_read(pos + 12, 4), pos)
                    _check_window(fn, cap)
                    found[cfg_type] = cap
                    bars_used.add(bar)
                    if cfg_type == ids.CAP_NOTIFY:
                        if fn.config_read(pos + 2, 1) < 20:
                            raise CapabilityError(f"{fn.address}: notify capability at {pos:#x} "
                                                  "is too short to hold notify_off_multiplier")
                        multiplier = fn.config_read(pos + 16, 4)
        pos = nxt
    names = {ids.CAP_COMMON: "common", ids.CAP_NOTIFY: "notify", ids.CAP_ISR: "ISR",
             ids.CAP_DEVICE: "device"}
    missing = [names[t] for t in names if t not in found]
    if missing:
        raise CapabilityError(f"{fn.address}: virtio capabilities incomplete: no {', '.join(missing)} "
                              "configuration structure")
    if found[ids.CAP_COMMON].length < ids.COMMON_CFG_SIZE:
        raise CapabilityError(f"{fn.address}: common configuration is {found[ids.CAP_COMMON].length:#x} "
                              f"bytes, virtio 1.x needs {ids.COMMON_CFG_SIZE:#x}")
    return VirtioCaps(found[ids.CAP_COMMON], found[ids.CAP_NOTIFY], multiplier, found[ids.CAP_ISR],
                      found[ids.CAP_DEVICE], pci_cfg, msix_size, frozenset(bars_used))


def _check_window(fn: PciFunction, cap: CapWindow) -> None:
    kind = {1: "common", 2: "notify", 3: "ISR", 4: "device"}[cap.cfg_type]
    where = f"{fn.address}: {kind} capability at config {cap.cap_offset:#x}"
    if cap.bar > 5:
        raise CapabilityError(f"{where} names BAR {cap.bar}, which cannot exist (0-5)")
    region = fn.region(cap.bar)
    if region is None:
        raise CapabilityError(f"{where} points into BAR {cap.bar}, which the function does not have")
    if cap.offset + cap.length > region.size or cap.length == 0:
        raise CapabilityError(f"{where} spans {cap.offset:#x}+{cap.length:#x}, outside BAR {cap.bar} "
                              f"(size {region.size:#x})")


@dataclass(frozen=True)
class NetConfig:
    mac: bytes
    status: int
    max_virtqueue_pairs: int
    mtu: int

    @property
    def mac_str(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac)


@dataclass(frozen=True)
class QueueConfig:
    """What the driver programs for one queue (addresses are IOVAs = guest-physical)."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    last_avail: int = 0
    last_used: int = 0
    vector: int = ids.NO_VECTOR


@dataclass(frozen=True)
class RingState:
    """A stopped queue's indexes as the hardware reported them.

    ``last_avail`` follows DPDK's net rule: it is the *used* index, so buffers
    the device fetched but did not complete (RX buffers waiting for frames) are
    offered again after a restore; ``hw_avail`` keeps what the device said.
    """

    last_avail: int
    last_used: int
    hw_avail: int


class IfcvfHw:
    """Register-level access to one IFCVF (or virtio-net) function."""

    def __init__(self, fn: PciFunction, timeouts: Timeouts = Timeouts()):
        self.fn = fn
        self.timeouts = timeouts
        self.clock = fn.clock
        self.caps = walk_capabilities(fn)
        self.common = Window(fn.region(self.caps.common.bar), self.caps.common)
        self.isr = Window(fn.region(self.caps.isr.bar), self.caps.isr)
        self.device_cfg = Window(fn.region(self.caps.device.bar), self.caps.device)
        self.notify_region = fn.region(self.caps.notify.bar)
        self.num_queues = self.common.read16(Common.NUM_QUEUES)
        self.lm, self.lm_absent_reason = self._find_lm_block()

    # --- discovery ---------------------------------------------------------------
    def _find_lm_block(self) -> tuple[MmioRegion | None, str]:
        region = self.fn.region(ids.LM_BAR)
        if region is None:
            return None, "the function has no BAR 4"
        if ids.LM_BAR in self.caps.bars_used:
            # QEMU's virtio-net-pci keeps its common configuration in BAR 4:
            # writing LM registers there would clobber queue addresses.
            return None, "BAR 4 holds virtio configuration structures, not an IFCVF live-migration block"
        needed = ids.lm_ring_state_offset(max(self.num_queues, 2) - 1) + 4
        if region.size < needed:
            return None, f"BAR 4 is {region.size:#x} bytes, too small for the live-migration block"
        return region, ""

    @property
    def has_lm_block(self) -> bool:
        return self.lm is not None

    @property
    def queue_pairs(self) -> int:
        """Data queue pairs: IFCVF always has a control queue after them."""
        return max(0, (self.num_queues - 1) // 2)

    def max_queue_size(self, index: int) -> int:
        """The largest ring queue ``index`` supports (0: the queue does not exist)."""
        self.common.write16(Common.QUEUE_SELECT, index)
        return self.common.read16(Common.QUEUE_SIZE)

    def device_features(self) -> int:
        self.common.write32(Common.DEVICE_FEATURE_SELECT, 0)
        lo = self.common.read32(Common.DEVICE_FEATURE)
        self.common.write32(Common.DEVICE_FEATURE_SELECT, 1)
        hi = self.common.read32(Common.DEVICE_FEATURE)
        return lo | hi << 32

    def driver_features(self) -> int:
        self.common.write32(Common.GUEST_FEATURE_SELECT, 0)
        lo = self.common.read32(Common.GUEST_FEATURE)
        self.common.write32(Common.GUEST_FEATURE_SELECT, 1)
        hi = self.common.read32(Common.GUEST_FEATURE)
        return lo | hi << 32

    def _write_driver_features(self, features: int) -> None:
        self.common.write32(Common.GUEST_FEATURE_SELECT, 0)
        self.common.write32(Common.GUEST_FEATURE, features & 0xFFFF_FFFF)
        self.common.write32(Common.GUEST_FEATURE_SELECT, 1)
        self.common.write32(Common.GUEST_FEATURE, features >> 32)

    def net_config(self) -> NetConfig:
        """The device configuration, re-read until config_generation is stable."""
        for _ in range(self.timeouts.config_generation_retries):
            before = self.common.read8(Common.CONFIG_GENERATION)
            mac = bytes(self.device_cfg.read8(ids.NetConfig.MAC + i) for i in range(6))
            status = self.device_cfg.read16(ids.NetConfig.STATUS)
            pairs = self.device_cfg.read16(ids.NetConfig.MAX_VIRTQUEUE_PAIRS)
            mtu = self.device_cfg.read16(ids.NetConfig.MTU) if self.caps.device.length >= 12 else 0
            if self.common.read8(Common.CONFIG_GENERATION) == before:
                return NetConfig(mac, status, pairs, mtu)
        raise HwError(f"{self.fn.address}: device configuration kept changing "
                      f"({self.timeouts.config_generation_retries} reads, config_generation never stable)")

    # --- status ------------------------------------------------------------------
    def status(self) -> int:
        return self.common.read8(Common.DEVICE_STATUS)

    def _add_status(self, bits: int) -> None:
        self.common.write8(Common.DEVICE_STATUS, self.status() | bits)

    def reset(self) -> None:
        """Write 0 and wait until the device reads back 0 (it may take a while)."""
        self.common.write8(Common.DEVICE_STATUS, 0)
        try:
            self.clock.poll_until(lambda: self.status() == 0, self.timeouts.reset_ns,
                                  interval_ns=self.timeouts.poll_interval_ns, what="device reset")
        except HalTimeout as err:
            raise HwError(f"{self.fn.address}: reset did not complete: {err} "
                          f"(device_status still {self.status():#04x})") from None

    # --- start -------------------------------------------------------------------
    def start(self, wanted_features: int, queues: list[QueueConfig], *, mq_pairs: int | None = None,
              log: tuple[int, int] | None = None) -> int:
        """Bring the device to DRIVER_OK with ``queues`` running; returns the features written.

        ``log`` (IOVA, size): dirty logging is on before any queue is enabled,
        so the device writes nothing that goes unlogged.

        The features written are ``wanted & offered``, plus ACCESS_PLATFORM when
        the device offers it: our DMA always goes through the IOMMU, and a
        device that offers it may refuse FEATURES_OK without it.
        """
        self._check_queues(queues)
        self.reset()
        self._add_status(Status.ACKNOWLEDGE)
        self._add_status(Status.DRIVER)
        offered = self.device_features()
        features = wanted_features & offered
        if offered >> ids.Feature.ACCESS_PLATFORM & 1:
            features |= ids.bit(ids.Feature.ACCESS_PLATFORM)
        self._write_driver_features(features)
        self._add_status(Status.FEATURES_OK)
        if not self.status() & Status.FEATURES_OK:
            self.common.write8(Common.DEVICE_STATUS, self.status() | Status.FAILED)
            raise HwError(f"{self.fn.address}: device refused FEATURES_OK for features {features:#x} "
                          f"({', '.join(ids.feature_names(features))}); it offers {offered:#x}")
        self.common.write16(Common.MSIX_CONFIG, ids.MSIX_CONFIG_VECTOR)
        if self.common.read16(Common.MSIX_CONFIG) == ids.NO_VECTOR:
            raise HwError(f"{self.fn.address}: device refused MSI-X vector 0 for configuration changes")
        if self.lm is not None:
            pairs = mq_pairs if mq_pairs is not None else (len(queues) + 1) // 2
            self.lm.write32(ids.LM_MQ, pairs)
        if log is not None:
            self.enable_logging(*log)
        for q in queues:
            self.enable_queue(q)
        self._add_status(Status.DRIVER_OK)
        status = self.status()
        if status & (Status.NEEDS_RESET | Status.FAILED) or not status & Status.DRIVER_OK:
            raise HwError(f"{self.fn.address}: device did not accept DRIVER_OK (status {status:#04x})")
        return features

    def _check_queues(self, queues: list[QueueConfig]) -> None:
        for q in queues:
            if not 0 <= q.index < self.num_queues:
                raise HwError(f"{self.fn.address}: queue {q.index} does not exist "
                              f"(the device has {self.num_queues})")
            if q.size <= 0 or q.size & (q.size - 1):
                raise HwError(f"queue {q.index}: size {q.size} is not a power of two")
            if self.lm is None and (q.last_avail or q.last_used):
                raise HwError(
                    f"queue {q.index}: cannot resume at avail {q.last_avail} / used {q.last_used}: "
                    f"without an IFCVF live-migration block ({self.lm_absent_reason}) a virtio device "
                    "always starts its rings at index 0")

    def enable_queue(self, q: QueueConfig) -> None:
        """Program one queue and enable it (also used while the device runs)."""
        c = self.common
        c.write16(Common.QUEUE_SELECT, q.index)
        max_size = c.read16(Common.QUEUE_SIZE)
        if max_size == 0:
            raise HwError(f"{self.fn.address}: queue {q.index} is not available")
        c.write64(Common.QUEUE_DESC, q.desc)
        c.write64(Common.QUEUE_AVAIL, q.avail)
        c.write64(Common.QUEUE_USED, q.used)
        c.write16(Common.QUEUE_SIZE, q.size)
        if c.read16(Common.QUEUE_SIZE) != q.size:
            raise HwError(f"queue {q.index}: device refused size {q.size} (it supports up to {max_size})")
        if self.lm is not None:
            self.lm.write32(ids.lm_ring_state_offset(q.index), (q.last_avail & 0xFFFF) | (q.last_used & 0xFFFF) << 16)
        c.write16(Common.QUEUE_MSIX_VECTOR, q.vector)
        if q.vector != ids.NO_VECTOR and c.read16(Common.QUEUE_MSIX_VECTOR) != q.vector:
            raise HwError(f"queue {q.index}: device refused MSI-X vector {q.vector}")
        c.write16(Common.QUEUE_ENABLE, 1)

    # --- stop --------------------------------------------------------------------
    @property
    def has_stop_command(self) -> bool:
        """IFCVF stops a queue on ``queue_enable = 0``; a plain virtio device does not
        (QEMU treats the write as a driver error), so there we only reset."""
        return self.lm is not None

    def stop_queue(self, index: int) -> RingState | None:
        """Stop one queue with IFCVF's handshake and read its ring state."""
        if not self.has_stop_command:
            return None
        c = self.common
        c.write16(Common.QUEUE_SELECT, index)
        c.write16(Common.QUEUE_ENABLE, 0)
        state = self._await_stopped(index)
        # Only now: the entries the stop drain completes still interrupt.
        c.write16(Common.QUEUE_SELECT, index)
        c.write16(Common.QUEUE_MSIX_VECTOR, ids.NO_VECTOR)
        return state

    def _await_stopped(self, index: int) -> RingState:
        c = self.common

        def stopped() -> bool:
            c.write16(Common.QUEUE_SELECT, index)
            return c.read16(Common.QUEUE_ENABLE) == 0

        try:
            self.clock.poll_until(stopped, self.timeouts.queue_stop_ns,
                                  interval_ns=self.timeouts.poll_interval_ns,
                                  what=f"queue {index} to acknowledge the stop command")
        except HalTimeout as err:
            raise HwError(f"{self.fn.address}: queue {index} never reported disabled: {err}; "
                          "its ring state would be stale, so it is not read") from None
        word = self.lm.read32(ids.lm_ring_state_offset(index))
        used = word >> 16
        return RingState(last_avail=used, last_used=used, hw_avail=word & 0xFFFF)

    def stop(self, queues: list[int]) -> dict[int, RingState | None]:
        """Stop the device: each queue stopped and its state read, vectors off, reset.

        Without a stop command the ring states are None: the caller takes them
        from the used rings in guest memory.
        """
        c = self.common
        c.write16(Common.MSIX_CONFIG, ids.NO_VECTOR)
        states: dict[int, RingState | None] = {}
        if self.has_stop_command:
            for index in queues:
                c.write16(Common.QUEUE_SELECT, index)
                c.write16(Common.QUEUE_ENABLE, 0)
            for index in queues:
                states[index] = self._await_stopped(index)
            # Only now: the entries the stop drain completes still interrupt,
            # or a guest whose used_event is behind never hears of them.
            for index in queues:
                c.write16(Common.QUEUE_SELECT, index)
                c.write16(Common.QUEUE_MSIX_VECTOR, ids.NO_VECTOR)
        else:
            states = {index: None for index in queues}
        self.reset()
        return states

    # --- logging, kicks ----------------------------------------------------------
    def enable_logging(self, base_iova: int, size: int) -> None:
        if self.lm is None:
            raise HwError(f"{self.fn.address}: no hardware dirty logging: {self.lm_absent_reason}")
        end = base_iova + size
        self.lm.write32(ids.LM_BASE_LOW, base_iova & 0xFFFF_FFFF)
        self.lm.write32(ids.LM_BASE_HIGH, base_iova >> 32)
        self.lm.write32(ids.LM_END_LOW, end & 0xFFFF_FFFF)
        self.lm.write32(ids.LM_END_HIGH, end >> 32)
        self.lm.write32(ids.LM_LOGGING_CTRL, ids.LM_LOGGING_ON_VF)

    def disable_logging(self) -> None:
        if self.lm is not None:
            self.lm.write32(ids.LM_LOGGING_CTRL, ids.LM_LOGGING_OFF)

    def logging_enabled(self) -> bool:
        return self.lm is not None and bool(self.lm.read32(ids.LM_LOGGING_CTRL) & 1)

    def set_mq(self, pairs: int) -> None:
        if self.lm is not None:
            self.lm.write32(ids.LM_MQ, pairs)

    def notify_offset(self, index: int) -> int:
        """Offset of queue ``index``'s doorbell in the notify BAR."""
        self.common.write16(Common.QUEUE_SELECT, index)
        off = self.common.read16(Common.QUEUE_NOTIFY_OFF)
        offset = self.caps.notify.offset + off * self.caps.notify_off_multiplier
        if offset + 2 > self.caps.notify.offset + self.caps.notify.length:
            raise HwError(f"queue {index}: doorbell at {offset:#x} lies outside the notify structure")
        return offset

    def kick(self, index: int, notify_offset: int | None = None) -> None:
        """A 16-bit write of the queue index to its doorbell."""
        offset = self.notify_offset(index) if notify_offset is None else notify_offset
        self.notify_region.write16(offset, index)
