"""Every parameter of one simulated IFCVF function, in one frozen dataclass.

Defaults describe the IFCVF net VF the DPDK driver was written for (reference
ifcvf-hw.md section 1); ``IfcvfConfig.qemu_virtio_net()`` describes QEMU 7.2's
virtio-net-pci (disable-legacy=on, iommu_platform=on) so the same model can
stand in for the device a guest sees under a nested set-up.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sim import virtio_regs as vr

MAX_QUEUE_PAIRS = 32        # IFCVF_MAX_QUEUES (reference 1.5)
MAX_QUEUE_SIZE = 32768      # virtio 1.x split-ring limit (2.7 / kernel IFCVF_QUEUE_MAX)
LAYOUTS = ("ifcvf", "qemu")
# The MSI-X table occupies at most 0x800 bytes in both layouts (table then PBA
# 0x800 further on), so at most 0x800 / 16 entries fit.
MAX_MSIX_VECTORS = 0x800 // 16
# QEMU's notify region is 0x1000 bytes (VIRTIO_QUEUE_MAX 1024 queues x 4).
QEMU_NOTIFY_REGION = 0x1000

DEFAULT_DEVICE_FEATURES = vr.feature_mask(
    vr.F_VERSION_1, vr.F_ACCESS_PLATFORM, vr.F_ORDER_PLATFORM,
    vr.F_NET_MAC, vr.F_NET_MTU, vr.F_NET_STATUS, vr.F_NET_MRG_RXBUF,
    vr.F_NET_CTRL_VQ, vr.F_NET_MQ, vr.F_INDIRECT_DESC, vr.F_EVENT_IDX)

# QEMU 7.2 virtio-net-pci offers a superset of the net bits; the ones listed are
# the ones a vDPA test cares about.  QEMU never offers ORDER_PLATFORM.
QEMU_DEVICE_FEATURES = (
    (DEFAULT_DEVICE_FEATURES & ~vr.feature_mask(vr.F_ORDER_PLATFORM))
    | vr.feature_mask(vr.F_NET_CSUM, vr.F_NET_GUEST_CSUM, vr.F_NET_CTRL_RX,
                      vr.F_NET_CTRL_VLAN, vr.F_NET_GUEST_ANNOUNCE, vr.F_NET_CTRL_MAC_ADDR))


class ConfigError(ValueError):
    """An IfcvfConfig field holds a value the device cannot have."""


@dataclass(frozen=True)
class IfcvfConfig:
    """One simulated IFCVF PCI function.  All times are in nanoseconds."""

    vendor_id: int = 0x1AF4
    """PCI vendor: Red Hat/virtio; IFCVF presents itself as a virtio device (ref 1.1)."""
    device_id: int = 0x1041
    """0x1040 + VIRTIO_ID_NET: modern net (IFCVF_NET_MODERN_DEVICE_ID, ref 1.1)."""
    subsystem_vendor_id: int = 0x8086
    """Intel, in every IFCVF ID table entry (ref 1.1)."""
    subsystem_device_id: int = 0x001A
    """IFCVF_SUBSYS_DEVICE_ID, the N3000 net VF (ref 1.1)."""
    revision: int = 1
    """Revision ID; virtio 1.x asks for >= 1 on modern-only devices (4.1.2.1)."""
    class_code: int = 0x020000
    """Network controller / Ethernet; DPDK matches any class (ref 1.1)."""
    queue_pairs: int = 4
    """RX/TX pairs.  num_queues = 2*queue_pairs + 1: "ifc device always has CTRL_VQ" (ref 3.2)."""
    max_queue_size: int = 1024
    """queue_size read before the driver writes one; a power of two <= 32768 (virtio 2.7)."""
    device_features: int = DEFAULT_DEVICE_FEATURES
    """Offered features: VERSION_1, ACCESS_PLATFORM, ORDER_PLATFORM, MAC, MTU, STATUS,
    MRG_RXBUF, CTRL_VQ, MQ, INDIRECT_DESC, EVENT_IDX (what DPDK's IFCVF passes through, ref 5)."""
    require_access_platform: bool = False
    """Refuse FEATURES_OK without ACCESS_PLATFORM.  False for IFCVF: DPDK clears bit 33 from
    what it advertises and real cards run without it (ref 5); True for QEMU iommu_platform=on."""
    mac: bytes = bytes.fromhex("525400000001")
    """Device config mac[6] (virtio-net 5.1.4); a locally administered address."""
    mtu: int = 1500
    """Device config mtu (virtio-net 5.1.4); 1500 = Ethernet, as vdpa_sim_net (ref 6.2)."""
    link_up: bool = True
    """Initial VIRTIO_NET_S_LINK_UP in the device config status field."""
    msix_vectors: int | None = None
    """MSI-X table size; None means 2*queue_pairs + 2: one for config changes plus one per
    queue including the control vq (DPDK uses vector 0 for config, 1+i for vring i, ref 3.5)."""
    notify_off_multiplier: int = 0x1000
    """Doorbell stride: one 4 KiB page per queue so QEMU host notifiers can mmap each
    doorbell on its own (DPDK reports a 0x1000 notify area, ref 1.5)."""
    mmio_read_ns: int = 1000
    """Round trip of a non-posted MMIO read over PCIe; the HAL advances the world by it."""
    doorbell_ns: int = 200
    """Posted doorbell write until the queue engine sees the kick."""
    reset_ns: int = 50_000
    """Writing device_status = 0 until it reads 0 (DPDK polls in 1 ms steps, ref 3.8)."""
    queue_stop_ns: int = 5_000
    """Minimum time from the queue_enable = 0 stop command to its acknowledgement."""
    msix_ns: int = 500
    """Interrupt raised until the MSI-X message lands."""
    reset_never_completes: bool = False
    """Fault knob: device_status never reads 0 after a reset."""
    stop_never_acks: bool = False
    """Fault knob: queue_enable keeps reading 1 after the stop command."""
    layout: str = "ifcvf"
    """BAR layout: "ifcvf" (BAR0 config/MSI-X, BAR2 doorbells, BAR4 LM block) or "qemu"
    (BAR1 MSI-X, BAR4 virtio structures, no LM block); see sim.layout."""

    # --- datapath (sim/engines.py, sim/pcie_link.py, sim/wire.py) ----------------------
    # Every number below is a default with its source; sim/engines.py explains the model.
    pcie_gen: int = 3
    """PCIe generation of the VF's link: 3 = 8 GT/s per lane, 128b/130b coding (N3000: Gen3)."""
    pcie_lanes: int = 16
    """Link width: x16 = 15.75 GB/s per direction after coding (perf.md section 2)."""
    pcie_mps: int = 256
    """Max payload size: write TLPs and read completions carry at most this (256 is what
    Xeon root ports commonly grant; pcie-bench's model default)."""
    pcie_mrrs: int = 512
    """Max read request size: DMA reads are split into requests of at most this (Linux default)."""
    pcie_rcb: int = 64
    """Read completion boundary of the root complex (64 B on x86)."""
    pcie_completions_at_rcb: bool = False
    """Completers split read data at every RCB (64 B completions, some Intel root complexes)
    instead of at MPS-aligned boundaries (pcie-bench's default assumption)."""
    pcie_read_latency_ns: int = 500
    """DMA read round trip, request out to first completion in: ~0.5 us for small reads on
    Xeon servers (Neugebauer et al., "Understanding PCIe performance for end host
    networking", SIGCOMM'18)."""
    pcie_write_latency_ns: int = 250
    """Posted DMA write until it is visible in host memory: half the read latency (Intel TCC
    guide: "PCIe-to-memory stream latency is estimated to be equivalent to half of the
    PCIe-from-memory stream latency")."""
    kick_to_fetch_ns: int = 20
    """Doorbell landed (after doorbell_ns) until the engine issues its first read: 5 cycles
    of the 250 MHz queue scheduler (assumption)."""
    engine_batch: int = 64
    """Descriptor prefetch batch: at most this many avail entries per engine round."""
    engine_fetch_depth: int = 4
    """Rounds of one queue whose descriptor fetch may be in flight at once (outstanding
    reads per queue; assumption, enough to hide 3 read round trips at 100G)."""
    tx_buffer_bytes: int = 65536
    """On-device TX buffer between the DMA engine and the MAC: the engine stops fetching when
    the wire backlog would exceed it (assumption: 64 KiB of FPGA block RAM)."""
    rx_fifo_bytes: int = 131072
    """Per-RX-queue on-device FIFO for frames waiting for a buffer; frames beyond it are
    dropped and counted (assumption: ~10 us of 100G)."""
    wire_gbps: int = 100
    """Line rate of the VF's port (Intel FPGA PAC N3000: 100 GbE)."""
    dirty_log_skip_fraction: float = 0.0
    """Negative control for the dirty-log checker: the device skips this fraction of its
    dirty-page marks (drawn from world.rng) and records which pages it skipped."""

    def __post_init__(self) -> None:
        if self.msix_vectors is None:
            object.__setattr__(self, "msix_vectors", 2 * self.queue_pairs + 2)
        _check_int(self, "vendor_id", 0, 0xFFFF)
        _check_int(self, "device_id", 0, 0xFFFF)
        _check_int(self, "subsystem_vendor_id", 0, 0xFFFF)
        _check_int(self, "subsystem_device_id", 0, 0xFFFF)
        _check_int(self, "revision", 0, 0xFF)
        _check_int(self, "class_code", 0, 0xFFFFFF)
        _check_int(self, "queue_pairs", 1, MAX_QUEUE_PAIRS)
        _check_int(self, "max_queue_size", 1, MAX_QUEUE_SIZE)
        if not _is_power_of_two(self.max_queue_size):
            _fail("max_queue_size", self.max_queue_size, "a power of two <= 32768")
        _check_int(self, "device_features", 0, (1 << 64) - 1)
        if not isinstance(self.mac, (bytes, bytearray)) or len(self.mac) != 6:
            _fail("mac", self.mac, "exactly 6 bytes")
        object.__setattr__(self, "mac", bytes(self.mac))
        _check_int(self, "mtu", 68, 0xFFFF)
        _check_int(self, "msix_vectors", 1, MAX_MSIX_VECTORS)
        _check_int(self, "notify_off_multiplier", 0, 1 << 20)
        if self.notify_off_multiplier and (not _is_power_of_two(self.notify_off_multiplier)
                                           or self.notify_off_multiplier < 2):
            _fail("notify_off_multiplier", self.notify_off_multiplier,
                  "0 or an even power of two (virtio 4.1.4.4)")
        for name in ("mmio_read_ns", "doorbell_ns", "reset_ns", "queue_stop_ns", "msix_ns"):
            _check_int(self, name, 0, 10**12)
        _check_int(self, "pcie_gen", 1, 5)
        if self.pcie_lanes not in (1, 2, 4, 8, 16, 32):
            _fail("pcie_lanes", self.pcie_lanes, "1, 2, 4, 8, 16 or 32")
        for name, allowed in (("pcie_mps", (128, 256, 512, 1024, 2048, 4096)),
                              ("pcie_mrrs", (128, 256, 512, 1024, 2048, 4096)),
                              ("pcie_rcb", (64, 128))):
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), ", ".join(str(a) for a in allowed))
        for name in ("pcie_read_latency_ns", "pcie_write_latency_ns", "kick_to_fetch_ns"):
            _check_int(self, name, 0, 10**9)
        _check_int(self, "engine_batch", 1, MAX_QUEUE_SIZE)
        _check_int(self, "engine_fetch_depth", 1, 64)
        _check_int(self, "tx_buffer_bytes", 1, 1 << 30)
        _check_int(self, "rx_fifo_bytes", 0, 1 << 30)
        _check_int(self, "wire_gbps", 1, 1600)
        fraction = self.dirty_log_skip_fraction
        if (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                or not 0.0 <= fraction <= 1.0):
            _fail("dirty_log_skip_fraction", fraction, "a number in [0, 1]")
        for name in ("require_access_platform", "link_up", "reset_never_completes",
                     "stop_never_acks", "pcie_completions_at_rcb"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")
        if self.layout not in LAYOUTS:
            _fail("layout", self.layout, " or ".join(repr(x) for x in LAYOUTS))
        if (self.layout == "qemu"
                and self.num_queues * self.notify_off_multiplier > QEMU_NOTIFY_REGION):
            _fail("notify_off_multiplier", self.notify_off_multiplier,
                  f"at most {QEMU_NOTIFY_REGION // self.num_queues:#x} with layout 'qemu' "
                  f"({self.num_queues} doorbells must fit QEMU's 0x1000-byte notify region)")

    @property
    def num_queues(self) -> int:
        """RX/TX queues plus the control vq."""
        return 2 * self.queue_pairs + 1

    def replace(self, **changes) -> "IfcvfConfig":
        """A copy with some fields changed (validated again)."""
        if "queue_pairs" in changes and "msix_vectors" not in changes:
            changes["msix_vectors"] = None
        return dataclasses.replace(self, **changes)

    @classmethod
    def qemu_virtio_net(cls, **overrides) -> "IfcvfConfig":
        """QEMU 7.2 virtio-net-pci,disable-legacy=on,iommu_platform=on (mq=on).

        Subsystem 1AF4:1100 (QEMU's virtio subsystem IDs), queue size 256 (QEMU's
        rx/tx_queue_size default), doorbells 4 bytes apart in BAR 4, resets that
        complete at once (QEMU resets synchronously in the MMIO handler).
        """
        values = dict(
            subsystem_vendor_id=0x1AF4, subsystem_device_id=0x1100,
            max_queue_size=256, device_features=QEMU_DEVICE_FEATURES,
            require_access_platform=True, notify_off_multiplier=4,
            reset_ns=0, queue_stop_ns=0, layout="qemu")
        values.update(overrides)
        return cls(**values)


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _fail(name: str, value, allowed: str) -> None:
    shown = f"{value:#x}" if isinstance(value, int) and not isinstance(value, bool) else repr(value)
    raise ConfigError(f"IfcvfConfig.{name} = {shown} is invalid: allowed is {allowed}")


def _check_int(config: IfcvfConfig, name: str, low: int, high: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        _fail(name, value, f"an integer in [{low:#x}, {high:#x}]")

