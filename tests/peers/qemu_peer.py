"""Host-side helpers for tests where real QEMU is the vhost-user front-end of `ifcvf serve`.

- ``Serve``: `ifcvf serve` as a subprocess; its log (stderr) is read by a
  thread into lines that ``wait_for`` blocks on; killed by PID on every way
  out (SIGTERM first, SIGKILL if it does not go, and PDEATHSIG if the test
  process dies first).
- ``Qmp``: the smallest QMP client that works: JSON lines over the unix
  socket, greeting, ``qmp_capabilities``, then commands; events that arrive
  while waiting for a reply are kept for ``wait_event``.
- ``vhost_user_config``: the guest options for a vhost-user NIC the way
  QEMU 7.2 needs them under TCG (shared memfd guest RAM, or a shared RAM
  file, ``vectors=0``).
- For two QEMUs (test_two_qemu_migration.py): ``Reflector`` (a UDP wire end
  that sends every frame back, MACs swapped, to whichever VF sent it),
  ``SerialLines`` (a guest serial port on a socket, lines with host arrival
  times), ``QemuProcess`` (a QEMU from a full command line, killed by PID).
"""
from __future__ import annotations

import ctypes
import json
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from guest import NIC_MAC, GuestConfig

ROOT = Path(__file__).resolve().parents[2]


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Serve:
    """A running `ifcvf -vv serve ...`; ``lines`` is everything it logged so far."""

    def __init__(self, *args: str, verbosity: str = "-vv"):
        self.args = args
        self.proc = subprocess.Popen([sys.executable, "-m", "ifcvf", verbosity, "serve", *args],
                                     cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, name="serve-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            with self._changed:
                self._lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def lines(self) -> list[str]:
        with self._changed:
            return list(self._lines)

    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        """The first log line from index ``start`` on that matches ``pattern`` (regex)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._lines[start:]:
                    m = regex.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    break
                self._changed.wait(left)
        why = "ifcvf serve exited" if self._eof else f"not within {timeout:.0f} s"
        raise AssertionError(f"no log line matching {pattern!r} from ifcvf serve ({why}); log:\n"
                             + "\n".join(self._lines[-80:]))

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; the exit status.  Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=10)
        return self.proc.returncode

    def __enter__(self) -> "Serve":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class QmpError(Exception):
    pass


class Qmp:
    """QMP over a unix socket: ``execute(cmd, **args)`` returns ``return``; errors raise."""

    def __init__(self, path: Path, timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.timeout = timeout
        self._buf = b""
        self.events: list[dict] = []
        greeting = self._read(timeout)
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise QmpError(f"no QMP message within {timeout:.0f} s")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QmpError("QEMU closed the QMP socket")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read(self.timeout)
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QmpError(f"{command}: {reply['error']}")
            elif "return" in reply:
                return reply["return"]

    def poll_events(self) -> None:
        """Take in events already sent, without blocking."""
        while b"\n" in self._buf or select.select([self.sock], [], [], 0)[0]:
            reply = self._read(self.timeout)
            if "event" in reply:
                self.events.append(reply)

    def wait_event(self, name: str, timeout: float, **data) -> dict:
        """The first event ``name`` whose data holds ``data``, kept or still to come."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["event"] == name and all(event.get("data", {}).get(k) == v
                                                  for k, v in data.items()):
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError(f"no {name} {data} event within {timeout:.0f} s; saw "
                               f"{[e['event'] for e in self.events]}")
            self.events.append(self._read(left))

    def close(self) -> None:
        self.sock.close()


def vhost_user_config(socket_path: Path, qmp_path: Path, *, memory_mib: int = 512,
                      kernel_args: str = "quiet", ram_file: Path | None = None,
                      extra_qemu_args: list[str] | tuple[str, ...] = ()) -> GuestConfig:
    """A guest whose only NIC is virtio-net-pci on a vhost-user netdev (real-peers.md §3).

    - Guest RAM is one shared memfd (a NUMA node's memdev), so the back-end can
      map it from the fd QEMU sends with SET_MEM_TABLE; with ``ram_file`` it is
      that file instead (``memory-backend-file``, ``share=on``: the file is the
      guest's RAM, so a test can read it).
    - ``vectors=0``: QEMU 7.2 under TCG segfaults when a vhost NIC's guest
      driver enables MSI-X (NULL vector_irqfd); with no vectors the guest uses
      INTx, which QEMU raises when the back-end writes the call eventfd.
    - No iommu_platform: the back-end sees guest-physical addresses, as vhost
      does for a NIC outside the vIOMMU.
    """
    backend = (f"memory-backend-file,id=mem0,size={memory_mib}M,mem-path={ram_file},share=on"
               if ram_file is not None else
               f"memory-backend-memfd,id=mem0,size={memory_mib}M,share=on")
    return GuestConfig(
        memory_mib=memory_mib, kernel_args=kernel_args, nic=False,
        extra_qemu_args=[
            "-object", backend,
            "-numa", "node,memdev=mem0",
            "-chardev", f"socket,id=vhu0,path={socket_path}",
            "-netdev", "vhost-user,id=n0,chardev=vhu0",
            "-device", f"virtio-net-pci,netdev=n0,mac={NIC_MAC},vectors=0",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            *extra_qemu_args,
        ])


class UdpEnd:
    """The host end of the VF's UDP wire.

    Race-free ports: this end binds first; `ifcvf serve --wire udp:0:HOST`
    lets the kernel pick the VF's end, and ``attach`` reads it from the log.
    """

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.host_port = self.sock.getsockname()[1]
        self.vf_port: int | None = None

    @property
    def wire(self) -> str:
        return f"udp:0:{self.host_port}"

    def attach(self, serve: "Serve", timeout: float) -> None:
        m = serve.wait_for(rf"wire udp 127\.0\.0\.1:(\d+) -> 127\.0\.0\.1:{self.host_port}$", timeout)
        self.vf_port = int(m.group(1))

    def send(self, frame: bytes) -> None:
        self.sock.sendto(frame, ("127.0.0.1", self.vf_port))

    def receive(self, timeout: float) -> bytes | None:
        if not select.select([self.sock], [], [], max(timeout, 0))[0]:
            return None
        data, addr = self.sock.recvfrom(65536)
        assert addr == ("127.0.0.1", self.vf_port), f"a datagram from {addr}, not from the VF's wire"
        return data

    def close(self) -> None:
        self.sock.close()


# --- ICMP echo as raw Ethernet frames (the guest kernel answers them) -------------------
def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ipv4(src: str, dst: str, payload: bytes, ident: int) -> bytes:
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident & 0xFFFF,
                                   0, 64, 1, 0, socket.inet_aton(src), socket.inet_aton(dst)))
    struct.pack_into("!H", header, 10, _checksum(bytes(header)))
    return bytes(header) + payload


def icmp_echo(dst_mac: bytes, src_mac: bytes, src_ip: str, dst_ip: str, ident: int, seq: int,
              data: bytes) -> bytes:
    """An Ethernet frame holding an ICMP echo request."""
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data)
    struct.pack_into("!H", icmp, 2, _checksum(bytes(icmp)))
    return dst_mac + src_mac + b"\x08\x00" + _ipv4(src_ip, dst_ip, bytes(icmp), seq)


def icmp_reply_of(frame: bytes) -> tuple[bytes, bytes, str, str, int, int, bytes] | None:
    """(dst_mac, src_mac, src_ip, dst_ip, id, seq, data) of an ICMP echo reply with good checksums."""
    if len(frame) < 14 + 20 + 8 or frame[12:14] != b"\x08\x00" or frame[14] != 0x45:
        return None
    ip = frame[14:34]
    total = int.from_bytes(ip[2:4], "big")
    if ip[9] != 1 or _checksum(ip) != 0 or total > len(frame) - 14:
        return None
    icmp = frame[34:14 + total]
    if icmp[0] != 0 or _checksum(icmp) != 0:
        return None
    ident, seq = struct.unpack("!HH", icmp[4:8])
    return (frame[0:6], frame[6:12], socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]),
            ident, seq, icmp[8:])


# --- for tests with more than one QEMU (test_two_qemu_migration.py) -----------------------
class Reflector:
    """One UDP socket on loopback that sends every datagram back to its sender, MACs swapped.

    Any number of `ifcvf serve --wire udp:0:PORT` can point at ``port``: each
    frame goes back to the address it came from, so after a migration the
    destination's VF is answered as soon as it sends.  A guest's ICMP echo
    request to a peer address therefore comes back to the guest as a frame
    addressed to it (which its kernel drops, after its driver counted it).
    ``arrivals`` keeps the host time of every frame, per sender.
    """

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.arrivals: dict[tuple[str, int], list[float]] = {}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reflector", daemon=True)
        self._thread.start()

    @property
    def wire(self) -> str:
        return f"udp:0:{self.port}"

    def _run(self) -> None:
        while not self._stop.is_set():
            if not select.select([self.sock], [], [], 0.1)[0]:
                continue
            try:
                data, addr = self.sock.recvfrom(65536)
            except OSError:          # ICMP port unreachable from a VF that went away
                self.errors += 1
                continue
            self.arrivals.setdefault(addr, []).append(time.monotonic())
            if len(data) >= 14:
                try:
                    self.sock.sendto(data[6:12] + data[0:6] + data[12:], addr)
                except OSError:
                    self.errors += 1

    def count_between(self, start: float, end: float) -> int:
        return sum(start <= t < end for times in list(self.arrivals.values()) for t in list(times))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


class SerialLines:
    """A guest serial port on a QEMU ``socket,server=on,wait=off`` chardev: lines with host arrival times.

    ``lines`` holds ``(time.monotonic() when the line's end arrived, text)``.
    """

    def __init__(self, path: Path, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise
                time.sleep(0.05)
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serial-lines", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending = b""
        while not self._stop.is_set():
            if not select.select([self.sock], [], [], 0.1)[0]:
                continue
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            now = time.monotonic()
            pending += chunk.replace(b"\r", b"")
            *complete, pending = pending.split(b"\n")
            self.lines.extend((now, line.decode(errors="replace")) for line in complete)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


class QemuProcess:
    """A QEMU started from a full command line, output to ``log``; killed by PID on ``close``."""

    def __init__(self, args: list[str], log: Path):
        self.log_path = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    """Until a unix socket exists at ``path`` (a QEMU's QMP, say), or ``proc`` exited."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process {proc.pid} exited ({proc.returncode}) before {path} existed")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {path} within {timeout:.0f} s")
        time.sleep(0.05)
