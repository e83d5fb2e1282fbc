"""What every vhost-user request carries, allows and expects back.

One row per request: payload type and size, how many fds may ride with it, whether
it always has an explicit reply (and how that reply says "failed"), and which
negotiated feature gates it. ``messages.parse`` enforces payload, size and fds;
gating needs negotiated state, so the back-end applies ``Gate.allows`` itself.

Sources: the vhost-user spec, QEMU 7.2 hw/virtio/vhost-user.c (what it actually
sends), and the traces in shared/reference/real-peers.md.
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ifcvf.vhost.codes import (
    F_PROTOCOL_FEATURES, MAX_PAYLOAD_SIZE, VIRTIO_F_IOMMU_PLATFORM, BackendRequest, ProtocolFeature,
    Request)
from ifcvf.vhost.errors import ProtocolError
from ifcvf.vhost.payloads import (
    U64, Config, DeviceStateTransfer, Inflight, Iotlb, Log, MemoryTable, Payload, Raw,
    SharedObject, SingleRegion, VringAddr, VringArea, VringFd, VringState)


class FdRule(enum.Enum):
    """How many fds may arrive with a message (the value describes it in errors)."""

    NONE = "no fd"
    ONE = "exactly 1 fd"
    PER_REGION = "exactly one fd per region (nregions), in region order"
    UNLESS_NOFD = "1 fd, or none when the no-fd bit 0x100 is set"
    # REM_MEM_REG: the spec says no fd SHOULD be sent, but older QEMUs sent the
    # region's fd, so a back-end MAY accept one and MUST close it unused.
    STRAY_TOLERATED = "no fd (1 tolerated, closed unused)"
    OPTIONAL = "0 or 1 fd"

    def allowed(self, payload: Payload | None) -> tuple[int, ...]:
        """The fd counts allowed for this payload."""
        if self is FdRule.ONE:
            return (1,)
        if self is FdRule.PER_REGION:
            assert isinstance(payload, MemoryTable)
            return (len(payload.regions),)
        if self is FdRule.UNLESS_NOFD:
            assert isinstance(payload, VringFd | VringArea)
            return (0,) if payload.nofd else (1,)
        if self in (FdRule.STRAY_TOLERATED, FdRule.OPTIONAL):
            return (0, 1)
        return (0,)


class FailureReply(enum.Enum):
    """How a request's own reply body expresses failure."""

    IMPOSSIBLE = "the reply has no failure form"
    EMPTY_BODY = "a reply with size 0"          # GET_CONFIG (spec)
    NONZERO_U64 = "a u64 reply, non-zero"       # IOTLB_MSG, POSTCOPY_END, ...


@dataclass(frozen=True)
class ReplySpec:
    """The explicit reply a request always gets. ``payload`` None means an empty
    body (SET_LOG_BASE as DPDK and QEMU's test server send it, or fd-only ones)."""

    payload: type[Payload] | None
    failure: FailureReply = FailureReply.IMPOSSIBLE
    fds: FdRule = FdRule.NONE


@dataclass(frozen=True)
class Gate:
    """What must have been negotiated before a request is legal.

    ``protocol_features_offered``: F_PROTOCOL_FEATURES (bit 30) is in the
    back-end's GET_FEATURES answer. Offered, not acked: QEMU sends
    GET/SET_PROTOCOL_FEATURES and SET_VRING_ENABLE before SET_FEATURES.
    ``protocol_feature``: in the front-end's SET_PROTOCOL_FEATURES value (which
    implies the bit-30 offer). ``virtio_feature``: acked in SET_FEATURES.
    """

    protocol_features_offered: bool = False
    protocol_feature: ProtocolFeature | None = None
    virtio_feature: int | None = None

    def allows(self, *, offered_features: int, acked_protocol_features: int,
               acked_features: int) -> bool:
        offered = bool(offered_features >> F_PROTOCOL_FEATURES & 1)
        if (self.protocol_features_offered or self.protocol_feature is not None) and not offered:
            return False
        feature = self.protocol_feature
        if feature is not None and not acked_protocol_features >> feature & 1:
            return False
        if self.virtio_feature is not None and not acked_features >> self.virtio_feature & 1:
            return False
        return True

    def describe(self) -> str:
        needs = []
        if self.protocol_features_offered:
            needs.append("F_PROTOCOL_FEATURES offered")
        if self.protocol_feature is not None:
            needs.append(f"protocol feature {self.protocol_feature.name}")
        if self.virtio_feature is not None:
            needs.append(f"virtio feature bit {self.virtio_feature}")
        return " and ".join(needs) or "always allowed"


ALWAYS = Gate()


@dataclass(frozen=True)
class RequestSpec:
    """One request's row. ``min_size``/``max_size`` bound the payload size (equal
    for fixed-size payloads; the variable ones check their own consistency)."""

    request: Request | BackendRequest
    payload: type[Payload] | None
    fds: FdRule
    reply: ReplySpec | None
    gate: Gate
    min_size: int
    max_size: int
    check: Callable[[Payload], None] | None = field(default=None, compare=False)

    @property
    def has_reply(self) -> bool:
        return self.reply is not None

    def describe_size(self) -> str:
        if self.min_size == self.max_size:
            return f"{self.min_size} bytes"
        return f"{self.min_size}..{self.max_size} bytes"


def _spec(request: Request | BackendRequest, payload: type[Payload] | None = None, *,
          fds: FdRule = FdRule.NONE, reply: ReplySpec | None = None, gate: Gate = ALWAYS,
          check: Callable[[Payload], None] | None = None,
          size: int | None = None) -> RequestSpec:
    if size is not None:
        low = high = size
    elif payload is None:
        low = high = 0
    elif payload.SIZE is not None:
        low = high = payload.SIZE
    else:
        low, high = payload.MIN_SIZE, payload.MAX_SIZE
    return RequestSpec(request, payload, fds, reply, gate, low, min(high, MAX_PAYLOAD_SIZE), check)


def _num_is_flag(payload: Payload) -> None:
    assert isinstance(payload, VringState)
    if payload.num not in (0, 1):
        raise ProtocolError(f"vring {payload.index} num is {payload.num}, expected 0 or 1")


def _num_is_zero(payload: Payload) -> None:
    assert isinstance(payload, VringState)
    if payload.num != 0:
        raise ProtocolError(f"vring {payload.index} num is {payload.num}, reserved: expected 0")


def _status_fits_u8(payload: Payload) -> None:
    assert isinstance(payload, U64)
    if payload.value > 0xFF:
        raise ProtocolError(f"device status {payload.value:#x} does not fit the 8-bit "
                            f"virtio status")


def _pf(feature: ProtocolFeature) -> Gate:
    return Gate(protocol_feature=feature)


_OFFERED = Gate(protocol_features_offered=True)
_U64_REPLY = ReplySpec(U64)
_U64_STATUS_REPLY = ReplySpec(U64, FailureReply.NONZERO_U64)

# QEMU 7.2's VhostUserCryptoSession (see codes.MAX_PAYLOAD_SIZE): kept opaque.
CRYPTO_SESSION_SIZE = 632

R = Request
PF = ProtocolFeature
_REQUEST_ROWS = (
    _spec(R.GET_FEATURES, reply=_U64_REPLY),
    _spec(R.SET_FEATURES, U64),
    _spec(R.SET_OWNER),
    _spec(R.RESET_OWNER),
    # Postcopy replies to SET_MEM_TABLE/ADD_MEM_REG exist only with PAGEFAULT,
    # which a vDPA back-end never offers: not modelled.
    _spec(R.SET_MEM_TABLE, MemoryTable, fds=FdRule.PER_REGION),
    # The fd form (and its reply) needs LOG_SHMFD; without it the log would live
    # in front-end memory the back-end cannot reach, so that form is refused.
    _spec(R.SET_LOG_BASE, Log, fds=FdRule.ONE, reply=ReplySpec(None), gate=_pf(PF.LOG_SHMFD)),
    _spec(R.SET_LOG_FD, fds=FdRule.ONE),
    _spec(R.SET_VRING_NUM, VringState),
    _spec(R.SET_VRING_ADDR, VringAddr),
    _spec(R.SET_VRING_BASE, VringState),
    _spec(R.GET_VRING_BASE, VringState, reply=ReplySpec(VringState)),
    _spec(R.SET_VRING_KICK, VringFd, fds=FdRule.UNLESS_NOFD),
    _spec(R.SET_VRING_CALL, VringFd, fds=FdRule.UNLESS_NOFD),
    _spec(R.SET_VRING_ERR, VringFd, fds=FdRule.UNLESS_NOFD),
    _spec(R.GET_PROTOCOL_FEATURES, reply=_U64_REPLY, gate=_OFFERED),
    _spec(R.SET_PROTOCOL_FEATURES, U64, gate=_OFFERED),
    _spec(R.GET_QUEUE_NUM, reply=_U64_REPLY, gate=_pf(PF.MQ)),
    _spec(R.SET_VRING_ENABLE, VringState, gate=_OFFERED, check=_num_is_flag),
    _spec(R.SEND_RARP, U64, gate=_pf(PF.RARP)),
    # Not gated on VIRTIO_NET_F_MTU being acked: QEMU sends NET_SET_MTU from
    # virtio_net_vhost_status, before vhost_dev_start's SET_FEATURES.
    _spec(R.NET_SET_MTU, U64, gate=_pf(PF.NET_MTU)),
    _spec(R.SET_BACKEND_REQ_FD, fds=FdRule.ONE, gate=_pf(PF.BACKEND_REQ)),
    # QEMU always sets NEED_REPLY on it, but the u64 is its own reply, not an ack.
    _spec(R.IOTLB_MSG, Iotlb, reply=_U64_STATUS_REPLY,
          gate=Gate(virtio_feature=VIRTIO_F_IOMMU_PLATFORM)),
    _spec(R.SET_VRING_ENDIAN, VringState, gate=_pf(PF.CROSS_ENDIAN), check=_num_is_flag),
    _spec(R.GET_CONFIG, Config, reply=ReplySpec(Config, FailureReply.EMPTY_BODY),
          gate=_pf(PF.CONFIG)),
    _spec(R.SET_CONFIG, Config, gate=_pf(PF.CONFIG)),
    _spec(R.CREATE_CRYPTO_SESSION, Raw, size=CRYPTO_SESSION_SIZE, reply=ReplySpec(Raw),
          gate=_pf(PF.CRYPTO_SESSION)),
    _spec(R.CLOSE_CRYPTO_SESSION, U64, gate=_pf(PF.CRYPTO_SESSION)),
    _spec(R.POSTCOPY_ADVISE, reply=ReplySpec(None, fds=FdRule.ONE),  # reply: a userfaultfd
          gate=_pf(PF.PAGEFAULT)),
    _spec(R.POSTCOPY_LISTEN, gate=_pf(PF.PAGEFAULT)),
    _spec(R.POSTCOPY_END, reply=_U64_STATUS_REPLY, gate=_pf(PF.PAGEFAULT)),
    _spec(R.GET_INFLIGHT_FD, Inflight, reply=ReplySpec(Inflight, fds=FdRule.ONE),
          gate=_pf(PF.INFLIGHT_SHMFD)),
    _spec(R.SET_INFLIGHT_FD, Inflight, fds=FdRule.ONE, gate=_pf(PF.INFLIGHT_SHMFD)),
    _spec(R.GPU_SET_SOCKET, fds=FdRule.ONE),
    _spec(R.RESET_DEVICE, gate=_pf(PF.RESET_DEVICE)),
    _spec(R.VRING_KICK, VringState, gate=_pf(PF.INBAND_NOTIFICATIONS), check=_num_is_zero),
    _spec(R.GET_MAX_MEM_SLOTS, reply=_U64_REPLY, gate=_pf(PF.CONFIGURE_MEM_SLOTS)),
    _spec(R.ADD_MEM_REG, SingleRegion, fds=FdRule.ONE, gate=_pf(PF.CONFIGURE_MEM_SLOTS)),
    _spec(R.REM_MEM_REG, SingleRegion, fds=FdRule.STRAY_TOLERATED,
          gate=_pf(PF.CONFIGURE_MEM_SLOTS)),
    _spec(R.SET_STATUS, U64, gate=_pf(PF.STATUS), check=_status_fits_u8),
    _spec(R.GET_STATUS, reply=_U64_REPLY, gate=_pf(PF.STATUS)),
    # 41-44 postdate QEMU 7.2; their replies are kept opaque.
    _spec(R.GET_SHARED_OBJECT, SharedObject, reply=ReplySpec(Raw, fds=FdRule.OPTIONAL),
          gate=_pf(PF.SHARED_OBJECT)),
    _spec(R.SET_DEVICE_STATE_FD, DeviceStateTransfer, fds=FdRule.ONE,
          reply=ReplySpec(U64, FailureReply.NONZERO_U64, fds=FdRule.OPTIONAL),
          gate=_pf(PF.DEVICE_STATE)),
    _spec(R.CHECK_DEVICE_STATE, reply=_U64_STATUS_REPLY, gate=_pf(PF.DEVICE_STATE)),
    _spec(R.GET_SHMEM_CONFIG, reply=ReplySpec(Raw), gate=_pf(PF.SHMEM)),
)

REQUEST_SPECS: Mapping[Request, RequestSpec] = {row.request: row for row in _REQUEST_ROWS}

B = BackendRequest
# Back-end -> front-end. Every one is answered, if at all, by a u64 ack (0 = ok)
# when REPLY_ACK was negotiated and NEED_REPLY set; none has its own reply body.
_BACKEND_ROWS = (
    _spec(B.IOTLB_MSG, Iotlb, gate=Gate(virtio_feature=VIRTIO_F_IOMMU_PLATFORM)),
    _spec(B.CONFIG_CHANGE_MSG, gate=_pf(PF.CONFIG)),
    # The fd (the VFIO device fd for IFCVF) also needs BACKEND_SEND_FD.
    _spec(B.VRING_HOST_NOTIFIER_MSG, VringArea, fds=FdRule.UNLESS_NOFD,
          gate=_pf(PF.HOST_NOTIFIER)),
    _spec(B.VRING_CALL, VringState, gate=_pf(PF.INBAND_NOTIFICATIONS), check=_num_is_zero),
    _spec(B.VRING_ERR, VringState, gate=_pf(PF.INBAND_NOTIFICATIONS), check=_num_is_zero),
    _spec(B.SHARED_OBJECT_ADD, SharedObject, gate=_pf(PF.SHARED_OBJECT)),
    _spec(B.SHARED_OBJECT_REMOVE, SharedObject, gate=_pf(PF.SHARED_OBJECT)),
    _spec(B.SHARED_OBJECT_LOOKUP, SharedObject, gate=_pf(PF.SHARED_OBJECT)),
    # Recent (rust-vmm only); layout not pinned down here: opaque.
    _spec(B.SHMEM_MAP, Raw, fds=FdRule.ONE, gate=_pf(PF.SHMEM)),
    _spec(B.SHMEM_UNMAP, Raw, gate=_pf(PF.SHMEM)),
)

BACKEND_REQUEST_SPECS: Mapping[BackendRequest, RequestSpec] = {
    row.request: row for row in _BACKEND_ROWS}

# The front-end's answer to a back-end request: a u64 (0 = ok); LOOKUP adds an fd.
BACKEND_ACK = ReplySpec(U64, FailureReply.NONZERO_U64)
BACKEND_LOOKUP_REPLY = ReplySpec(U64, FailureReply.NONZERO_U64, fds=FdRule.OPTIONAL)
# The back-end's ack to a front-end request without an explicit reply.
ACK = ReplySpec(U64, FailureReply.NONZERO_U64)


def reply_spec(request: Request | BackendRequest) -> ReplySpec:
    """The reply ``request`` gets when it gets one: its own, or a u64 ack."""
    if isinstance(request, BackendRequest):
        if request is BackendRequest.SHARED_OBJECT_LOOKUP:
            return BACKEND_LOOKUP_REPLY
        return BACKEND_ACK
    return REQUEST_SPECS[request].reply or ACK

assert set(REQUEST_SPECS) == set(Request), "every front-end request needs a row"
assert set(BACKEND_REQUEST_SPECS) == set(BackendRequest), "every back-end request needs a row"
