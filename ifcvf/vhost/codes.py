"""vhost-user numbers: request codes, protocol feature bits, header flags, limits.

Numbers come from the vhost-user specification (QEMU docs/interop/vhost-user.rst)
and QEMU 7.2's hw/virtio/vhost-user.c. QEMU 7.2 still spells the back-end channel
``SLAVE_*``; the wire numbers are the same as the current ``BACKEND_*`` names used
here.

Pure data, stdlib only: the simulator's QEMU role imports this too.
"""
from __future__ import annotations

import enum

# --- header -----------------------------------------------------------------

HEADER_SIZE = 12            # request:u32 | flags:u32 | size:u32, native byte order
VERSION = 0x1               # the only protocol version, in flags bits 0-1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4            # set on every back-end reply
FLAG_NEED_REPLY = 0x8       # REPLY_ACK: the sender wants a u64 status back
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY
# QEMU 7.2 (vhost_user_read_header) rejects a reply whose flags are anything but
# exactly VERSION|REPLY: an echoed NEED_REPLY fails with -EPROTO.
REPLY_FLAGS = VERSION | FLAG_REPLY

# --- limits -----------------------------------------------------------------

# sizeof(VhostUserPayload) in QEMU 7.2. The largest union member is
# VhostUserCryptoSession: session_id i64 (8) + CryptoDevBackendSymSessionInfo (48:
# six u32, four u8, pad to 8, two pointers; its op_code moved out in 7.1 with the
# akcipher series) + key[64] + auth_key[512] = 632. The config member is only
# 12 + 256 and the memory table 8 + 8 * 32. Measured, not just derived: QEMU
# 7.2.22 (Debian 12) answers an oversized reply with "Size 100000 exceeds the
# maximum 632." QEMU 8.1+ grew the crypto member (asymmetric keys), so newer
# front-ends accept more; no request a net back-end handles comes near either.
MAX_PAYLOAD_SIZE = 632
MAX_REGIONS = 8             # VHOST_MEMORY_BASELINE_NREGIONS: slots in SET_MEM_TABLE
MAX_FDS = 8                 # fds in one message, either direction (VHOST_USER_BACKEND_MAX_FDS)
MAX_CONFIG_SIZE = 256       # VHOST_USER_MAX_CONFIG_SIZE: device config space cap

# --- u64 payload of SET_VRING_KICK/CALL/ERR and of a vring area --------------

VRING_INDEX_MASK = 0xFF     # bits 0-7: the vring index
VRING_NOFD = 0x100          # bit 8: no fd attached (poll instead)

# --- virtio / vhost feature bits (in GET/SET_FEATURES) -----------------------

F_PROTOCOL_FEATURES = 30    # VHOST_USER_F_PROTOCOL_FEATURES (reuses virtio's UNUSED bit)
F_LOG_ALL = 26              # VHOST_F_LOG_ALL: dirty-log every guest write
VIRTIO_NET_F_MTU = 3
VIRTIO_F_IOMMU_PLATFORM = 33

# Flag value in SET_VRING_ADDR.flags asking for used-ring logging. Linux spells
# the *bit number* VHOST_VRING_F_LOG = 0; on the wire it is 1 << 0.
VRING_F_LOG = 1


class Request(enum.IntEnum):
    """Front-end -> back-end requests (names of the current spec)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21         # QEMU 7.2: SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35                 # reserved in QEMU: it never sends it
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39                 # new in QEMU 7.2
    GET_STATUS = 40                 # new in QEMU 7.2
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44

    @property
    def sent_by_qemu_7_2(self) -> bool:
        return self in QEMU_7_2_REQUESTS


# QEMU 7.2 knows requests 1-40; 35 (VRING_KICK) is reserved and never sent.
QEMU_7_2_REQUESTS = frozenset(r for r in Request if r <= 40 and r != Request.VRING_KICK)


class BackendRequest(enum.IntEnum):
    """Back-end -> front-end requests, on the SET_BACKEND_REQ_FD socket."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


# QEMU 7.2's back-end channel handles only these.
QEMU_7_2_BACKEND_REQUESTS = frozenset({
    BackendRequest.IOTLB_MSG, BackendRequest.CONFIG_CHANGE_MSG,
    BackendRequest.VRING_HOST_NOTIFIER_MSG})


class ProtocolFeature(enum.IntEnum):
    """Protocol feature *bit numbers* (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5                 # QEMU 7.2: SLAVE_REQ
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10            # QEMU 7.2: SLAVE_SEND_FD
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14       # spec only; no front-end implements it
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16                     # new in QEMU 7.2
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    GET_VRING_BASE_INFLIGHT = 20
    SHMEM = 21

    @property
    def mask(self) -> int:
        return 1 << self.value


def protocol_mask(*features: ProtocolFeature) -> int:
    """The u64 bitmask of the given protocol features."""
    mask = 0
    for feature in features:
        mask |= 1 << feature
    return mask


# Protocol features the QEMU 7.2 front-end knows (0-13, 15, 16).
QEMU_7_2_PROTOCOL_FEATURES = protocol_mask(
    *(f for f in ProtocolFeature if f <= ProtocolFeature.STATUS
      and f != ProtocolFeature.INBAND_NOTIFICATIONS))


LOG_PAGE = 4096                  # one log bit per 4 KiB page
LOG_WORD = 8                     # the log is read and cleared in 64-bit words
LOG_CHUNK = 8 * LOG_WORD * LOG_PAGE   # guest bytes one word covers: 256 KiB


# How much more log than the memory table needs a front-end may send.  QEMU
# 7.2's vhost_commit grows a log to the size needed plus VHOST_LOG_BUFFER words,
# which is 0x1000 / sizeof(struct vhost_log) = 170 words (1360 bytes), not the
# 4 KiB its comment says; a build that computed the 4 KiB would send 512 words.
# The slack covers both, and nothing bigger: a log is DMA-mapped (pinned) for
# the VF, so its size must stay what the guest's memory needs.
LOG_SLACK = 4096


def log_size(memory_end: int) -> int:
    """Bytes of dirty log for guest memory ending at ``memory_end``: whole 64-bit
    words, as QEMU sizes it (vhost_get_log_size: last GPA / 256 KiB + 1 words,
    never rounded to a page).  A back-end accepts any multiple of 8 from this
    up to this plus LOG_SLACK."""
    return -(-memory_end // LOG_CHUNK) * LOG_WORD


def request_name(request: Request | BackendRequest | int | None) -> str:
    """A readable name for error messages; raw codes stay numeric."""
    if isinstance(request, BackendRequest):
        return f"BACKEND_{request.name}"
    if isinstance(request, Request):
        return request.name
    if request is None:
        return "message"
    return f"request {request}"
