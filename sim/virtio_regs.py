"""Virtio 1.x numbers the simulated device implements, owned by the model.

These are written from the virtio specification and the IFCVF register
reference, not imported from the driver: if the driver gets one wrong, the
model disagrees with it and a test fails.
"""
from __future__ import annotations

# --- feature bits (virtio 1.x, 6.x and 5.1.3) ---------------------------------
F_NET_MTU = 3
F_NET_MAC = 5
F_NET_MRG_RXBUF = 15
F_NET_STATUS = 16
F_NET_CTRL_VQ = 17
F_NET_CTRL_RX = 18
F_NET_CTRL_VLAN = 19
F_NET_GUEST_ANNOUNCE = 21
F_NET_MQ = 22
F_NET_CTRL_MAC_ADDR = 23
F_NET_CSUM = 0
F_NET_GUEST_CSUM = 1
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_ORDER_PLATFORM = 36


def feature_mask(*bits: int) -> int:
    """The 64-bit feature word with exactly ``bits`` set."""
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    return mask


# --- device_status bits (virtio 1.x 2.1) ---------------------------------------
STATUS_ACKNOWLEDGE = 0x01
STATUS_DRIVER = 0x02
STATUS_DRIVER_OK = 0x04
STATUS_FEATURES_OK = 0x08
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80
# Bits the driver may set; DEVICE_NEEDS_RESET is set by the device only.
STATUS_DRIVER_BITS = (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK
                      | STATUS_FEATURES_OK | STATUS_FAILED)
STATUS_ALL_BITS = STATUS_DRIVER_BITS | STATUS_DEVICE_NEEDS_RESET

NO_VECTOR = 0xFFFF

# --- common configuration structure offsets (virtio 1.x 4.1.4.3) ---------------
# name -> (offset, width in bytes)
COMMON_REGISTERS: dict[str, tuple[int, int]] = {
    "device_feature_select": (0x00, 4),
    "device_feature": (0x04, 4),
    "guest_feature_select": (0x08, 4),
    "guest_feature": (0x0C, 4),
    "msix_config": (0x10, 2),
    "num_queues": (0x12, 2),
    "device_status": (0x14, 1),
    "config_generation": (0x15, 1),
    "queue_select": (0x16, 2),
    "queue_size": (0x18, 2),
    "queue_msix_vector": (0x1A, 2),
    "queue_enable": (0x1C, 2),
    "queue_notify_off": (0x1E, 2),
    "queue_desc_lo": (0x20, 4),
    "queue_desc_hi": (0x24, 4),
    "queue_avail_lo": (0x28, 4),
    "queue_avail_hi": (0x2C, 4),
    "queue_used_lo": (0x30, 4),
    "queue_used_hi": (0x34, 4),
}
COMMON_CFG_SIZE = 0x38

# --- ISR bits (virtio 1.x 4.1.4.5) ---------------------------------------------
ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

# --- virtio-net device configuration (virtio 1.x 5.1.4) -------------------------
NET_CFG_MAC = 0x00          # 6 bytes
NET_CFG_STATUS = 0x06       # u16
NET_CFG_MAX_VQ_PAIRS = 0x08  # u16
NET_CFG_MTU = 0x0A          # u16
NET_CFG_SIZE = 0x0C
NET_S_LINK_UP = 0x1
NET_S_ANNOUNCE = 0x2

# --- virtio PCI vendor capability (virtio 1.x 4.1.4) -----------------------------
PCI_CAP_ID_VNDR = 0x09
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
VIRTIO_PCI_CAP_LEN = 16          # {vndr, next, len, cfg_type, bar, pad[3], offset, length}
VIRTIO_PCI_NOTIFY_CAP_LEN = 20   # + notify_off_multiplier u32
VIRTIO_PCI_CFG_CAP_LEN = 20      # + pci_cfg_data[4]
