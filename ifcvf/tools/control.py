"""The control socket of `ifcvf serve --control PATH`, and the client `ifcvf ctl` uses.

A unix stream socket created 0600, served by the same event loop as the
vhost-user sockets, never blocking it (non-blocking sockets, buffered lines).
The protocol is JSON lines: one request object per line, one response object
per line, in order.

    {"cmd": "list"}
    {"cmd": "stats"}                       every VF
    {"cmd": "stats", "socket": S}          one VF
    {"cmd": "stats", "socket": S, "queue": 0}
    {"cmd": "add", "socket": S, "device": "sim", "devargs": "vdpa=1", "wire": "udp:5001:5002"}
    {"cmd": "remove", "socket": S}

    {"ok": true, "result": ...}
    {"ok": false, "error": "what was wrong"}

A request that is not JSON, names an unknown command or key, or gives a value
of the wrong type gets an error and changes nothing.  Only the user the
daemon runs as (and root) may talk to it: the peer's uid is checked with
SO_PEERCRED at accept, on top of the socket's mode.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct

from ifcvf.vhost.server import listen_unix

log = logging.getLogger("ifcvf.control")

MAX_REQUEST = 64 * 1024     # bytes in one request line
MAX_CLIENTS = 16
MAX_PENDING_OUT = 16 << 20  # a client that stops reading is dropped past this


class ControlError(Exception):
    """A request was refused; the message goes back to the client as it is."""


# command -> {key: (type, required)}
SCHEMA: dict[str, dict[str, tuple[type, bool]]] = {
    "list": {},
    "stats": {"socket": (str, False), "queue": (int, False)},
    "add": {"socket": (str, True), "device": (str, True), "devargs": (str, False), "wire": (str, False)},
    "remove": {"socket": (str, True)},
}


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def check_request(req) -> tuple[str, dict]:
    """(command, arguments) of a decoded request; ControlError when it is malformed."""
    if not isinstance(req, dict):
        raise ControlError(f"a request is a JSON object, not {type(req).__name__}")
    cmd = req.get("cmd")
    if not isinstance(cmd, str):
        raise ControlError('a request needs "cmd": one of ' + ", ".join(SCHEMA))
    if cmd not in SCHEMA:
        raise ControlError(f"unknown command {cmd!r}: one of " + ", ".join(SCHEMA))
    schema = SCHEMA[cmd]
    args = {k: v for k, v in req.items() if k != "cmd"}
    unknown = sorted(set(args) - set(schema))
    if unknown:
        raise ControlError(f"{cmd}: unknown key(s) {', '.join(unknown)}; allowed: "
                           f"{', '.join(schema) or 'none'}")
    for key, (kind, required) in schema.items():
        if key not in args or args[key] is None:
            if required:
                raise ControlError(f"{cmd}: {key!r} is required")
            args.pop(key, None)
            continue
        value = args[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ControlError(f"{cmd}: {key!r} must be {'a string' if kind is str else 'an integer'}, "
                               f"not {json.dumps(value)}")
        if kind is str and (not value or "\0" in value):
            raise ControlError(f"{cmd}: {key!r} must be a non-empty string without NUL")
    if "queue" in args and "socket" not in args:
        raise ControlError("stats: a queue needs its socket")
    return cmd, args


class _Client:
    def __init__(self, control: "ControlServer", sock: socket.socket):
        self.control = control
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closing = False

    def on_event(self, events: int) -> None:
        import selectors

        if events & selectors.EVENT_READ and not self.closing:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                self.close()
                return
            if data:
                self.inbuf += data
                self._requests()
        self._flush()

    def _requests(self) -> None:
        while not self.closing:
            end = self.inbuf.find(b"\n")
            if end < 0:
                if len(self.inbuf) > MAX_REQUEST:
                    self._reply({"ok": False, "error": f"request longer than {MAX_REQUEST} bytes; closing"})
                    self.closing = True
                return
            line = bytes(self.inbuf[:end])
            del self.inbuf[:end + 1]
            if line.strip():
                self._reply(self.control.handle_line(line))

    def _reply(self, response: dict) -> None:
        self.outbuf += json.dumps(response, separators=(",", ":")).encode() + b"\n"

    def _flush(self) -> None:
        while self.outbuf:
            try:
                sent = self.sock.send(self.outbuf)
            except BlockingIOError:
                break
            except OSError:
                self.close()
                return
            del self.outbuf[:sent]
        if len(self.outbuf) > MAX_PENDING_OUT:
            log.warning("control: a client does not read its replies; dropped it")
            self.close()
        elif not self.outbuf and self.closing:
            self.close()
        elif self.sock.fileno() >= 0:
            self.control.server.watch(self.sock, self.on_event, write=bool(self.outbuf))

    def close(self) -> None:
        self.control.server.unwatch(self.sock)
        self.control.clients.discard(self)
        self.sock.close()


class ControlServer:
    """Serves the control socket on ``daemon``'s loop."""

    def __init__(self, path: str, daemon, *, allowed_uids: set[int] | None = None):
        self.path = path
        self.daemon = daemon
        self.server = daemon.server
        self.allowed_uids = allowed_uids if allowed_uids is not None else {os.geteuid(), 0}
        self.clients: set[_Client] = set()
        self.listener = listen_unix(path, backlog=8)
        self.server.watch(self.listener, self._accept)
        log.info("control socket %s", path)

    def _accept(self, _events: int) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            try:
                uid = peer_uid(sock)
            except OSError as err:
                uid = None
                log.warning("control: cannot read the peer's credentials: %s", err)
            if uid not in self.allowed_uids:
                log.warning("control: refused a client with uid %s", uid)
                _refuse(sock, f"unauthorised: uid {uid} may not control this ifcvf serve "
                              f"(only uid {os.geteuid()} and root may)")
                continue
            if len(self.clients) >= MAX_CLIENTS:
                _refuse(sock, f"busy: {MAX_CLIENTS} control clients are connected already")
                continue
            client = _Client(self, sock)
            self.clients.add(client)
            self.server.watch(sock, client.on_event)

    # --- requests -----------------------------------------------------------------
    def handle_line(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as err:
            return {"ok": False, "error": f"malformed request (not a JSON object on one line): {err}"}
        try:
            cmd, args = check_request(req)
            return {"ok": True, "result": getattr(self, f"_cmd_{cmd}")(**args)}
        except ControlError as err:
            return {"ok": False, "error": str(err)}
        except Exception as err:   # a bug must cost the request, not the daemon
            log.error("control: %s failed", req, exc_info=True)
            return {"ok": False, "error": f"internal error: {type(err).__name__}: {err}"}

    def _vf(self, path: str):
        vf = self.daemon.vfs.get(path)
        if vf is None:
            raise ControlError(f"no VF is served on {path} (served: "
                               f"{', '.join(self.daemon.vfs) or 'none'})")
        return vf

    def _cmd_list(self) -> list[dict]:
        return self.daemon.list()

    def _cmd_stats(self, socket: str | None = None, queue: int | None = None):
        if socket is None:
            return [{"socket": vf.path, **self.daemon.stats(vf).to_dict()} for vf in self.daemon.vfs.values()]
        vf = self._vf(socket)
        out = {"socket": socket, **self.daemon.stats(vf).to_dict()}
        if queue is not None:
            if not 0 <= queue < len(out["queues"]):
                raise ControlError(f"{socket} has queues 0..{len(out['queues']) - 1}, not {queue}")
            out["queues"] = [out["queues"][queue]]
        return out

    def _cmd_add(self, socket: str, device: str, devargs: str = "vdpa=1", wire: str | None = None) -> dict:
        from ifcvf.tools.daemon import AddError

        if socket == self.path:
            raise ControlError(f"{socket} is the control socket")
        try:
            vf = self.daemon.add(socket, device, devargs, wire)
        except AddError as err:
            raise ControlError(f"add {socket}: {err}") from None
        return self.daemon.describe(vf)

    def _cmd_remove(self, socket: str) -> dict:
        self._vf(socket)
        self.daemon.remove(socket)
        return {"socket": socket, "removed": True}

    def close(self) -> None:
        for client in list(self.clients):
            client.close()
        self.server.unwatch(self.listener)
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _refuse(sock: socket.socket, error: str) -> None:
    try:
        sock.send(json.dumps({"ok": False, "error": error}).encode() + b"\n")
    except OSError:
        pass
    sock.close()




# --- the client -------------------------------------------------------------------
class ControlUnavailable(Exception):
    """No `ifcvf serve` answers on the control socket."""


def request(path: str, req: dict, *, timeout: float = 10.0) -> dict:
    """Send one request and return the response object (``ok`` and ``result`` or ``error``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as err:
            raise ControlUnavailable(f"no ifcvf serve on control socket {path}: {err.strerror or err}") from None
        try:
            sock.sendall(json.dumps(req).encode() + b"\n")
            data = bytearray()
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            raise ControlUnavailable(f"ifcvf serve did not answer on {path} within {timeout} s") from None
        except OSError as err:
            raise ControlUnavailable(f"control socket {path}: {err}") from None
    finally:
        sock.close()
    if not data:
        raise ControlUnavailable(f"ifcvf serve closed control socket {path} without an answer")
    return json.loads(data)
