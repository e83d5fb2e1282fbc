"""The vhost-user wire codec: one import for everything in it.

Pure (no sockets, no fd handling) and stdlib-only, importing nothing of ours
outside this package's codec modules, so the simulator's QEMU role reuses it:

* ``codes``     request codes, protocol feature bits, header flags, limits
* ``errors``    ``ProtocolError`` (the only exception bad input raises)
* ``payloads``  typed payload dataclasses with validating ``unpack``
* ``specs``     one row per request: payload, size, fds, reply, gate
* ``messages``  ``decode_header``, ``parse``, ``parse_reply``, the encoders
* ``replies``   ``reply_action``: what a back-end owes for a request

Framing over a socket (and fd passing) lives in ``ifcvf.vhost.channel``.
"""
from ifcvf.vhost.codes import (
    F_LOG_ALL, F_PROTOCOL_FEATURES, FLAG_NEED_REPLY, FLAG_REPLY, HEADER_SIZE, KNOWN_FLAGS,
    MAX_CONFIG_SIZE, MAX_FDS, MAX_PAYLOAD_SIZE, MAX_REGIONS, QEMU_7_2_BACKEND_REQUESTS,
    QEMU_7_2_PROTOCOL_FEATURES, QEMU_7_2_REQUESTS, REPLY_FLAGS, VERSION, VERSION_MASK,
    VIRTIO_F_IOMMU_PLATFORM, VIRTIO_NET_F_MTU, VRING_F_LOG, VRING_INDEX_MASK, VRING_NOFD,
    LOG_SLACK, LOG_WORD, BackendRequest, ProtocolFeature, Request, log_size, protocol_mask, request_name)
from ifcvf.vhost.errors import ProtocolError, UnknownRequestError
from ifcvf.vhost.messages import (
    BackendMessage, Header, Message, Reply, decode_header, encode_ack, encode_backend_request,
    encode_failure_reply, encode_raw, encode_reply, encode_request, parse, parse_backend_request,
    parse_reply)
from ifcvf.vhost.payloads import (
    PAYLOAD_TYPES, U64, Config, ConfigFlags, DeviceStateTransfer, Inflight, Iotlb, IotlbPerm,
    IotlbType, Log, MemoryRegion, MemoryTable, Payload, Raw, SharedObject, SingleRegion,
    VringAddr, VringArea, VringFd, VringState)
from ifcvf.vhost.replies import ReplyAction, reply_action
from ifcvf.vhost.specs import (
    BACKEND_REQUEST_SPECS, REQUEST_SPECS, FailureReply, FdRule, Gate, ReplySpec, RequestSpec,
    reply_spec)

__all__ = [
    # codes
    "F_LOG_ALL", "F_PROTOCOL_FEATURES", "FLAG_NEED_REPLY", "FLAG_REPLY", "HEADER_SIZE",
    "KNOWN_FLAGS", "MAX_CONFIG_SIZE", "MAX_FDS", "MAX_PAYLOAD_SIZE", "MAX_REGIONS",
    "QEMU_7_2_BACKEND_REQUESTS", "QEMU_7_2_PROTOCOL_FEATURES", "QEMU_7_2_REQUESTS",
    "REPLY_FLAGS", "VERSION", "VERSION_MASK", "VIRTIO_F_IOMMU_PLATFORM", "VIRTIO_NET_F_MTU",
    "VRING_F_LOG", "VRING_INDEX_MASK", "VRING_NOFD", "BackendRequest", "ProtocolFeature",
    "LOG_SLACK", "LOG_WORD", "Request", "log_size", "protocol_mask", "request_name",
    # errors
    "ProtocolError", "UnknownRequestError",
    # messages
    "BackendMessage", "Header", "Message", "Reply", "decode_header", "encode_ack",
    "encode_backend_request", "encode_failure_reply", "encode_raw", "encode_reply",
    "encode_request", "parse", "parse_backend_request", "parse_reply",
    # payloads
    "PAYLOAD_TYPES", "U64", "Config", "ConfigFlags", "DeviceStateTransfer", "Inflight", "Iotlb",
    "IotlbPerm", "IotlbType", "Log", "MemoryRegion", "MemoryTable", "Payload", "Raw",
    "SharedObject", "SingleRegion", "VringAddr", "VringArea", "VringFd", "VringState",
    # replies
    "ReplyAction", "reply_action",
    # specs
    "BACKEND_REQUEST_SPECS", "REQUEST_SPECS", "FailureReply", "FdRule", "Gate", "ReplySpec",
    "RequestSpec", "reply_spec",
]
