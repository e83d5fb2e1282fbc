"""Fuzz target ``codec``: vhost-user framing (bytes and fds) and the codec.

A case is a stream of messages: valid requests (the request's payload type
filled with drawn values), mutated ones (a lying size field, flipped bytes,
cut or padded payloads) and random headers, each with 0-10 real fds.  The
stream is cut into chunks at drawn points and sent with sendmsg over a real
socketpair, fds on the chunk that starts each message (or on a drawn chunk);
``MessageReader.read_from`` reads it and ``parse`` checks every frame.

Properties: only ``ProtocolError`` / ``ConnectionClosed`` come out; a stream of
honest messages sent one per sendmsg comes back message for message with its
fds; every fd is closed afterwards (none leaks, none is closed twice).
"""
from __future__ import annotations

import os
import socket
import struct

from hypothesis import HealthCheck, given, settings, strategies as st

from ifcvf.tools.fuzz.common import open_fds
from ifcvf.vhost import protocol as p
from ifcvf.vhost.channel import ConnectionClosed, MessageReader, close_fds, send_message

U64_MAX = (1 << 64) - 1
REQUESTS = sorted(p.Request)

interesting_u64 = st.sampled_from([0, 1, 0xFFF, 0x1000, 0xFFFF, 0x1_0000, 1 << 32, (1 << 63),
                                   U64_MAX, U64_MAX - 0xFFF]) | st.integers(0, U64_MAX)


@st.composite
def payload_bytes(draw, request):
    """Bytes of the request's payload type: drawn fields, or raw bytes."""
    spec = p.REQUEST_SPECS.get(request)
    if spec is None or spec.payload is None or draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=80))
    size = spec.min_size
    if spec.payload is p.MemoryTable:
        n = draw(st.integers(0, p.MAX_REGIONS + 1))
        return struct.pack("<II", n, 0) + b"".join(
            struct.pack("<QQQQ", *(draw(interesting_u64) for _ in range(4))) for _ in range(n))
    words = [draw(interesting_u64) for _ in range((size + 7) // 8)]
    data = b"".join(struct.pack("<Q", w) for w in words)[:size]
    return data


@st.composite
def messages(draw):
    kind = draw(st.sampled_from(["valid", "valid", "mutated", "random"]))
    request = draw(st.sampled_from(REQUESTS))
    flags = p.VERSION | (p.FLAG_NEED_REPLY if draw(st.booleans()) else 0)
    nfds = draw(st.sampled_from([0, 0, 1, 1, 2, 8, 9, 10]))
    if kind == "random":
        head = draw(st.binary(min_size=12, max_size=12))
        req, flags, size = struct.unpack("<III", head)
        if draw(st.booleans()):
            size %= p.MAX_PAYLOAD_SIZE + 16
        body = draw(st.binary(max_size=min(size, 700)))
        return struct.pack("<III", req, flags, size) + body, nfds, False
    body = draw(payload_bytes(request))[:p.MAX_PAYLOAD_SIZE]
    honest = True
    if kind == "mutated":
        honest = False
        body = bytearray(body)
        for _ in range(draw(st.integers(1, 4))):
            what = draw(st.integers(0, 3))
            if what == 0 and body:
                i = draw(st.integers(0, len(body) - 1))
                body[i] ^= 1 << draw(st.integers(0, 7))
            elif what == 1:
                body = body[:draw(st.integers(0, len(body)))]
            elif what == 2:
                body += draw(st.binary(max_size=16))
            else:
                flags = draw(st.integers(0, 0xFFFF_FFFF))
        body = bytes(body)[:p.MAX_PAYLOAD_SIZE]
    size = len(body)
    if not honest and draw(st.integers(0, 4)) == 0:
        size = draw(st.sampled_from([0, size + 1, max(0, size - 1), p.MAX_PAYLOAD_SIZE + 1,
                                     0xFFFF_FFFF]))
    return struct.pack("<III", request, flags, size) + body, nfds if honest or nfds <= 8 else nfds, \
        honest and size == len(body) and nfds <= p.MAX_FDS


def make_fds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


@settings(database=None, deadline=None, suppress_health_check=list(HealthCheck), max_examples=200)
@given(msgs=st.lists(messages(), min_size=1, max_size=8), cuts=st.lists(st.integers(1, 700), max_size=8),
       one_per_send=st.booleans(), max_messages=st.sampled_from([None, 1, 2]))
def PROPERTY(msgs, cuts, one_per_send, max_messages):
    before = open_fds()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sent_fds: list[list[int]] = []
    frames = []
    error = None
    try:
        a.setblocking(False)
        reader = MessageReader()
        stream_ok = True
        for data, nfds, honest in msgs:
            fds = make_fds(nfds)
            sent_fds.append(fds)
            stream_ok = stream_ok and honest
            chunks = [data] if one_per_send or not cuts else _cut(data, cuts)
            for i, chunk in enumerate(chunks):
                attach = fds if i == 0 else []
                try:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(attach)}i", *attach))] \
                        if attach else []
                    b.sendmsg([chunk], anc)
                except OSError:
                    pass
            # Drain as we go, so the socket buffer never fills.
            if error is None:
                try:
                    frames += reader.read_from(a, max_messages)
                    while max_messages is not None:
                        more = reader.read_from(a, max_messages)
                        if not more:
                            break
                        frames += more
                except (p.ProtocolError, ConnectionClosed) as exc:
                    error = exc
        b.close()
        while error is None:
            try:
                more = reader.read_from(a, max_messages)
            except (p.ProtocolError, ConnectionClosed) as exc:
                error = exc
                break
            frames += more
        if error is not None:
            # Once broken, the reader keeps raising and holds no fd.
            try:
                reader.read_from(a)
                raise AssertionError("a broken reader read again")
            except (p.ProtocolError, ConnectionClosed):
                pass
        assert not reader.has_partial
        for frame in frames:
            assert len(frame.payload) == frame.header.size
            assert len(frame.fds) <= p.MAX_FDS
            try:
                msg = p.parse(frame.header, frame.payload, frame.fds)
                assert set(msg.fds) | set(msg.stray_fds) <= set(frame.fds)
            except p.ProtocolError:
                pass
        if stream_ok and one_per_send:
            assert isinstance(error, ConnectionClosed) and not error.partial, error
            assert [f.header.pack() + f.payload for f in frames] == [m[0] for m in msgs]
            assert [len(f.fds) for f in frames] == [m[1] for m in msgs]
    finally:
        for frame in frames:
            close_fds(frame.fds)
        for fds in sent_fds:
            for fd in fds:
                os.close(fd)   # raises if someone closed one of ours
        a.close()
        b.close()
    leaked = open_fds() - before
    assert not leaked, f"fds leaked: {sorted(leaked)}"


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    out, pos = [], 0
    for c in cuts:
        if pos >= len(data):
            break
        out.append(data[pos:pos + c])
        pos += c
    if pos < len(data):
        out.append(data[pos:])
    return out
