"""vhost-user framing over a connected AF_UNIX SOCK_STREAM socket, with fd passing.

A message is a 12-byte header, then ``size`` payload bytes; its fds ride as
SCM_RIGHTS ancillary data on the first chunk the sender wrote (QEMU, DPDK and
rust-vmm all send header, payload and fds in one sendmsg). Reads are capped at
the bytes the current message still needs, so they never run into the next
message: every fd received while reading a message belongs to that message.

Two ways in:

* ``recv_message(sock, timeout)``: blocking-style, one message, with a deadline.
* ``MessageReader``: incremental, for an event loop serving several connections
  from non-blocking sockets; keeps a partial message between calls.

fd ownership: fds arrive close-on-exec (MSG_CMSG_CLOEXEC). Once a ``Frame`` is
returned, the caller owns its fds (``messages.parse`` does not change that).
Whenever this module raises instead, it has already closed every fd of the
message it was reading (a truncated control message, EOF or a timeout in the
middle of a message, an oversized size field), so nothing leaks.

After a ``ProtocolError`` or a ``MessageTimeout`` with ``consumed > 0`` the
byte stream is out of step and the connection must be dropped.
"""
from __future__ import annotations

import array
import os
import select
import socket
import time
from collections.abc import Sequence
from typing import NamedTuple

from ifcvf.vhost.codes import HEADER_SIZE, MAX_FDS
from ifcvf.vhost.errors import ProtocolError
from ifcvf.vhost.messages import Header, decode_header

_FD_ITEMSIZE = array.array("i").itemsize
# Room for exactly MAX_FDS fds: a sender attaching more gets MSG_CTRUNC.
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * _FD_ITEMSIZE)


class ConnectionClosed(ConnectionError):
    """The peer closed the connection (EOF or reset). ``partial`` is True when it
    did so in the middle of a message."""

    def __init__(self, reason: str, *, partial: bool = False) -> None:
        super().__init__(reason)
        self.partial = partial


class MessageTimeout(TimeoutError):
    """No complete message before the deadline. ``consumed`` bytes of a message
    were already read (and are lost): with ``consumed == 0`` the stream is intact
    and the caller may simply try again."""

    def __init__(self, reason: str, *, consumed: int = 0) -> None:
        super().__init__(reason)
        self.consumed = consumed


class Frame(NamedTuple):
    """One framed message: header, exactly ``header.size`` payload bytes, its fds."""

    header: Header
    payload: bytes
    fds: list[int]


def close_fds(fds: Sequence[int]) -> None:
    """Close fds this side owns, ignoring ones already gone."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _fds_in(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[:len(data) - len(data) % _FD_ITEMSIZE])
            fds.extend(received)
    return fds


def _recv_chunk(sock: socket.socket, want: int, flags: int = 0) -> tuple[bytes, list[int]]:
    """One recvmsg of at most ``want`` bytes and whatever fds came with them."""
    try:
        data, ancdata, msg_flags, _ = sock.recvmsg(
            want, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC | flags)
    except ConnectionResetError:
        raise ConnectionClosed("connection reset by peer") from None
    fds = _fds_in(ancdata)
    if msg_flags & socket.MSG_CTRUNC:
        # The kernel dropped (and closed) the fds that did not fit; close the rest.
        close_fds(fds)
        raise ProtocolError(f"ancillary data truncated: more than {MAX_FDS} fds attached "
                            f"to one message")
    return data, fds


def _wait(sock: socket.socket, events: int, deadline: float | None) -> bool:
    """Wait until ``sock`` is ready for ``events``; False when the deadline passed."""
    poller = select.poll()
    poller.register(sock.fileno(), events)
    while True:
        if deadline is None:
            wait_ms = None
        else:
            remaining = deadline - time.monotonic()
            wait_ms = max(0, int(remaining * 1000 + 0.999))
        if poller.poll(wait_ms):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


class MessageReader:
    """Incremental framing: bytes (and fds) in, complete ``Frame``s out.

    ``read_from(sock)`` drains what a socket has right now without blocking;
    ``feed(data, fds)`` is the same machine without a socket (fds handed to
    ``feed`` belong to the message the first byte of ``data`` belongs to).
    After a framing error the reader stays broken and raises on every call.
    """

    def __init__(self) -> None:
        self._head = bytearray()
        self._header: Header | None = None
        self._payload = bytearray()
        self._fds: list[int] = []
        self._broken: ProtocolError | None = None
        self._deferred: BaseException | None = None

    @property
    def has_partial(self) -> bool:
        """Some bytes or fds of an incomplete message are held."""
        return bool(self._head or self._header is not None or self._fds)

    def close(self) -> None:
        """Drop a partial message, closing its fds."""
        close_fds(self._fds)
        self._fds = []
        self._head.clear()
        self._payload.clear()
        self._header = None

    def _want(self) -> int:
        """Bytes still needed by the part being read (header, then payload)."""
        if self._header is None:
            return HEADER_SIZE - len(self._head)
        return self._header.size - len(self._payload)

    def _fail(self, error: ProtocolError) -> ProtocolError:
        self.close()
        self._broken = error
        return error

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Frame]:
        """Take ``data`` (any length) and its fds; return the messages completed."""
        if self._broken is not None:
            close_fds(fds)
            raise ProtocolError(f"stream already broken: {self._broken}")
        frames: list[Frame] = []
        self._fds.extend(fds)
        if len(self._fds) > MAX_FDS:
            raise self._fail(ProtocolError(f"{len(self._fds)} fds attached to one message, "
                                           f"at most {MAX_FDS}"))
        view = memoryview(data)
        while True:
            if self._header is None and len(self._head) == HEADER_SIZE:
                try:
                    self._header = decode_header(bytes(self._head))
                except ProtocolError as exc:
                    raise self._fail(exc) from None
            if self._header is not None and len(self._payload) == self._header.size:
                frames.append(Frame(self._header, bytes(self._payload), self._fds))
                self._fds = []
                self._head.clear()
                self._payload.clear()
                self._header = None
            if not view:
                return frames
            take = self._want()
            part = self._head if self._header is None else self._payload
            part += view[:take]
            view = view[take:]

    def read_from(self, sock: socket.socket, max_messages: int | None = None) -> list[Frame]:
        """Read what ``sock`` holds now, without blocking (MSG_DONTWAIT), and
        return the complete messages (at most ``max_messages``, for fairness
        between connections). EOF raises ``ConnectionClosed`` and a framing error
        ``ProtocolError``, but only once the messages completed before them
        have been returned: the next call raises."""
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error
        frames: list[Frame] = []
        try:
            while max_messages is None or len(frames) < max_messages:
                try:
                    data, fds = _recv_chunk(sock, self._want(), socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if not data:
                    partial = self.has_partial
                    close_fds(fds)
                    self.close()
                    raise ConnectionClosed("peer closed the connection"
                                           + (" in the middle of a message" if partial else ""),
                                           partial=partial)
                frames.extend(self.feed(data, fds))
        except ProtocolError as exc:
            if self._broken is None:
                self._fail(exc)
            if frames:
                self._deferred = exc
                return frames
            raise
        except ConnectionClosed as exc:
            self.close()
            if frames:
                self._deferred = exc
                return frames
            raise
        return frames


def recv_message(sock: socket.socket, timeout: float | None) -> Frame:
    """Read one whole message: the header and its fds, then exactly ``size``
    payload bytes (a size over the maximum raises ``ProtocolError`` before any
    payload is read).

    ``timeout`` (seconds, None = forever) bounds the whole message and raises
    ``MessageTimeout`` (a ``TimeoutError``). EOF raises ``ConnectionClosed``.
    Works on blocking and non-blocking sockets; never changes the socket's mode.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    reader = MessageReader()
    consumed = 0
    try:
        while True:
            want = reader._want()
            if not _wait(sock, select.POLLIN, deadline):
                raise MessageTimeout(f"no complete message within {timeout} s "
                                     f"({consumed} bytes of one read)", consumed=consumed)
            try:
                data, fds = _recv_chunk(sock, want, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            if not data:
                close_fds(fds)
                raise ConnectionClosed(
                    "peer closed the connection"
                    + (f" after {consumed} bytes of a message" if consumed else ""),
                    partial=consumed > 0)
            consumed += len(data)
            frames = reader.feed(data, fds)
            if frames:
                return frames[0]
    except BaseException:
        reader.close()
        raise


def send_message(sock: socket.socket, data: bytes, fds: Sequence[int] = (),
                 timeout: float | None = None) -> None:
    """Send one encoded message, its fds attached to the first chunk.

    The caller keeps ownership of ``fds`` (the kernel duplicates them into the
    peer). Partial writes are resumed; on a non-blocking socket a full buffer
    is waited out for up to ``timeout`` seconds (``MessageTimeout``). A peer
    that went away raises ``ConnectionClosed``.
    """
    if len(fds) > MAX_FDS:
        raise ValueError(f"{len(fds)} fds in one message, at most {MAX_FDS}")
    deadline = None if timeout is None else time.monotonic() + timeout
    view = memoryview(data)
    sent = 0
    while sent < len(view):
        ancdata = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                   if fds and sent == 0 else [])
        try:
            sent += sock.sendmsg([view[sent:]], ancdata, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            if not _wait(sock, select.POLLOUT, deadline):
                raise MessageTimeout(f"peer did not drain the socket within {timeout} s "
                                     f"({sent} of {len(view)} bytes sent)", consumed=sent) from None
        except (BrokenPipeError, ConnectionResetError):
            raise ConnectionClosed("peer closed the connection while sending",
                                   partial=sent > 0) from None
