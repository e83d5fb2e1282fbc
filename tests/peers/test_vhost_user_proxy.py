"""The negative control's vhost-user proxy (vhost_user_proxy.py), without QEMU."""
from __future__ import annotations

import os
import socket
import struct
import tempfile
from pathlib import Path

from vhost_user_proxy import SET_LOG_BASE, Message, VhostUserProxy, read_message, write_message

SET_MEM_TABLE, SET_BACKEND_REQ_FD = 5, 21


def exchange(hide_log: bool):
    """QEMU's side -> proxy -> a fake back-end: three requests with fds, and a reply back."""
    work = Path(tempfile.mkdtemp(prefix="ifcvf-proxy-"))
    backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    backend.bind(str(work / "backend.sock"))
    backend.listen(1)
    proxy = VhostUserProxy(work / "proxy.sock", work / "backend.sock", hide_log=hide_log, timeout=30)
    front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        front.connect(str(proxy.path))
        front.settimeout(10)
        ram, log = os.memfd_create("ram"), os.memfd_create("log")
        os.ftruncate(ram, 1 << 20)
        os.ftruncate(log, 6400)
        a, b = socket.socketpair()
        sent = {"ram": os.fstat(ram).st_ino, "log": os.fstat(log).st_ino,
                "channel": os.fstat(b.fileno()).st_ino}
        write_message(front, Message(SET_BACKEND_REQ_FD, 0x9, struct.pack("=Q", 0), [os.dup(b.fileno())]))
        write_message(front, Message(SET_MEM_TABLE, 0x9, b"\1" * 40, [ram]))
        write_message(front, Message(SET_LOG_BASE, 0x1, struct.pack("=QQ", 6400, 0), [log]))
        conn, _ = backend.accept()
        conn.settimeout(10)
        got = [read_message(conn) for _ in range(3)]
        write_message(conn, Message(SET_LOG_BASE, 0x5, struct.pack("=Q", 0), []))
        reply = read_message(front)
        inodes = [os.fstat(m.fds[0]).st_ino for m in got]
        sizes = [os.fstat(m.fds[0]).st_size for m in got]
        for m in got:
            for fd in m.fds:
                os.close(fd)
        a.close()
        b.close()
        conn.close()
        return got, sent, inodes, sizes, reply, proxy.stats
    finally:
        front.close()
        proxy.stop()
        backend.close()
        for name in ("backend.sock",):
            (work / name).unlink(missing_ok=True)
        work.rmdir()


def test_everything_is_forwarded_as_is_without_hiding():
    got, sent, inodes, _, reply, stats = exchange(hide_log=False)
    assert [m.request for m in got] == [SET_BACKEND_REQ_FD, SET_MEM_TABLE, SET_LOG_BASE]
    assert [m.flags for m in got] == [0x9, 0x9, 0x1]
    assert got[1].payload == b"\1" * 40 and got[2].payload == struct.pack("=QQ", 6400, 0)
    assert inodes == [sent["channel"], sent["ram"], sent["log"]]
    assert (reply.request, reply.flags, reply.payload) == (SET_LOG_BASE, 0x5, struct.pack("=Q", 0))
    assert stats.logs_hidden == [] and stats.backend_channel_forwarded == 1


def test_the_log_is_replaced_by_a_private_memfd_of_the_same_size():
    got, sent, inodes, sizes, reply, stats = exchange(hide_log=True)
    assert inodes[:2] == [sent["channel"], sent["ram"]]          # the rest as it was
    assert inodes[2] != sent["log"] and sizes[2] == 6400            # QEMU's log never reaches it
    assert got[2].payload == struct.pack("=QQ", 6400, 0)
    assert reply.request == SET_LOG_BASE and stats.logs_hidden == [6400]
