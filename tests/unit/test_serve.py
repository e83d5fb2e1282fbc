"""`ifcvf serve` as a process: sockets 0600, several VFs, client mode, SIGTERM."""
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time

from ifcvf.vhost import protocol as p
from sim.frontend import FrontEnd

TIMEOUT = 30.0


class Served:
    """A running `ifcvf serve`, read line by line from its stderr."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "ifcvf", "-v", "serve", *args],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        self.lines: list[str] = []
        self._partial = b""

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if text in line:
                    self.lines.remove(line)
                    return line
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"no {text!r} from ifcvf serve; saw: {self.lines}")
            # Raw reads: a buffered readline() would hide lines from select().
            ready, _, _ = select.select([self.proc.stderr], [], [], left)
            if ready:
                chunk = os.read(self.proc.stderr.fileno(), 65536)
                *complete, self._partial = (self._partial + chunk).split(b"\n")
                self.lines += [line.decode(errors="replace") for line in complete]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def frontend(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return FrontEnd(sock, timeout=TIMEOUT)


def test_two_vfs_sockets_0600_and_sigterm(tmp_path):
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    served = Served("--socket", str(a), "--device", "sim", "--socket", str(b), "--device", "sim")
    try:
        served.wait_for(f"serving sim on {b}")
        for path in (a, b):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            fe = frontend(path)
            assert fe.get_u64(p.Request.GET_FEATURES) >> p.F_LOG_ALL & 1
            fe.close()
        assert served.stop() == 0
    finally:
        served.stop()
    assert not a.exists() and not b.exists()


def test_one_front_end_per_vf(tmp_path):
    path = tmp_path / "vf.sock"
    served = Served("--socket", str(path), "--device", "sim")
    try:
        served.wait_for("serving sim")
        first = frontend(path)
        served.wait_for("front-end connected")
        second = frontend(path)
        served.wait_for("a second front-end tried to connect")
        assert second.sock.recv(1) == b""
        assert first.get_u64(p.Request.GET_FEATURES)  # the first one is still served
        first.close()
        second.close()
    finally:
        assert served.stop() == 0


def test_client_mode_reconnects(tmp_path):
    path = tmp_path / "qemu.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    served = Served("--client", "--socket", str(path), "--device", "sim")
    try:
        for _ in range(2):  # connect, drop, and it comes back
            conn, _ = listener.accept()
            fe = FrontEnd(conn, timeout=TIMEOUT)
            assert fe.get_u64(p.Request.GET_FEATURES)
            fe.close()
        assert served.stop() == 0
    finally:
        served.stop()
        listener.close()


def test_unknown_device_fails_with_the_reason(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ifcvf", "serve", "--socket", str(tmp_path / "x"),
                           "--device", "sim", "--devargs", "vdpa=1,turbo=1"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1
    assert "unknown key 'turbo'" in proc.stderr


def test_print_capabilities_is_plain_json():
    proc = subprocess.run([sys.executable, "-m", "ifcvf", "serve", "--print-capabilities"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {"type": "net", "features": []}


def test_mismatched_pairs_are_explained():
    proc = subprocess.run([sys.executable, "-m", "ifcvf", "serve", "--socket", "/tmp/x"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0 and "in pairs" in proc.stderr
