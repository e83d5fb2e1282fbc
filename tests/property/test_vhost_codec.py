"""Properties of the vhost-user codec: hostile bytes only ever raise
ProtocolError, and every payload survives pack/unpack."""
import struct

import pytest
from hypothesis import given, settings, strategies as st

from ifcvf.vhost.channel import MessageReader
from ifcvf.vhost.protocol import (
    BACKEND_REQUEST_SPECS, MAX_PAYLOAD_SIZE, PAYLOAD_TYPES, REQUEST_SPECS, U64, BackendRequest,
    Config, DeviceStateTransfer, FdRule, Header, Inflight, Iotlb, Log, MemoryRegion, MemoryTable,
    Message, ProtocolError, Raw, Request, SharedObject, SingleRegion, VringAddr, VringArea, VringFd,
    VringState, decode_header, encode_raw, encode_request, parse, parse_backend_request, parse_reply)

FAKE_FDS = tuple(range(100, 110))
TOP = 1 << 64

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, TOP - 1)


@st.composite
def span(draw, min_length=0):
    """(start, length) with start + length < 2**64."""
    length = draw(st.integers(min_length, 1 << 48) | st.integers(min_length, TOP - 1))
    start = draw(st.integers(0, TOP - 1 - length))
    return start, length


@st.composite
def regions(draw, gpa=None, size=None):
    if gpa is None:
        gpa, size = draw(span(1))
    uva = draw(st.integers(0, TOP - 1 - size))
    offset = draw(st.integers(0, TOP - 1 - size))
    return MemoryRegion(gpa, size, uva, offset)


@st.composite
def memory_tables(draw):
    """1-8 regions laid out without overlap, then shuffled."""
    count = draw(st.integers(1, 8))
    gpa = draw(st.integers(0, 1 << 40))
    out = []
    for _ in range(count):
        gpa += draw(st.integers(0, 1 << 36))
        size = draw(st.integers(1, 1 << 36))
        out.append(draw(regions(gpa, size)))
        gpa += size
    return MemoryTable(tuple(draw(st.permutations(out))))


@st.composite
def configs(draw):
    payload = draw(st.binary(max_size=256))
    offset = draw(st.integers(0, 256 - len(payload)))
    return Config(offset, draw(st.sampled_from([0, 1])), payload)


@st.composite
def logs(draw):
    offset, size = draw(span(1))
    return Log(size, offset)


@st.composite
def iotlbs(draw):
    iova, size = draw(span())
    return Iotlb(iova, size, draw(u64), draw(st.integers(0, 3)), draw(st.integers(1, 4)))


@st.composite
def vring_areas(draw):
    offset, size = draw(span())
    return VringArea(draw(u8), size, offset, draw(st.booleans()))


@st.composite
def inflights(draw):
    offset, size = draw(span())
    return Inflight(size, offset, draw(u16), draw(u16))


STRATEGIES = {
    U64: st.builds(U64, u64),
    VringFd: st.builds(VringFd, u8, st.booleans()),
    VringState: st.builds(VringState, u32, u32),
    VringAddr: st.builds(VringAddr, u32, st.sampled_from([0, 1]), u64, u64, u64, u64),
    MemoryRegion: regions(),
    MemoryTable: memory_tables(),
    SingleRegion: st.builds(SingleRegion, regions()),
    Log: logs(),
    Iotlb: iotlbs(),
    Config: configs(),
    VringArea: vring_areas(),
    Inflight: inflights(),
    SharedObject: st.builds(SharedObject, st.binary(min_size=16, max_size=16)),
    DeviceStateTransfer: st.builds(DeviceStateTransfer, st.sampled_from([0, 1]), st.just(0)),
    Raw: st.builds(Raw, st.binary(max_size=MAX_PAYLOAD_SIZE)),
}
assert set(STRATEGIES) == set(PAYLOAD_TYPES)

any_payload = st.one_of(*STRATEGIES.values())


@given(any_payload)
def test_every_payload_round_trips(payload):
    data = payload.pack()
    assert type(payload).unpack(data) == payload
    if type(payload).SIZE is not None:
        assert len(data) == type(payload).SIZE


# Requests whose payload type allows more than the request does.
REQUEST_STRATEGIES = {
    Request.SET_VRING_ENABLE: st.builds(VringState, u32, st.sampled_from([0, 1])),
    Request.SET_VRING_ENDIAN: st.builds(VringState, u32, st.sampled_from([0, 1])),
    Request.VRING_KICK: st.builds(VringState, u32, st.just(0)),
    Request.SET_STATUS: st.builds(U64, u8),
    Request.CREATE_CRYPTO_SESSION: st.builds(Raw, st.binary(min_size=632, max_size=632)),
}


@st.composite
def valid_requests(draw):
    request = draw(st.sampled_from(sorted(Request)))
    spec = REQUEST_SPECS[request]
    payload = None
    if spec.payload is not None:
        payload = draw(REQUEST_STRATEGIES.get(request, STRATEGIES[spec.payload]))
    nfds = min(spec.fds.allowed(payload)) if spec.fds is not FdRule.STRAY_TOLERATED else draw(
        st.integers(0, 1))
    return request, payload, nfds, draw(st.booleans())


@given(valid_requests())
def test_encode_then_parse_round_trips(case):
    request, payload, nfds, need_reply = case
    data = encode_request(request, payload, need_reply=need_reply)
    message = parse(decode_header(data[:12]), data[12:], FAKE_FDS[:nfds])
    assert (message.request, message.payload, message.need_reply) == (request, payload, need_reply)
    assert message.fds + message.stray_fds == FAKE_FDS[:nfds]


def _parse_or_refuse(header_bytes: bytes, payload: bytes, nfds: int):
    """Run the front-end request path on hostile input: a Message or ProtocolError."""
    try:
        header = decode_header(header_bytes)
        return parse(header, payload, FAKE_FDS[:nfds])
    except ProtocolError as exc:
        return exc


codes = st.integers(0, 50) | u32
flags = st.sampled_from([0x1, 0x9, 0x5, 0xD, 0x0, 0x3, 0x11]) | u32


@given(codes, flags, st.binary(max_size=MAX_PAYLOAD_SIZE + 8), st.integers(0, 10), st.booleans())
def test_hostile_requests_raise_only_protocol_error(code, flag_bits, payload, nfds, honest_size):
    size = len(payload) if honest_size else len(payload) ^ 8
    result = _parse_or_refuse(struct.pack("=III", code, flag_bits, size & 0xFFFF_FFFF), payload, nfds)
    assert isinstance(result, Message | ProtocolError)
    if isinstance(result, Message):
        assert result.request == code and result.flags == flag_bits


@given(st.binary(min_size=12, max_size=12), st.binary(max_size=700), st.integers(0, 10))
def test_random_bytes_raise_only_protocol_error(head, payload, nfds):
    assert isinstance(_parse_or_refuse(head, payload, nfds), Message | ProtocolError)


@st.composite
def mutated(draw, data: bytes):
    """``data`` with a few bytes overwritten, then cut or extended."""
    raw = bytearray(data)
    for _ in range(draw(st.integers(0, 4)) if raw else 0):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(u8)
    if draw(st.booleans()):
        del raw[draw(st.integers(0, len(raw))):]
    else:
        raw += draw(st.binary(max_size=40))
    return bytes(raw)


@pytest.mark.parametrize("request_", sorted(Request), ids=lambda r: r.name)
@settings(max_examples=60)
@given(st.data())
def test_mutated_valid_requests_raise_only_protocol_error(request_, data):
    """Per request, so every decoder sees near-valid input, not just random codes."""
    spec = REQUEST_SPECS[request_]
    payload = b""
    if spec.payload is not None:
        payload = data.draw(REQUEST_STRATEGIES.get(request_, STRATEGIES[spec.payload])).pack()
    payload = data.draw(mutated(payload))
    flag_bits = data.draw(st.sampled_from([0x1, 0x9]) | u32)
    header = struct.pack("=III", request_, flag_bits, len(payload))
    result = _parse_or_refuse(header, payload, data.draw(st.integers(0, 9)))
    assert isinstance(result, Message | ProtocolError)


@given(st.sampled_from(sorted(Request)) | u32, st.sampled_from([0x5]) | u32,
       st.binary(max_size=300), st.integers(0, 3), st.sampled_from(sorted(Request)))
def test_hostile_replies_raise_only_protocol_error(code, flag_bits, payload, nfds, expected):
    try:
        reply = parse_reply(Header(code, flag_bits, len(payload)), payload, expected, FAKE_FDS[:nfds])
    except ProtocolError:
        return
    assert reply.request is expected and flag_bits == 0x5 and code == expected


@given(st.integers(0, 12) | u32, u32, st.binary(max_size=100), st.integers(0, 3))
def test_hostile_backend_requests_raise_only_protocol_error(code, flag_bits, payload, nfds):
    try:
        message = parse_backend_request(Header(code, flag_bits, len(payload)), payload,
                                        FAKE_FDS[:nfds])
    except ProtocolError:
        return
    assert message.request in BACKEND_REQUEST_SPECS and isinstance(message.request, BackendRequest)


# --- incremental framing --------------------------------------------------------------

@given(st.lists(valid_requests(), min_size=1, max_size=6), st.data())
def test_framing_does_not_depend_on_chunking(cases, data):
    encoded = [encode_request(request, payload, need_reply=need)
               for request, payload, _, need in cases]
    stream = b"".join(encoded)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = MessageReader()
    frames = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        frames += reader.feed(stream[start:end])
    assert [f.header.pack() + f.payload for f in frames] == encoded
    assert not reader.has_partial


@given(st.lists(st.binary(max_size=64), max_size=20))
def test_reader_on_random_bytes_raises_only_protocol_error(chunks):
    reader = MessageReader()
    try:
        for chunk in chunks:
            for frame in reader.feed(chunk):
                assert len(frame.payload) == frame.header.size <= MAX_PAYLOAD_SIZE
    except ProtocolError:
        pass


@given(u32, u32, st.integers(MAX_PAYLOAD_SIZE + 1, 0xFFFF_FFFF))
def test_oversized_size_fields_are_refused_from_the_header_alone(code, flag_bits, size):
    reader = MessageReader()
    try:
        reader.feed(encode_raw(code, flag_bits, size=size))
    except ProtocolError as exc:
        assert f"payload size {size} exceeds the maximum {MAX_PAYLOAD_SIZE}" in str(exc)
    else:
        raise AssertionError("an oversized header was accepted")
