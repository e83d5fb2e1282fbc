"""`ifcvf serve --client`: connecting to the front-end's socket never holds the loop.

A unix stream socket's blocking connect() waits while the listener's accept
queue is full: a front-end that listens but does not accept (QEMU's chardev
listens with a backlog of 1 while it serves another back-end, or a stuck
process) would hold the one event loop, and with it every other VF and the
control socket, for as long as it pleases.  The connect is non-blocking: a
full queue is "busy, retry later", like a missing socket.
"""
import logging
import socket
import threading

import pytest

from ifcvf.vhost import server as server_module
from ifcvf.vhost.server import VhostServer


class StubBackend:
    """All the server asks of a back-end while nothing is sent on the connection."""

    name = "stub"
    wake = None

    def take_backend_requests(self):
        return []

    def close(self):
        pass


@pytest.fixture
def full_listener(tmp_path):
    """A listening socket whose accept queue is full (backlog 0, one connection queued)."""
    path = str(tmp_path / "fe.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    queued.connect(path)
    yield path, listener, queued
    queued.close()
    listener.close()      # also wakes a connect() still blocked on it


def test_a_front_end_that_does_not_accept_does_not_hold_the_loop(full_listener, monkeypatch, caplog):
    path, listener, queued = full_listener
    monkeypatch.setattr(server_module, "RECONNECT_S", 0.0)
    caplog.set_level(logging.DEBUG, logger="ifcvf.vhost.server")
    server = VhostServer()
    try:
        done = threading.Event()

        def add():
            server.add_endpoint(path, StubBackend, client=True)
            done.set()

        adder = threading.Thread(target=add, daemon=True)
        adder.start()
        assert done.wait(10), "add_endpoint blocked on a front-end that does not accept"
        (ep,) = server.endpoints
        assert ep.conn is None                  # not connected: retried later
        assert "accepts no connection now (busy; retrying)" in caplog.text
        server.poll_once(0)                     # a retry: still busy, still not blocked
        assert ep.conn is None
        # The front-end takes its queued connection: there is room, the serve connects.
        accepted, _ = listener.accept()
        try:
            server.poll_once(0)
            assert ep.conn is not None
            assert isinstance(ep.conn.backend, StubBackend)
        finally:
            accepted.close()
    finally:
        server.close()
