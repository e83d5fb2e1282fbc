"""Operating `ifcvf serve` (issue 14): the control socket and `ifcvf ctl`, the metrics
endpoint, JSON logs.  The bar of a new user, each step as a test, against a real
`ifcvf serve` process (bounded in time, killed by PID):

    ifcvf serve --socket A --device sim --control C --metrics 127.0.0.1:PORT
    ifcvf ctl --control C add B sim; list --json; stats --json; /metrics; remove B
"""
from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from ifcvf.tools import extras
from ifcvf.tools.control import ControlServer, check_request, ControlError, request
from ifcvf.tools.daemon import Daemon

pytest.importorskip("simpy")
pytest.importorskip("prometheus_client")

START_TIMEOUT_S = 60
CTL_TIMEOUT_S = 60


class Serve:
    """One `ifcvf serve` process; its stderr is drained by a thread and kept."""

    def __init__(self, args: list[str], cwd, *, wait_for: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "ifcvf", *args], cwd=cwd,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        self.wait_line(wait_for, START_TIMEOUT_S)

    def _drain(self) -> None:
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append(None)   # end of stream
            self._cond.notify_all()

    def wait_line(self, pattern: str, timeout: float) -> re.Match:
        """The first stderr line matching ``pattern``; fails after ``timeout`` s or at exit."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if line is None:
                        pytest.fail(f"ifcvf serve exited ({self.proc.poll()}) before {pattern!r}:\n"
                                    + "\n".join(filter(None, self.lines)))
                    m = regex.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {pattern!r} from ifcvf serve within {timeout} s:\n" + "\n".join(self.lines))
                self._cond.wait(left)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        return self.proc.returncode


def ctl(control: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ifcvf", "ctl", "--control", control, *args],
                          capture_output=True, text=True, timeout=CTL_TIMEOUT_S, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ctl")
    proc = Serve(["serve", "--socket", "A", "--device", "sim", "--control", "C",
                  "--metrics", "127.0.0.1:0"], tmp, wait_for=r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
    proc.tmp = tmp
    proc.control = str(tmp / "C")
    proc.port = int(proc.wait_line(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", 1).group(1))
    yield proc
    assert proc.stop() == 0, "\n".join(filter(None, proc.lines))


def listed(serve) -> list[dict]:
    out = ctl(serve.control, "list", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def vhost_get_features(sock: socket.socket) -> int:
    """GET_FEATURES (request 1, version 1) on a vhost-user socket; the u64 reply."""
    sock.sendall(struct.pack("=III", 1, 1, 0))
    data = b""
    while len(data) < 20:
        chunk = sock.recv(20 - len(data))
        assert chunk, "the back-end closed the connection"
        data += chunk
    request, flags, size = struct.unpack("=III", data[:12])
    assert (request, size) == (1, 8)
    return struct.unpack("=Q", data[12:])[0]


# --- the bar of a new user -----------------------------------------------------------
def test_control_socket_is_created_0600(serve):
    mode = os.stat(serve.control).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_ctl_add_b_sim_and_list_json_shows_two_vfs(serve):
    out = ctl(serve.control, "add", "B", "sim")
    assert out.returncode == 0, out.stderr
    assert "serving sim on B" in out.stdout
    try:
        vfs = listed(serve)
        assert [vf["socket"] for vf in vfs] == ["A", "B"]
        for vf in vfs:
            assert vf["device"] == "sim" and vf["devargs"] == "vdpa=1"
            assert vf["state"] == "stopped" and vf["connected"] is False
            assert {"features", "queues", "queue_pairs"} <= set(vf)
        assert stat.S_IMODE(os.stat(serve.tmp / "B").st_mode) == 0o600
    finally:
        assert ctl(serve.control, "remove", "B").returncode == 0


def test_stats_json_for_every_vf_one_vf_and_one_queue(serve):
    out = ctl(serve.control, "stats", "--json")
    assert out.returncode == 0, out.stderr
    every = json.loads(out.stdout)
    assert [vf["socket"] for vf in every] == ["A"]
    a = every[0]
    assert a["migration"]["phase"] == "none" and a["migration"]["mode"] == "hw-logging"
    assert [q["direction"] for q in a["queues"][:2]] == ["rx", "tx"]
    assert set(a["queues"][0]["driver"]) >= {"kicks", "interrupts", "relayed", "polls", "pages_logged"}
    assert a["queues"][0]["device"]["frames"] == 0          # the model's counters, on sim
    assert a["queues"][0]["device"]["drops"] == {"fifo_full": 0, "not_running": 0,
                                                 "flushed_at_stop": 0, "too_big": 0, "oversize": 0}
    assert a["queues"][1]["device"]["drops"] == {"runt": 0, "oversize": 0}
    one = json.loads(ctl(serve.control, "stats", "A", "3", "--json").stdout)
    assert [q["index"] for q in one["queues"]] == [3] and one["queues"][0]["direction"] == "tx"
    text = ctl(serve.control, "stats", "A")
    assert text.returncode == 0 and "migration: hw-logging, phase none" in text.stdout


def test_metrics_has_ifcvf_samples(serve):
    with urllib.request.urlopen(f"http://127.0.0.1:{serve.port}/metrics", timeout=30) as reply:
        body = reply.read().decode()
    assert re.search(r'^ifcvf_up 1\.0$', body, re.M)
    assert re.search(r'^ifcvf_vf_info\{.*vf="A".*\} 1\.0$', body, re.M)
    assert re.search(r'^ifcvf_queue_frames_total\{direction="rx",queue="0",vf="A"\} 0\.0$', body, re.M)
    assert re.search(r'^ifcvf_queue_kicks_relayed_total\{direction="tx",queue="1",vf="A"\} 0\.0$', body, re.M)
    assert re.search(r'^ifcvf_queue_dropped_frames_total\{direction="rx",queue="0",reason="fifo_full",'
                     r'vf="A"\} 0\.0$', body, re.M)
    assert re.search(r'^ifcvf_migration_phase\{phase="none",vf="A"\} 1\.0$', body, re.M)
    assert "# TYPE ifcvf_migration_last_downtime_seconds gauge" in body


def test_remove_b_works_and_the_other_vf_keeps_its_front_end(serve):
    front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    front.settimeout(30)
    front.connect(str(serve.tmp / "A"))
    try:
        features = vhost_get_features(front)
        assert ctl(serve.control, "add", "B", "sim").returncode == 0
        assert [vf["connected"] for vf in listed(serve)] == [True, False]
        out = ctl(serve.control, "remove", "B")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "removed B"
        assert not (serve.tmp / "B").exists()
        assert [vf["socket"] for vf in listed(serve)] == ["A"]
        # A's front-end never noticed: same connection, same answers.
        assert vhost_get_features(front) == features
        assert listed(serve)[0]["connected"] is True
    finally:
        front.close()


def test_malformed_and_refused_requests_get_an_error_and_change_nothing(serve):
    before = listed(serve)
    bad = [
        (b"not json\n", "malformed request"),
        (b"[1, 2]\n", "a request is a JSON object"),
        (b'{"cmd": "reboot"}\n', "unknown command 'reboot'"),
        (b'{"cmd": "add", "socket": "X"}\n', "'device' is required"),
        (b'{"cmd": "add", "socket": "X", "device": 7}\n', "'device' must be a string"),
        (b'{"cmd": "list", "force": true}\n', "unknown key(s) force"),
        (b'{"cmd": "stats", "socket": "A", "queue": 99}\n', "has queues 0..7, not 99"),
        (b'{"cmd": "remove", "socket": "nope"}\n', "no VF is served on nope"),
        (b'{"cmd": "add", "socket": "A", "device": "sim"}\n', "A is already served"),
        (b'{"cmd": "add", "socket": "X", "device": "0000:zz"}\n', "neither `sim`"),
        (b'{"cmd": "add", "socket": "X", "device": "sim", "devargs": "vdpa=1,bogus=1"}\n', "bogus"),
    ]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(serve.control)
        reader = s.makefile("rb")
        for line, error in bad:
            s.sendall(line)
            reply = json.loads(reader.readline())
            assert reply["ok"] is False and error in reply["error"], (line, reply)
        # The same connection still serves a good request afterwards.
        s.sendall(b'{"cmd": "list"}\n')
        assert json.loads(reader.readline())["ok"] is True
    assert listed(serve) == before
    assert not (serve.tmp / "X").exists()
    out = ctl(serve.control, "remove", "nope")
    assert out.returncode == 1 and "no VF is served on nope" in out.stderr


def test_ctl_without_a_daemon_says_so(tmp_path):
    out = ctl(str(tmp_path / "none"), "list")
    assert out.returncode == 2 and "no ifcvf serve on control socket" in out.stderr


def test_log_format_json_prints_one_object_per_line(tmp_path):
    proc = Serve(["serve", "--log-format", "json", "--socket", "V", "--device", "sim"], tmp_path,
                 wait_for=r'"serving sim on V')
    try:
        line = next(line for line in proc.lines if line and "serving sim on V" in line)
        record = json.loads(line)
        assert record["level"] == "warning" and record["logger"] == "ifcvf.serve"
        assert record["message"].startswith("serving sim on V")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    finally:
        assert proc.stop() == 0


# --- in-process: what a subprocess cannot show ------------------------------------------
def test_a_peer_with_another_uid_is_refused_by_so_peercred(tmp_path):
    daemon = Daemon()
    path = str(tmp_path / "c")
    control = ControlServer(path, daemon, allowed_uids={os.geteuid() + 4242})
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(path)
            s.sendall(b'{"cmd": "add", "socket": "X", "device": "sim"}\n')
            daemon.server.poll_once(5)          # accepts, checks the peer's uid, refuses
            reply = json.loads(s.makefile("rb").readline())
        assert reply["ok"] is False and reply["error"].startswith(f"unauthorised: uid {os.geteuid()}")
        assert daemon.vfs == {} and not (tmp_path / "X").exists()
        assert control.clients == set()
    finally:
        control.close()
        daemon.close()


def test_the_loop_is_never_blocked_by_a_slow_or_partial_client(tmp_path):
    """Half a request waits in its buffer; the loop serves everyone else meanwhile."""
    daemon = Daemon()
    path = str(tmp_path / "c")
    control = ControlServer(path, daemon)
    try:
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.connect(path)
        slow.sendall(b'{"cmd": "li')
        fast = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fast.settimeout(30)
        fast.connect(path)
        fast.sendall(b'{"cmd": "list"}\n')
        sel = selectors.DefaultSelector()
        sel.register(fast, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        while not sel.select(0) and time.monotonic() < deadline:
            daemon.server.poll_once(0.1)
        assert json.loads(fast.makefile("rb").readline()) == {"ok": True, "result": []}
        slow.sendall(b'st"}\n')
        slow.settimeout(30)
        sel.unregister(fast)
        sel.register(slow, selectors.EVENT_READ)
        while not sel.select(0) and time.monotonic() < deadline:
            daemon.server.poll_once(0.1)
        assert json.loads(slow.makefile("rb").readline()) == {"ok": True, "result": []}
        # An over-long line is refused and its connection closed.
        fast.close()
        slow.sendall(b"x" * (70 * 1024))
        while time.monotonic() < deadline and control.clients:
            daemon.server.poll_once(0.1)
        data = slow.makefile("rb").read()
        assert b"request longer than" in data
        slow.close()
        sel.close()
    finally:
        control.close()
        daemon.close()


def test_check_request_rules():
    assert check_request({"cmd": "stats", "socket": "A", "queue": 2}) == ("stats", {"socket": "A", "queue": 2})
    for req, error in [({"cmd": "stats", "queue": 1}, "a queue needs its socket"),
                       ({"cmd": "stats", "socket": "A", "queue": True}, "must be an integer"),
                       ({"cmd": "remove", "socket": ""}, "non-empty"),
                       ({"cmd": None}, 'needs "cmd"')]:
        with pytest.raises(ControlError, match=re.escape(error)):
            check_request(req)


def test_metrics_without_its_extra_names_the_extra(monkeypatch, capsys, tmp_path):
    from ifcvf.tools.cli import main

    monkeypatch.setattr(extras, "_installed", lambda module: module != "prometheus_client")
    rc = main(["serve", "--socket", str(tmp_path / "v"), "--device", "sim", "--metrics", "127.0.0.1:0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--metrics (the Prometheus endpoint) needs the `metrics` extra" in err
    assert "pip install 'ifcvf[metrics]'" in err
    assert not (tmp_path / "v").exists()     # nothing was opened


def test_request_client_reports_a_closed_socket(tmp_path):
    from ifcvf.tools.control import ControlUnavailable

    with pytest.raises(ControlUnavailable, match="no ifcvf serve on control socket"):
        request(str(tmp_path / "absent"), {"cmd": "list"}, timeout=5)


def _vf_stats(counter: int) -> dict:
    """What `ctl stats --json` gets for a VF with two queues, every counter ``counter``."""
    queue = {"driver": dict.fromkeys(("kicks", "interrupts", "relayed", "polls", "pages_logged"), counter),
             "device": {"frames": counter, "bytes": counter, "dropped": counter, "bad_descriptors": 0,
                        "drops": {"fifo_full": counter}},
             "running": True, "broken": None}
    return {"socket": "/run/ifcvf/vf0.sock", "name": "vf0", "kind": "IFCVF net (N3000)",
            "state": "hw-logging", "features": "0x1300000000",
            "migration": {"mode": "hw-logging", "phase": "logging", "migrations": 1, "switch_overs": 0,
                          "pauses": 0, "last_precopy_s": None, "last_downtime_s": None},
            "queues": [{**queue, "index": i, "direction": "rx" if i % 2 == 0 else "tx"} for i in (0, 1)]}


def test_ctl_text_fits_80_columns_and_keeps_large_counters_whole():
    """Columns as wide as their values: a VF's everyday counts fit an 80-column
    terminal, and a counter of any size is printed whole (the table widens)."""
    from ifcvf.tools.commands.ctl import render

    small = render("stats", [_vf_stats(12345)])
    assert max(map(len, small.splitlines())) <= 80
    assert "migration: hw-logging, phase logging, 1 started" in small
    assert small.count("drops: fifo_full 12345") == 2
    big = render("stats", [_vf_stats(10**15 + 7)])
    assert big.count(str(10**15 + 7)) == 2 * 9       # nine counters per queue row, whole
    listing = render("list", [{"socket": "/run/ifcvf/vf0.sock", "device": "0000:3b:00.2",
                               "state": "direct", "connected": True, "features": "0x1300000000",
                               "queues": [0, 1, 2, 3], "devargs": "vdpa=1,sw-live-migration=1"}])
    header, row = listing.splitlines()
    assert row.split() == ["/run/ifcvf/vf0.sock", "0000:3b:00.2", "direct", "yes", "0x1300000000",
                           "0,1,2,3", "vdpa=1,sw-live-migration=1"]
    assert header.index("DEVICE") == len("/run/ifcvf/vf0.sock") + 1    # sized by its values
