"""What the driver knows about IFCVF and virtio: IDs, feature bits, offsets.

Written from the register reference, independently of the device model in
``sim`` (a wrong constant here is caught by the model instead of mirrored).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

VIRTIO_VENDOR = 0x1AF4
INTEL_VENDOR = 0x8086


@dataclass(frozen=True)
class IdEntry:
    device: int
    subsystem_vendor: int
    subsystem_device: int
    name: str


# The IDs DPDK's IFCVF driver matches (vendor 1AF4, subsystem vendor 8086).
ID_TABLE = (
    IdEntry(0x1041, INTEL_VENDOR, 0x001A, "IFCVF net (N3000)"),
    IdEntry(0x1000, INTEL_VENDOR, 0x0001, "IFCVF net, transitional (C5000X-PL/F2000X-PL)"),
    IdEntry(0x1001, INTEL_VENDOR, 0x0002, "IFCVF blk, transitional"),
    IdEntry(0x1042, INTEL_VENDOR, 0x0002, "IFCVF blk"),
    IdEntry(0x1042, INTEL_VENDOR, 0x0000, "IFCVF blk, default subsystem"),
)

VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2


def match_ifcvf(vendor: int, device: int, subsystem_vendor: int, subsystem_device: int) -> IdEntry | None:
    if vendor != VIRTIO_VENDOR:
        return None
    for entry in ID_TABLE:
        if (entry.device, entry.subsystem_vendor, entry.subsystem_device) == (
                device, subsystem_vendor, subsystem_device):
            return entry
    return None


def virtio_device_type(device: int, subsystem_device: int) -> int | None:
    """The virtio device type of a virtio PCI function, per the PCI ID rules; None if not virtio."""
    if not 0x1000 <= device <= 0x107F:
        return None
    return subsystem_device if device < 0x1040 else device - 0x1040


def is_virtio_net(vendor: int, device: int, subsystem_device: int) -> bool:
    return vendor == VIRTIO_VENDOR and virtio_device_type(device, subsystem_device) == VIRTIO_ID_NET


class Feature(IntEnum):
    """Virtio (and vhost) feature bit numbers."""

    NET_CSUM = 0
    NET_GUEST_CSUM = 1
    NET_MTU = 3
    NET_MAC = 5
    NET_MRG_RXBUF = 15
    NET_STATUS = 16
    NET_CTRL_VQ = 17
    NET_GUEST_ANNOUNCE = 21
    NET_MQ = 22
    LOG_ALL = 26            # vhost: dirty logging requested (live migration)
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    PROTOCOL_FEATURES = 30  # vhost-user: reuses the legacy UNUSED bit
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    RING_RESET = 40


def bit(feature: int) -> int:
    return 1 << int(feature)


def feature_names(features: int) -> list[str]:
    names = []
    for n in range(64):
        if features >> n & 1:
            try:
                names.append(Feature(n).name)
            except ValueError:
                names.append(f"bit{n}")
    return names


class Status(IntEnum):
    RESET = 0x00
    ACKNOWLEDGE = 0x01
    DRIVER = 0x02
    DRIVER_OK = 0x04
    FEATURES_OK = 0x08
    NEEDS_RESET = 0x40
    FAILED = 0x80


NO_VECTOR = 0xFFFF
MAX_QUEUE_PAIRS = 32

# Virtio PCI vendor capability (cap_vndr 0x09) cfg_type values.
CAP_COMMON = 1
CAP_NOTIFY = 2
CAP_ISR = 3
CAP_DEVICE = 4
CAP_PCI_CFG = 5
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11


class Common(IntEnum):
    """virtio_pci_common_cfg offsets."""

    DEVICE_FEATURE_SELECT = 0x00
    DEVICE_FEATURE = 0x04
    GUEST_FEATURE_SELECT = 0x08
    GUEST_FEATURE = 0x0C
    MSIX_CONFIG = 0x10
    NUM_QUEUES = 0x12
    DEVICE_STATUS = 0x14
    CONFIG_GENERATION = 0x15
    QUEUE_SELECT = 0x16
    QUEUE_SIZE = 0x18
    QUEUE_MSIX_VECTOR = 0x1A
    QUEUE_ENABLE = 0x1C
    QUEUE_NOTIFY_OFF = 0x1E
    QUEUE_DESC = 0x20
    QUEUE_AVAIL = 0x28
    QUEUE_USED = 0x30


COMMON_CFG_SIZE = 0x38


class NetConfig(IntEnum):
    """virtio_net_config offsets."""

    MAC = 0
    STATUS = 6
    MAX_VIRTQUEUE_PAIRS = 8
    MTU = 10


# The IFCVF live-migration block at the start of BAR 4 (DPDK's layout).
LM_BAR = 4
LM_LOGGING_CTRL = 0x00
LM_BASE_LOW = 0x10
LM_BASE_HIGH = 0x14
LM_END_LOW = 0x18
LM_END_HIGH = 0x1C
LM_RING_STATE = 0x20
LM_QUEUE_PAIR_STRIDE = 0x40
LM_MQ = 0x28
LM_LOGGING_OFF = 0x0
LM_LOGGING_ON_VF = 0x1


def lm_ring_state_offset(qid: int) -> int:
    """Net: RX (even) at +0, TX (odd) at +4 of its queue pair's 0x40 block."""
    return LM_RING_STATE + (qid // 2) * LM_QUEUE_PAIR_STRIDE + (qid % 2) * 4


# IOVA windows the driver uses next to guest memory (IOVA = GPA below them).
IOVA_LOG_BASE = 0x1000_0000_0000
IOVA_MEDIATED_RINGS = 0x2000_0000_0000

# MSI-X: vector 0 for config changes, vector 1 + i for vring i.
MSIX_CONFIG_VECTOR = 0
MSIX_QUEUE_VECTOR_BASE = 1
