"""A vhost-user proxy between QEMU and a back-end that can hide the dirty log from QEMU.

The negative control of the two-QEMU migration test (test_two_qemu_migration.py):
QEMU connects to ``path``; the proxy connects to the back-end's socket and
forwards every message both ways, byte for byte, with the fds that came with
it (SCM_RIGHTS), including the back-end channel's socket from
SET_BACKEND_REQ_FD, which goes to the back-end as it is (the back-end then
talks to QEMU directly on it).  One exception when ``hide_log`` is set:
SET_LOG_BASE reaches the back-end with a private memfd of the same size
instead of QEMU's log, so the back-end accepts LOG_ALL and marks pages where
QEMU never reads them.  Every page the device writes during the migration is
then lost to QEMU, unless something else re-dirties it.

The framing is the vhost-user wire format (header ``request:u32 flags:u32
size:u32`` in native byte order, then ``size`` payload bytes; the fds ride on
the first bytes of the message; ../shared/reference/vhost-user.md A.1).  It is
written here on its own, not taken from ifcvf.vhost, so that a bug in the
project's codec cannot hide itself.
"""
from __future__ import annotations

import array
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HEADER = struct.Struct("=III")
SET_LOG_BASE = 6
SET_BACKEND_REQ_FD = 21
MAX_FDS = 8
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class ProxyClosed(Exception):
    pass


def _recv_exact(sock: socket.socket, size: int, fds: list[int]) -> bytes:
    """``size`` bytes from a stream socket; fds that come with them are appended to ``fds``."""
    data = bytearray()
    while len(data) < size:
        chunk, ancdata, flags, _ = sock.recvmsg(size - len(data), _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
        for level, kind, blob in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(blob[:len(blob) - len(blob) % got.itemsize])
                fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            raise ProxyClosed("ancillary data truncated (more than 8 fds?)")
        if not chunk:
            raise ProxyClosed("peer closed the connection")
        data += chunk
    return bytes(data)


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int]


def read_message(sock: socket.socket) -> Message:
    fds: list[int] = []
    try:
        head = _recv_exact(sock, HEADER.size, fds)
        request, flags, size = HEADER.unpack(head)
        if size > 0x10000:
            raise ProxyClosed(f"absurd payload size {size} for request {request}")
        payload = _recv_exact(sock, size, fds) if size else b""
    except BaseException:
        _close(fds)
        raise
    return Message(request, flags, payload, fds)


def write_message(sock: socket.socket, msg: Message) -> None:
    """Send header, payload and fds in one sendmsg (the fds on the first byte), then close our copies."""
    data = HEADER.pack(msg.request, msg.flags, len(msg.payload)) + msg.payload
    try:
        ancillary = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", msg.fds).tobytes())]
                     if msg.fds else [])
        sent = sock.sendmsg([data], ancillary)
        if sent < len(data):
            sock.sendall(data[sent:])
    finally:
        _close(msg.fds)


@dataclass
class ProxyStats:
    to_backend: dict[int, int] = field(default_factory=dict)     # request -> count
    to_frontend: dict[int, int] = field(default_factory=dict)
    logs_hidden: list[int] = field(default_factory=list)          # sizes of the logs replaced
    backend_channel_forwarded: int = 0
    error: str = ""


class VhostUserProxy:
    """Listens on ``path`` (QEMU is the client) and joins one QEMU connection to ``backend``.

    ``hide_log``: SET_LOG_BASE reaches the back-end with a private memfd of the
    size QEMU's log has.  ``stop()`` closes everything and joins the thread.
    """

    def __init__(self, path: Path, backend: Path, *, hide_log: bool, timeout: float = 600.0):
        self.path, self.backend, self.hide_log = Path(path), Path(backend), hide_log
        self.stats = ProxyStats()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self._listener.listen(1)
        self._wake_r, self._wake_w = os.pipe()
        self._deadline = time.monotonic() + timeout
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, name="vhost-user-proxy", daemon=True)
        self._thread.start()

    def _wait_readable(self, socks: list[socket.socket]) -> list[socket.socket]:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise ProxyClosed("proxy lifetime over")
        ready = select.select([*socks, self._wake_r], [], [], min(left, 1.0))[0]
        if self._wake_r in ready:
            raise ProxyClosed("stopped")
        return ready

    def _run(self) -> None:
        try:
            while not self._wait_readable([self._listener]):
                pass
            frontend, _ = self._listener.accept()
            self._socks.append(frontend)
            backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._socks.append(backend)
            backend.connect(str(self.backend))
            while True:
                for sock in self._wait_readable([frontend, backend]):
                    msg = read_message(sock)
                    if sock is frontend:
                        self._to_backend(backend, msg)
                    else:
                        self.stats.to_frontend[msg.request] = self.stats.to_frontend.get(msg.request, 0) + 1
                        write_message(frontend, msg)
        except (ProxyClosed, OSError) as e:
            self.stats.error = str(e)
        finally:
            for sock in self._socks:
                sock.close()

    def _to_backend(self, backend: socket.socket, msg: Message) -> None:
        self.stats.to_backend[msg.request] = self.stats.to_backend.get(msg.request, 0) + 1
        if msg.request == SET_BACKEND_REQ_FD:
            self.stats.backend_channel_forwarded += len(msg.fds)
        if msg.request == SET_LOG_BASE and self.hide_log and msg.fds and len(msg.payload) >= 16:
            size, offset = struct.unpack_from("=QQ", msg.payload)
            private = os.memfd_create("hidden-vhost-log", os.MFD_CLOEXEC)
            os.ftruncate(private, size + offset)
            _close(msg.fds)
            msg.fds = [private]
            self.stats.logs_hidden.append(size)
        write_message(backend, msg)

    def stop(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._thread.join(timeout=10)
        self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.path.unlink()
        except OSError:
            pass
