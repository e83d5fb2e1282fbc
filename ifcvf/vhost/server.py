"""vhost-user sockets: one per VF, server or (reconnecting) client mode, one event loop.

The loop multiplexes every listening socket, connection and back-end channel
with ``selectors``; ``poll_once`` handles whatever is pending and returns, so
the simulator can drive the same code without threads.  A broken or hostile
connection is closed alone: the others keep being served.  That holds for
unexpected exceptions too (a bug in a handler, a failed allocation): whatever
one connection's work raises is logged with its traceback and costs that
connection only, never the loop.
"""
from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ifcvf.vhost import protocol as p
from ifcvf.vhost.backend import VhostBackend
from ifcvf.vhost.channel import ConnectionClosed, MessageReader, close_fds, send_message
from ifcvf.vhost.errors import ProtocolError

log = logging.getLogger("ifcvf.vhost.server")

RECONNECT_S = 1.0
MAX_LOOP_FAILURES = 100
# Fairness between connections: a front-end that floods messages gets at most
# this many handled per round of the loop, then every other connection's turn.
MAX_MESSAGES_PER_ROUND = 32
# A front-end that does not read its replies holds the loop at most this long
# per reply, then loses its connection (its socket buffer is full).
REPLY_TIMEOUT_S = 1.0


def _request_name(frame) -> str:
    try:
        return p.request_name(frame.header.request)
    except Exception:
        return "a message"


def listen_unix(path: str, *, backlog: int) -> socket.socket:
    """A non-blocking listening unix socket at ``path``, created 0600 (only our
    user may connect).  A stale socket left by a dead process is replaced; one
    that another process still serves is an error (EADDRINUSE)."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale socket from a previous run
        else:
            raise OSError(errno.EADDRINUSE, f"{path} is already served by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


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
    channel: socket.socket | None = None  # the back-end channel (SET_BACKEND_REQ_FD)


class VhostServer:
    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.endpoints: list[Endpoint] = []
        self.connections: list[Connection] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # wake() comes from other threads and signal handlers (re-entrant):
        # it must never write to the pipe's fd number once close() freed it.
        self._wake_lock = threading.RLock()
        self.selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self.stopping = False
        # Work other threads hand to the loop (call_soon), run by poll_once.
        self._calls: deque[Callable[[], None]] = deque()

    # --- set-up ---------------------------------------------------------------------
    def add_endpoint(self, path: str, make_backend: Callable[[], VhostBackend], *, client: bool = False) -> Endpoint:
        ep = Endpoint(path, make_backend, client)
        self.endpoints.append(ep)
        if not client:
            ep.listener = listen_unix(path, backlog=1)
            self.selector.register(ep.listener, selectors.EVENT_READ, ("listen", ep))
            log.info("listening on %s", path)
        else:
            self._try_connect(ep)
        return ep

    def remove_endpoint(self, path: str) -> Endpoint:
        """Stop serving ``path``: close its connection (which stops its VF), its
        listener and its socket file.  KeyError if no endpoint has that path.
        The other endpoints are not touched."""
        ep = next((e for e in self.endpoints if e.path == path), None)
        if ep is None:
            raise KeyError(path)
        self.endpoints.remove(ep)
        if ep.conn is not None:
            self._close_conn(ep.conn)
        if ep.listener is not None:
            try:
                self.selector.unregister(ep.listener)
            except (KeyError, ValueError):
                pass
            ep.listener.close()
            ep.listener = None
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        log.info("no longer serving %s", path)
        return ep

    # --- other fds the loop serves (the serve command's control socket) ------------
    def watch(self, fileobj, callback: Callable[[int], None], *, write: bool = False) -> None:
        """Call ``callback(events)`` from the loop when ``fileobj`` is readable (or
        writable too, with ``write``); again to change what is watched.  The
        callback must not block; what it raises is logged, and the loop goes on."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        try:
            self.selector.modify(fileobj, events, ("watch", callback))
        except KeyError:
            self.selector.register(fileobj, events, ("watch", callback))

    def unwatch(self, fileobj) -> None:
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop's thread at its next round (thread-safe)."""
        self._calls.append(fn)
        self.wake()

    def _try_connect(self, ep: Endpoint) -> None:
        # Non-blocking: a blocking connect() waits while the listener's accept
        # queue is full (a front-end that listens but does not accept), and this
        # loop serves every other VF.  A unix socket connects at once or fails
        # with EAGAIN: then the front-end is busy, and we retry like any failure.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.connect(ep.path)
        except BlockingIOError:
            sock.close()
            ep.next_connect = time.monotonic() + RECONNECT_S
            log.debug("connect %s: the front-end accepts no connection now (busy; retrying)", ep.path)
            return
        except OSError as err:
            sock.close()
            ep.next_connect = time.monotonic() + RECONNECT_S
            log.debug("connect %s: %s (retrying)", ep.path, err)
            return
        log.info("connected to %s", ep.path)
        if self._adopt_or_close(ep, sock) is None:
            ep.next_connect = time.monotonic() + RECONNECT_S

    def _adopt_or_close(self, ep: Endpoint, sock: socket.socket) -> "Connection | None":
        """Serve a new connection; if its back-end cannot even be built, close
        the socket (the front-end sees a disconnect) and keep the endpoint."""
        try:
            return self._adopt(ep, sock)
        except Exception:
            log.error("%s: cannot serve the new connection; closed it", ep.path, exc_info=True)
            sock.close()
            return None

    def add_connection(self, sock: socket.socket, backend: VhostBackend, name: str = "") -> Connection:
        """Serve an already-connected socket (the simulator's socketpair)."""
        return self._adopt(None, sock, backend, name)

    def _adopt(self, ep: Endpoint | None, sock: socket.socket, backend: VhostBackend | None = None,
               name: str = "") -> Connection:
        sock.setblocking(False)
        backend = backend or ep.make_backend()
        conn = Connection(ep, sock, backend, name=name or (ep.path if ep else backend.name))
        self.selector.register(sock, selectors.EVENT_READ, ("conn", conn))
        if ep:
            ep.conn = conn
        self.connections.append(conn)
        backend.wake = self.wake  # its VF's config interrupts must not wait for a timeout
        return conn

    # --- the loop ------------------------------------------------------------------
    def wake(self) -> None:
        """Make a blocked poll_once return (from a signal handler or another thread)."""
        with self._wake_lock:
            if self._wake_w < 0:
                return  # closed: nothing left to wake
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # the pipe is full: a wake-up is already pending

    def stop(self) -> None:
        self.stopping = True
        self.wake()

    def serve_forever(self, timeout: float | Callable[[], float] = RECONNECT_S,
                      after: Callable[[], None] | None = None) -> None:
        """Serve until ``stop``; ``after`` runs after each round (the simulated world's clock).
        ``timeout``: how long a round may wait, or a callable asked each round.

        Each connection's errors are contained by ``poll_once``; what is left is
        the loop's own machinery and ``after``.  Those are logged and the loop
        goes on, unless they fail MAX_LOOP_FAILURES rounds in a row: then the
        loop itself is broken, and spinning on it would serve no one.
        """
        failures = 0
        while not self.stopping:
            try:
                self.poll_once(timeout() if callable(timeout) else timeout)
                if after is not None:
                    after()
            except Exception:
                failures += 1
                log.error("the event loop failed (%d round(s) in a row); serving on",
                          failures, exc_info=True)
                if failures >= MAX_LOOP_FAILURES:
                    raise
            else:
                failures = 0

    def poll_once(self, timeout: float | None = 0) -> int:
        """Handle everything pending (waiting up to ``timeout`` s for something); returns frames handled."""
        handled = 0
        for key, events in self.selector.select(timeout):
            kind, obj = key.data
            if kind == "wake":
                self._drain_wake()
            elif kind == "listen":
                if obj in self.endpoints:   # not removed earlier this round
                    self._guarded_accept(obj)
            elif kind == "watch":
                try:
                    obj(events)
                except Exception:
                    log.error("a watched fd's handler failed", exc_info=True)
            elif obj not in self.connections:
                continue  # closed by an earlier event of this round
            elif kind == "conn":
                handled += self._service(obj)
            elif kind == "backend":
                self._guarded(obj, "reading its back-end channel", self._read_channel, obj)
        while self._calls:
            fn = self._calls.popleft()
            try:
                fn()
            except Exception:
                log.error("work handed to the loop failed", exc_info=True)
        for conn in list(self.connections):
            self._guarded(conn, "sending on its back-end channel", self._send_backend_requests, conn)
        now = time.monotonic()
        for ep in self.endpoints:
            if ep.client and ep.conn is None and not self.stopping and now >= ep.next_connect:
                self._guarded_connect(ep)
        return handled

    def _drain_wake(self) -> None:
        while True:
            try:
                if not os.read(self._wake_r, 256):
                    return
            except BlockingIOError:
                return

    def _guarded(self, conn: Connection, what: str, fn: Callable, *args):
        """Run one connection's work; an unexpected exception closes that connection only."""
        try:
            return fn(*args)
        except Exception:
            log.error("%s: unexpected error %s; closing this connection", conn.name, what, exc_info=True)
            self._close_conn(conn)
            return None

    def _guarded_accept(self, ep: Endpoint) -> None:
        try:
            self._accept(ep)
        except Exception:
            log.error("%s: accepting a front-end failed", ep.path, exc_info=True)

    def _guarded_connect(self, ep: Endpoint) -> None:
        try:
            self._try_connect(ep)
        except Exception:
            ep.next_connect = time.monotonic() + RECONNECT_S
            log.error("%s: connecting failed (retrying)", ep.path, exc_info=True)

    # --- the back-end channel: requests from the back-end to the front-end -------
    def _adopt_channel(self, conn: Connection, fd: int) -> None:
        """SET_BACKEND_REQ_FD: this socket replaces the connection's channel."""
        self._close_channel(conn)
        conn.channel = socket.socket(fileno=fd)
        conn.channel.setblocking(False)
        self.selector.register(conn.channel, selectors.EVENT_READ, ("backend", conn))

    def _close_channel(self, conn: Connection) -> None:
        if conn.channel is None:
            return
        try:
            self.selector.unregister(conn.channel)
        except (KeyError, ValueError):
            pass
        conn.channel.close()
        conn.channel = None

    def _send_backend_requests(self, conn: Connection) -> None:
        requests = conn.backend.take_backend_requests()
        if conn.channel is None:
            return
        for data, fds in requests:
            try:
                send_message(conn.channel, data, fds, timeout=REPLY_TIMEOUT_S)
            except OSError as err:
                log.warning("%s: back-end channel failed: %s", conn.name, err)
                self._lose_channel(conn)
                return

    def _read_channel(self, conn: Connection) -> None:
        """The front-end's acks to our requests: nothing waits on them, so they
        are read and dropped; end of stream or an error ends the channel."""
        try:
            data = conn.channel.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lose_channel(conn)

    def _lose_channel(self, conn: Connection) -> None:
        self._close_channel(conn)
        conn.backend.backend_channel_lost()

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
        self._adopt_or_close(ep, sock)

    def _service(self, conn: Connection) -> int:
        try:
            frames = conn.reader.read_from(conn.sock, MAX_MESSAGES_PER_ROUND)
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
        except Exception:
            log.error("%s: unexpected error reading from the front-end; closing this connection",
                      conn.name, exc_info=True)
            self._close_conn(conn)
            return 0
        for i, frame in enumerate(frames):
            try:
                alive = self._handle_frame(conn, frame)
            except Exception:
                log.error("%s: unexpected error handling %s; closing this connection",
                          conn.name, _request_name(frame), exc_info=True)
                self._close_conn(conn)
                alive = False
            if not alive:
                # The frames after it were for a connection that no longer exists.
                for rest in frames[i + 1:]:
                    close_fds(rest.fds)
                return i + 1
        return len(frames)

    def _handle_frame(self, conn: Connection, frame) -> bool:
        """Handle one message and send its replies; False once the connection is closed."""
        outcome = conn.backend.handle(frame)
        try:
            for data, fds in outcome.replies:
                send_message(conn.sock, data, fds, timeout=REPLY_TIMEOUT_S)
        except OSError as err:   # MessageTimeout too: the front-end does not read its replies
            self._drop(conn, f"cannot reply: {err}")
            return False
        if outcome.backend_channel is not None:
            self._adopt_channel(conn, outcome.backend_channel)
        if outcome.close:
            self._drop(conn, f"closing: {conn.backend.broken_reason}")
            return False
        conn.backend.after_reply()
        self._send_backend_requests(conn)
        return True

    def _drop(self, conn: Connection, why: str) -> None:
        log.warning("%s: %s", conn.name, why)
        self._close_conn(conn)

    def _close_conn(self, conn: Connection) -> None:
        """Forget the connection first, then release it: even if releasing fails
        part-way, the loop never serves it again and the endpoint takes a new one."""
        if conn in self.connections:
            self.connections.remove(conn)
        if conn.endpoint is not None and conn.endpoint.conn is conn:
            conn.endpoint.conn = None
            conn.endpoint.next_connect = time.monotonic() + RECONNECT_S
        conn.backend.wake = lambda: None  # its interrupt poller may outlive this server
        self._close_channel(conn)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.reader.close()
        conn.sock.close()
        try:
            conn.backend.close()  # stops its VF
        except Exception:
            log.error("%s: closing its back-end failed; the connection is gone anyway",
                      conn.name, exc_info=True)

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
        with self._wake_lock:
            wake_r, wake_w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = -1
            os.close(wake_r)
            os.close(wake_w)
