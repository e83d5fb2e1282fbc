"""vhost-user sockets: one per VF, server or (reconnecting) client mode, one event loop.

The loop multiplexes every listening socket, connection and back-end channel
with ``selectors``; ``poll_once`` handles whatever is pending and returns, so
the simulator can drive the same code without threads.  A broken or hostile
connection is closed alone: the others keep being served.
"""
from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

from ifcvf.vhost.backend import VhostBackend
from ifcvf.vhost.channel import ConnectionClosed, MessageReader, send_message
from ifcvf.vhost.errors import ProtocolError

log = logging.getLogger("ifcvf.vhost.server")

RECONNECT_S = 1.0


@dataclass
class Endpoint:
    """One socket path serving one VF."""

    path: str
    make_backend: Callable[[], VhostBackend]
    client: bool = False
    listener: socket.socket | None = None
    conn: "Connection | None" = None
    next_connect: float = 0.0


@dataclass
class Connection:
    endpoint: Endpoint | None
    sock: socket.socket
    backend: VhostBackend
    reader: MessageReader = field(default_factory=MessageReader)
    name: str = ""
    backend_registered: socket.socket | None = None  # its back-end channel, as selected


class VhostServer:
    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.endpoints: list[Endpoint] = []
        self.connections: list[Connection] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self.stopping = False

    # --- set-up ---------------------------------------------------------------------
    def add_endpoint(self, path: str, make_backend: Callable[[], VhostBackend], *, client: bool = False) -> Endpoint:
        ep = Endpoint(path, make_backend, client)
        self.endpoints.append(ep)
        if not client:
            ep.listener = self._listen(path)
            self.selector.register(ep.listener, selectors.EVENT_READ, ("listen", ep))
            log.info("listening on %s", path)
        else:
            self._try_connect(ep)
        return ep

    @staticmethod
    def _listen(path: str) -> socket.socket:
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket from a previous run
            else:
                probe.close()
                raise OSError(errno.EADDRINUSE, f"{path} is already served by another process")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # created 0600: only our user may drive the VF
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(1)
        sock.setblocking(False)
        return sock

    def _try_connect(self, ep: Endpoint) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(ep.path)
        except OSError as err:
            sock.close()
            ep.next_connect = time.monotonic() + RECONNECT_S
            log.debug("connect %s: %s (retrying)", ep.path, err)
            return
        log.info("connected to %s", ep.path)
        self._adopt(ep, sock)

    def add_connection(self, sock: socket.socket, backend: VhostBackend, name: str = "") -> Connection:
        """Serve an already-connected socket (the simulator's socketpair)."""
        return self._adopt(None, sock, backend, name)

    def _adopt(self, ep: Endpoint | None, sock: socket.socket, backend: VhostBackend | None = None,
               name: str = "") -> Connection:
        sock.setblocking(False)
        backend = backend or ep.make_backend()
        conn = Connection(ep, sock, backend, name=name or (ep.path if ep else backend.name))
        if ep:
            ep.conn = conn
        self.connections.append(conn)
        self.selector.register(sock, selectors.EVENT_READ, ("conn", conn))
        return conn

    # --- the loop ------------------------------------------------------------------
    def wake(self) -> None:
        """Make a blocked poll_once return (from a signal handler or another thread)."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def stop(self) -> None:
        self.stopping = True
        self.wake()

    def serve_forever(self) -> None:
        while not self.stopping:
            self.poll_once(timeout=RECONNECT_S)

    def poll_once(self, timeout: float | None = 0) -> int:
        """Handle everything pending (waiting up to ``timeout`` s for something); returns frames handled."""
        handled = 0
        for conn in list(self.connections):
            self._watch_backend_channel(conn)
        for key, _ in self.selector.select(timeout):
            kind, obj = key.data
            if kind == "wake":
                while True:
                    try:
                        if not os.read(self._wake_r, 256):
                            break
                    except BlockingIOError:
                        break
            elif kind == "listen":
                self._accept(obj)
            elif kind == "conn":
                handled += self._service(obj)
            elif kind == "backend":
                obj.backend.poll_backend()
        for conn in list(self.connections):
            conn.backend.flush_backend()
        now = time.monotonic()
        for ep in self.endpoints:
            if ep.client and ep.conn is None and not self.stopping and now >= ep.next_connect:
                self._try_connect(ep)
        return handled

    def _watch_backend_channel(self, conn: Connection) -> None:
        sock = conn.backend.backend_sock
        registered = conn.backend_registered
        if sock is registered:
            return
        if registered is not None:
            try:
                self.selector.unregister(registered)
            except (KeyError, ValueError):
                pass
        if sock is not None:
            self.selector.register(sock, selectors.EVENT_READ, ("backend", conn))
        conn.backend_registered = sock

    def _accept(self, ep: Endpoint) -> None:
        try:
            sock, _ = ep.listener.accept()
        except BlockingIOError:
            return
        if ep.conn is not None:
            log.warning("%s: a second front-end tried to connect; one VF serves one front-end", ep.path)
            sock.close()
            return
        log.info("%s: front-end connected", ep.path)
        self._adopt(ep, sock)

    def _service(self, conn: Connection) -> int:
        try:
            frames = conn.reader.read_from(conn.sock)
        except ConnectionClosed as err:
            log.info("%s: front-end disconnected (%s)", conn.name, err)
            self._close_conn(conn)
            return 0
        except ProtocolError as err:
            self._drop(conn, f"unreadable stream: {err}")
            return 0
        except OSError as err:
            self._drop(conn, f"socket error: {err}")
            return 0
        for i, frame in enumerate(frames):
            outcome = conn.backend.handle(frame)
            try:
                for data, fds in outcome.replies:
                    send_message(conn.sock, data, fds)
            except OSError as err:
                self._drop(conn, f"cannot reply: {err}")
                return i + 1
            if outcome.close:
                self._drop(conn, f"closing: {conn.backend.broken_reason}")
                return i + 1
            conn.backend.after_reply()
            conn.backend.flush_backend()
        return len(frames)

    def _drop(self, conn: Connection, why: str) -> None:
        log.warning("%s: %s", conn.name, why)
        self._close_conn(conn)

    def _close_conn(self, conn: Connection) -> None:
        self._watch_backend_channel_off(conn)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.reader.close()
        conn.sock.close()
        conn.backend.close()
        if conn in self.connections:
            self.connections.remove(conn)
        if conn.endpoint is not None:
            conn.endpoint.conn = None
            conn.endpoint.next_connect = time.monotonic() + RECONNECT_S

    def _watch_backend_channel_off(self, conn: Connection) -> None:
        if conn.backend_registered is not None:
            try:
                self.selector.unregister(conn.backend_registered)
            except (KeyError, ValueError):
                pass
            conn.backend_registered = None

    def close(self) -> None:
        for conn in list(self.connections):
            self._close_conn(conn)
        for ep in self.endpoints:
            if ep.listener is not None:
                self.selector.unregister(ep.listener)
                ep.listener.close()
                try:
                    os.unlink(ep.path)
                except FileNotFoundError:
                    pass
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
