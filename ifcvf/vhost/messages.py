"""Headers, validated messages, and the encoders for both directions.

Decoding is split in two so the socket layer can bound its reads:
``decode_header`` turns 12 bytes into a ``Header`` (refusing a payload size
larger than any message QEMU 7.2 accepts, before anyone reads it), then
``parse`` / ``parse_backend_request`` / ``parse_reply`` check the rest against
the request's row in ``specs``.

fd ownership: the codec never opens, closes or touches an fd; it only counts
them. ``parse`` returns a ``Message`` holding the fds that arrived and the
caller owns them from then on (including ``stray_fds``, which must be closed
unused). When ``parse`` raises, nothing changed hands: the caller still owns
every fd it passed in and must close them.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ifcvf.vhost.codes import (
    FLAG_NEED_REPLY, FLAG_REPLY, HEADER_SIZE, KNOWN_FLAGS, MAX_PAYLOAD_SIZE, REPLY_FLAGS, VERSION,
    VERSION_MASK, BackendRequest, Request, request_name)
from ifcvf.vhost.errors import ProtocolError, UnknownRequestError
from ifcvf.vhost.payloads import U64, Payload, Raw
from ifcvf.vhost.specs import (
    BACKEND_REQUEST_SPECS, REQUEST_SPECS, FailureReply, FdRule, RequestSpec, reply_spec)

_HEADER = struct.Struct("=III")


@dataclass(frozen=True, slots=True)
class Header:
    """The 12-byte header, fields as received (``request`` may be any u32)."""

    request: int
    flags: int
    size: int

    @property
    def version(self) -> int:
        return self.flags & VERSION_MASK

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def pack(self) -> bytes:
        try:
            return _HEADER.pack(self.request, self.flags, self.size)
        except struct.error as exc:
            raise ValueError(f"header field out of range: {exc}") from None


def decode_header(data: bytes) -> Header:
    """Decode a header; a size over ``MAX_PAYLOAD_SIZE`` is refused here, so a
    reader never allocates or waits for it (the stream is then unusable)."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"header is {len(data)} bytes, expected {HEADER_SIZE}")
    header = Header(*_HEADER.unpack(data))
    if header.size > MAX_PAYLOAD_SIZE:
        raise ProtocolError(f"payload size {header.size} exceeds the maximum {MAX_PAYLOAD_SIZE} "
                            f"(QEMU 7.2's sizeof(VhostUserPayload))",
                            request=header.request, header=header)
    return header


@dataclass(frozen=True, slots=True)
class Message:
    """A validated front-end request.

    ``fds`` are the fds the request carries for use (memory regions in region
    order, the kick eventfd, the log memfd...). ``stray_fds`` arrived but must be
    closed unused (REM_MEM_REG). The receiver owns both.
    """

    request: Request
    flags: int
    payload: Payload | None
    fds: tuple[int, ...] = ()
    stray_fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def spec(self) -> RequestSpec:
        return REQUEST_SPECS[self.request]


@dataclass(frozen=True, slots=True)
class BackendMessage:
    """A validated back-end -> front-end request (parsed by a front-end)."""

    request: BackendRequest
    flags: int
    payload: Payload | None
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


@dataclass(frozen=True, slots=True)
class Reply:
    """A validated reply. ``payload`` is the reply body (a ``U64`` for acks);
    None for an empty body."""

    request: Request | BackendRequest
    payload: Payload | None
    fds: tuple[int, ...] = ()

    @property
    def failed(self) -> bool:
        """The reply is its request's failure form: a non-zero ack or status,
        or the empty GET_CONFIG body. A GET_FEATURES value is never a failure."""
        spec = reply_spec(self.request)
        if spec.failure is FailureReply.NONZERO_U64:
            return isinstance(self.payload, U64) and self.payload.value != 0
        if spec.failure is FailureReply.EMPTY_BODY:
            return self.payload is None
        return False


# --- parsing ------------------------------------------------------------------

def _lookup(table: Mapping, kind: type, header: Header):
    try:
        return table[kind(header.request)]
    except (ValueError, KeyError):
        raise UnknownRequestError(f"unknown {kind.__name__} code {header.request}",
                                  request=header.request, header=header) from None


def _code_name(kind: type, code: int) -> str:
    try:
        return request_name(kind(code))
    except ValueError:
        return "unknown"


def _check_framing(header: Header, payload: bytes,
                   request: Request | BackendRequest | int) -> None:
    if len(payload) != header.size:
        raise ProtocolError(f"header says {header.size} payload bytes, {len(payload)} given",
                            request=request, header=header)
    if header.size > MAX_PAYLOAD_SIZE:
        raise ProtocolError(f"payload size {header.size} exceeds the maximum {MAX_PAYLOAD_SIZE}",
                            request=request, header=header)


def _check_request_flags(spec: RequestSpec, header: Header) -> None:
    def fail(reason: str) -> ProtocolError:
        return ProtocolError(reason, request=spec.request, header=header)

    if header.version != VERSION:
        raise fail(f"flags {header.flags:#x} carry version {header.version}, expected {VERSION}")
    if header.is_reply:
        raise fail(f"flags {header.flags:#x} set REPLY (0x4) on a request")
    if header.flags & ~KNOWN_FLAGS:
        raise fail(f"flags {header.flags:#x} set undefined bits {header.flags & ~KNOWN_FLAGS:#x}: "
                   f"only version (0x3), REPLY (0x4) and NEED_REPLY (0x8) exist")


def _decode_body(spec: RequestSpec, header: Header, payload: bytes) -> Payload | None:
    # Variable-size payloads (memory table, config) check their length against
    # their own fields, which says more than a bare range.
    fixed = spec.min_size == spec.max_size or spec.payload is None or spec.payload.SIZE is not None
    if fixed and not spec.min_size <= header.size <= spec.max_size:
        raise ProtocolError(f"payload is {header.size} bytes, expected {spec.describe_size()}",
                            request=spec.request, header=header)
    if spec.payload is None:
        return None
    try:
        body = spec.payload.unpack(payload)
        if spec.check is not None:
            spec.check(body)
    except ProtocolError as exc:
        raise exc.about(spec.request, header) from None
    return body


def _check_fds(spec: RequestSpec, header: Header, body: Payload | None, count: int) -> None:
    allowed = spec.fds.allowed(body)
    if count not in allowed:
        here = f": {allowed[0]} here" if spec.fds in (FdRule.PER_REGION, FdRule.UNLESS_NOFD) else ""
        raise ProtocolError(f"{count} fds attached, expected {spec.fds.value}{here}",
                            request=spec.request, header=header)


def parse(header: Header, payload: bytes, fds: Sequence[int] = ()) -> Message:
    """Validate a front-end request: version 1, REPLY clear, no undefined flag,
    the size the request takes, a well-formed payload and the right fd count.

    Raises ``UnknownRequestError`` (a ``ProtocolError`` with ``.code``) for a
    code outside 1-44 and ``ProtocolError`` for anything else wrong; never
    another exception type. Gating on negotiated features is the caller's
    (``RequestSpec.gate``). fds are counted, never closed: see the module doc.
    """
    spec = _lookup(REQUEST_SPECS, Request, header)
    _check_framing(header, payload, spec.request)
    _check_request_flags(spec, header)
    body = _decode_body(spec, header, payload)
    _check_fds(spec, header, body, len(fds))
    fds = tuple(fds)
    if spec.fds is FdRule.STRAY_TOLERATED:
        return Message(spec.request, header.flags, body, (), fds)
    return Message(spec.request, header.flags, body, fds)


def parse_backend_request(header: Header, payload: bytes,
                          fds: Sequence[int] = ()) -> BackendMessage:
    """The front-end's side of ``parse``: validate a back-end -> front-end request."""
    spec = _lookup(BACKEND_REQUEST_SPECS, BackendRequest, header)
    _check_framing(header, payload, spec.request)
    _check_request_flags(spec, header)
    body = _decode_body(spec, header, payload)
    _check_fds(spec, header, body, len(fds))
    return BackendMessage(spec.request, header.flags, body, tuple(fds))


def parse_reply(header: Header, payload: bytes, request: Request | BackendRequest,
                fds: Sequence[int] = ()) -> Reply:
    """Validate the reply to ``request``, as strictly as QEMU 7.2 does: flags
    exactly VERSION|REPLY, the same request code, then the body the request's
    reply (or a u64 ack) takes.

    Used by the simulator's front-end (replies to Requests) and by the back-end
    (the front-end's acks to BackendRequests).
    """
    if not isinstance(request, Request | BackendRequest):
        raise TypeError(f"parse_reply needs the Request or BackendRequest replied to, "
                        f"not {request!r}")
    _check_framing(header, payload, request)

    def fail(reason: str) -> ProtocolError:
        return ProtocolError(reason, request=request, header=header)

    if header.flags != REPLY_FLAGS:
        raise fail(f"reply flags are {header.flags:#x}, must be exactly VERSION|REPLY "
                   f"({REPLY_FLAGS:#x})")
    if header.request != request:
        name = _code_name(type(request), header.request)
        raise fail(f"reply carries code {header.request} ({name}), "
                   f"expected the request's own code {int(request)}")
    spec = reply_spec(request)
    body: Payload | None
    if request is Request.SET_LOG_BASE or spec.payload is None:
        # QEMU checks only the request code of the SET_LOG_BASE reply; its body
        # is unspecified (DPDK sends none, rust-vmm echoes the log).
        body = Raw(bytes(payload)) if payload else None
    elif spec.failure is FailureReply.EMPTY_BODY and not payload:
        body = None
    else:
        if spec.payload.SIZE is not None and len(payload) != spec.payload.SIZE:
            raise fail(f"reply body is {len(payload)} bytes, expected {spec.payload.SIZE}")
        try:
            body = spec.payload.unpack(payload)
        except ProtocolError as exc:
            raise exc.about(request, header) from None
    allowed = spec.fds.allowed(body)
    if len(fds) not in allowed:
        raise fail(f"{len(fds)} fds attached to the reply, expected {spec.fds.value}")
    return Reply(request, body, tuple(fds))


# --- encoding -----------------------------------------------------------------

def encode_raw(request: int, flags: int, payload: bytes = b"", *, size: int | None = None) -> bytes:
    """Any header and bytes, unchecked: for tests and fault injection. ``size``
    overrides the header's size field (to lie about the payload length)."""
    return Header(request, flags, len(payload) if size is None else size).pack() + bytes(payload)


def _body_bytes(payload: Payload | bytes | None, expected: type[Payload] | None,
                what: str) -> bytes:
    if payload is None:
        return b""
    if isinstance(payload, bytes | bytearray | memoryview):
        data = bytes(payload)               # raw bytes: deliberately unchecked
    elif isinstance(payload, Payload):
        if expected is None or not isinstance(payload, expected):
            want = expected.__name__ if expected else "no payload"
            raise ValueError(f"{what} takes {want}, not {type(payload).__name__}")
        data = payload.pack()
    else:
        raise ValueError(f"{what}: payload must be a Payload, bytes or None, "
                         f"not {type(payload).__name__}")
    if len(data) > MAX_PAYLOAD_SIZE:
        raise ValueError(f"{what}: {len(data)}-byte payload exceeds the maximum {MAX_PAYLOAD_SIZE}")
    return data


def encode_request(request: Request, payload: Payload | bytes | None = None,
                   need_reply: bool = False) -> bytes:
    """A front-end request (for the simulator's QEMU role). A typed payload must
    be the request's type; raw bytes pass unchecked, to send bad ones on purpose."""
    request = Request(request)
    body = _body_bytes(payload, REQUEST_SPECS[request].payload, request.name)
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return Header(request, flags, len(body)).pack() + body


def encode_backend_request(request: BackendRequest, payload: Payload | bytes | None = None,
                           need_reply: bool = False) -> bytes:
    """A back-end -> front-end request (HOST_NOTIFIER, CONFIG_CHANGE, ...).
    DPDK sends HOST_NOTIFIER with NEED_REPLY and waits for the ack."""
    request = BackendRequest(request)
    body = _body_bytes(payload, BACKEND_REQUEST_SPECS[request].payload, request_name(request))
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return Header(request, flags, len(body)).pack() + body


def encode_reply(request: Request | BackendRequest,
                 payload: Payload | bytes | None = None) -> bytes:
    """A reply: flags exactly VERSION|REPLY (0x5), the request's code echoed.
    The body must be the request's reply type (a u64 for acks); None sends an
    empty body (SET_LOG_BASE's reply, GET_CONFIG's failure)."""
    body = _body_bytes(payload, reply_spec(request).payload, f"reply to {request_name(request)}")
    return Header(int(request), REPLY_FLAGS, len(body)).pack() + body


def encode_ack(request: Request | BackendRequest, ok: bool | int) -> bytes:
    """A REPLY_ACK answer. ``ok`` True/False send u64 0/1; an int is sent as the
    raw status (0 = success, anything else = failure)."""
    if isinstance(ok, bool):
        status = 0 if ok else 1
    else:
        status = int(ok)
    return Header(int(request), REPLY_FLAGS, U64.SIZE).pack() + U64(status).pack()


def encode_failure_reply(request: Request) -> bytes:
    """The request's own reply in its failure form (GET_CONFIG: empty body;
    IOTLB_MSG, POSTCOPY_END, ...: u64 1). ValueError when it has none."""
    reply = REQUEST_SPECS[Request(request)].reply
    if reply is None or reply.failure is FailureReply.IMPOSSIBLE:
        raise ValueError(f"{request_name(request)} has no reply that can say it failed")
    if reply.failure is FailureReply.EMPTY_BODY:
        return encode_reply(request, None)
    return encode_reply(request, U64(1))
