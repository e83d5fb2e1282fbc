"""vhost-user framing over real AF_UNIX sockets with real fds (memfd, eventfd)."""
import array
import fcntl
import os
import socket
import struct

import pytest

from ifcvf.vhost.channel import (
    ConnectionClosed, MessageReader, MessageTimeout, close_fds, recv_message, send_message)
from ifcvf.vhost.protocol import (
    U64, BackendRequest, MemoryRegion, MemoryTable, ProtocolError, Request, VringArea, VringFd,
    VringState, encode_ack, encode_backend_request, encode_raw, encode_reply, encode_request, parse,
    parse_backend_request, parse_reply)


@pytest.fixture
def pair():
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield front, back
    front.close()
    back.close()


@pytest.fixture
def no_leaks():
    """Fails the test if it leaves more fds open than it started with."""
    before = set(os.listdir("/proc/self/fd"))
    yield
    assert set(os.listdir("/proc/self/fd")) <= before


def memfd(content: bytes) -> int:
    fd = os.memfd_create("test-region")
    os.write(fd, content)
    return fd


def target(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def raw_send(sock, data: bytes, fds=()):
    """sendmsg without send_message's fd limit, to behave like a hostile peer."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def test_kick_eventfd_crosses_the_socket(pair, no_leaks):
    front, back = pair
    kick = os.eventfd(0)
    try:
        send_message(front, encode_request(Request.SET_VRING_KICK, VringFd(1)), [kick])
        message = parse(*recv_message(back, timeout=5))
        assert message.payload == VringFd(1) and len(message.fds) == 1
        received = message.fds[0]
        assert received != kick
        assert fcntl.fcntl(received, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.eventfd_write(received, 3)          # the back-end side signals...
        assert os.eventfd_read(kick) == 3      # ...the front-end's eventfd
        close_fds(message.fds)
    finally:
        os.close(kick)


def test_memory_table_fds_arrive_in_region_order(pair, no_leaks):
    front, back = pair
    low, high = memfd(b"low region"), memfd(b"high region")
    table = MemoryTable((MemoryRegion(0, 0x1000, 0x7F00_0000_0000, 0),
                         MemoryRegion(0x1_0000_0000, 0x1000, 0x7F00_1000_0000, 0)))
    try:
        send_message(front, encode_request(Request.SET_MEM_TABLE, table, need_reply=True), [low, high])
        message = parse(*recv_message(back, timeout=5))
        try:
            assert message.need_reply and message.payload == table
            assert [os.pread(fd, 16, 0) for fd in message.fds] == [b"low region", b"high region"]
        finally:
            close_fds(message.fds)
    finally:
        close_fds([low, high])


def test_each_message_keeps_its_own_fds(pair, no_leaks):
    front, back = pair
    region, call = memfd(b"x"), os.eventfd(0)
    try:
        # All three are queued before the first read.
        send_message(front, encode_request(Request.SET_LOG_FD), [region])
        send_message(front, encode_request(Request.SET_VRING_CALL, VringFd(0)), [call])
        send_message(front, encode_request(Request.GET_FEATURES))
        first, second, third = (recv_message(back, timeout=5) for _ in range(3))
        assert first.header.request == Request.SET_LOG_FD and len(first.fds) == 1
        assert target(first.fds[0]).startswith("/memfd:test-region")
        assert second.header.request == Request.SET_VRING_CALL and len(second.fds) == 1
        assert target(second.fds[0]) == "anon_inode:[eventfd]"
        assert third.header.request == Request.GET_FEATURES and third.fds == []
        close_fds(first.fds + second.fds)
    finally:
        close_fds([region, call])


def test_more_than_eight_fds_is_refused_and_all_closed(pair, no_leaks):
    front, back = pair
    fds = [os.eventfd(0) for _ in range(9)]
    try:
        raw_send(front, encode_request(Request.SET_OWNER), fds)
        with pytest.raises(ProtocolError, match="ancillary data truncated: more than 8 fds"):
            recv_message(back, timeout=5)
    finally:
        close_fds(fds)


def test_send_message_refuses_more_than_eight_fds(pair):
    with pytest.raises(ValueError, match="9 fds in one message, at most 8"):
        send_message(pair[0], encode_request(Request.SET_OWNER), list(range(9)))


def test_oversized_size_field_is_refused_before_reading(pair, no_leaks):
    front, back = pair
    log = memfd(b"")
    try:
        # No payload follows: a reader that trusted the size would time out.
        raw_send(front, encode_raw(Request.SET_LOG_BASE, 0x1, size=633), [log])
        with pytest.raises(ProtocolError, match="payload size 633 exceeds the maximum 632"):
            recv_message(back, timeout=5)
    finally:
        os.close(log)


def test_truncated_message_then_eof(pair, no_leaks):
    front, back = pair
    kick = os.eventfd(0)
    try:
        raw_send(front, encode_request(Request.SET_VRING_KICK, VringFd(0))[:16], [kick])
        front.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionClosed, match="after 16 bytes of a message") as info:
            recv_message(back, timeout=5)
        assert info.value.partial
    finally:
        os.close(kick)


def test_eof_between_messages(pair):
    front, back = pair
    send_message(front, encode_request(Request.GET_FEATURES))
    front.close()
    assert recv_message(back, timeout=5).header.request == Request.GET_FEATURES
    with pytest.raises(ConnectionClosed) as info:
        recv_message(back, timeout=5)
    assert not info.value.partial and isinstance(info.value, ConnectionError)


def test_timeout_with_nothing_read_leaves_the_stream_usable(pair):
    front, back = pair
    with pytest.raises(MessageTimeout) as info:
        recv_message(back, timeout=0)
    assert isinstance(info.value, TimeoutError) and info.value.consumed == 0
    send_message(front, encode_request(Request.SET_VRING_NUM, VringState(0, 256)))
    assert parse(*recv_message(back, timeout=0)).payload == VringState(0, 256)


def test_timeout_mid_message_reports_what_was_lost(pair, no_leaks):
    front, back = pair
    call = os.eventfd(0)
    try:
        raw_send(front, encode_request(Request.SET_VRING_CALL, VringFd(0))[:5], [call])
        with pytest.raises(MessageTimeout) as info:
            recv_message(back, timeout=0)
        assert info.value.consumed == 5
    finally:
        os.close(call)


def test_non_blocking_socket_stays_non_blocking(pair):
    front, back = pair
    back.setblocking(False)
    send_message(front, encode_request(Request.GET_QUEUE_NUM))
    assert recv_message(back, timeout=5).header.request == Request.GET_QUEUE_NUM
    assert not back.getblocking()


def test_reply_round_trip_is_what_qemu_accepts(pair):
    front, back = pair
    send_message(front, encode_request(Request.GET_VRING_BASE, VringState(1, 0)))
    request = parse(*recv_message(back, timeout=5))
    send_message(back, encode_reply(request.request, VringState(1, 4242)))
    header, payload, fds = recv_message(front, timeout=5)
    assert header.flags == 0x5 and header.request == Request.GET_VRING_BASE
    assert parse_reply(header, payload, Request.GET_VRING_BASE, fds).payload == VringState(1, 4242)


def test_host_notifier_over_the_backend_channel(pair, no_leaks):
    backend_end, frontend_end = pair
    notify = memfd(bytes(4096))
    try:
        area = VringArea(0, 4096, 0)
        send_message(backend_end, encode_backend_request(
            BackendRequest.VRING_HOST_NOTIFIER_MSG, area, need_reply=True), [notify])
        message = parse_backend_request(*recv_message(frontend_end, timeout=5))
        assert message.payload == area and message.need_reply
        close_fds(message.fds)
        send_message(frontend_end, encode_ack(message.request, True))
        header, payload, fds = recv_message(backend_end, timeout=5)
        reply = parse_reply(header, payload, BackendRequest.VRING_HOST_NOTIFIER_MSG, fds)
        assert reply.payload == U64(0) and not reply.failed
    finally:
        os.close(notify)


def test_send_to_a_closed_peer(pair):
    front, back = pair
    back.close()
    with pytest.raises(ConnectionClosed):
        send_message(front, encode_request(Request.GET_FEATURES))


def test_send_times_out_on_a_full_buffer(pair):
    front, back = pair
    front.setblocking(False)
    try:
        while True:
            front.send(bytes(65536))
    except BlockingIOError:
        pass
    with pytest.raises(MessageTimeout, match="did not drain"):
        send_message(front, encode_request(Request.GET_FEATURES), timeout=0)


# --- the incremental reader ---------------------------------------------------------

def test_reader_keeps_a_partial_message_until_it_completes(pair, no_leaks):
    front, back = pair
    back.setblocking(False)
    kick = os.eventfd(0)
    data = encode_request(Request.SET_VRING_KICK, VringFd(2))
    reader = MessageReader()
    try:
        raw_send(front, data[:3], [kick])     # the fd rides on the first chunk
        assert reader.read_from(back) == [] and reader.has_partial
        front.send(data[3:14])
        assert reader.read_from(back) == [] and reader.has_partial
        front.send(data[14:])
        (frame,) = reader.read_from(back)
        assert not reader.has_partial
        message = parse(*frame)
        assert message.payload == VringFd(2) and target(message.fds[0]) == "anon_inode:[eventfd]"
        close_fds(message.fds)
        assert reader.read_from(back) == []
    finally:
        os.close(kick)


def test_reader_returns_messages_before_reporting_eof(pair):
    front, back = pair
    back.setblocking(False)
    send_message(front, encode_request(Request.GET_FEATURES))
    send_message(front, encode_request(Request.SET_OWNER))
    front.close()
    reader = MessageReader()
    frames = reader.read_from(back)
    assert [f.header.request for f in frames] == [Request.GET_FEATURES, Request.SET_OWNER]
    with pytest.raises(ConnectionClosed):
        reader.read_from(back)


def test_reader_partial_message_at_eof_closes_its_fds(pair, no_leaks):
    front, back = pair
    back.setblocking(False)
    kick = os.eventfd(0)
    try:
        raw_send(front, encode_request(Request.SET_VRING_KICK, VringFd(0))[:13], [kick])
        front.close()
        with pytest.raises(ConnectionClosed) as info:
            MessageReader().read_from(back)
        assert info.value.partial
    finally:
        os.close(kick)


def test_reader_bounds_messages_per_call(pair):
    front, back = pair
    back.setblocking(False)
    for num in (1, 2, 3):
        send_message(front, encode_request(Request.SET_VRING_NUM, VringState(0, num)))
    reader = MessageReader()
    got = [parse(*f).payload.num for f in reader.read_from(back, max_messages=2)]
    got += [parse(*f).payload.num for f in reader.read_from(back, max_messages=2)]
    assert got == [1, 2, 3]


def test_reader_stays_broken_after_an_oversized_header(pair, no_leaks):
    front, back = pair
    back.setblocking(False)
    send_message(front, encode_request(Request.GET_FEATURES))
    raw_send(front, struct.pack("=III", Request.SET_CONFIG, 1, 10_000))
    reader = MessageReader()
    (frame,) = reader.read_from(back)        # the good message first
    assert frame.header.request == Request.GET_FEATURES
    with pytest.raises(ProtocolError, match="payload size 10000 exceeds"):
        reader.read_from(back)
    send_message(front, encode_request(Request.GET_FEATURES))
    with pytest.raises(ProtocolError, match="stream already broken"):
        reader.read_from(back)


def test_reader_refuses_truncated_control_data(pair, no_leaks):
    front, back = pair
    back.setblocking(False)
    fds = [os.eventfd(0) for _ in range(10)]
    try:
        raw_send(front, encode_request(Request.SET_OWNER), fds)
        with pytest.raises(ProtocolError, match="ancillary data truncated"):
            MessageReader().read_from(back)
    finally:
        close_fds(fds)
