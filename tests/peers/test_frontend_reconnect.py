"""The front-end goes away and comes back: `ifcvf serve --client` keeps running and reconnects by itself.

Issue 13: "front-end disconnect and reconnect as a real process action".
QEMU 7.2 (TCG) is the vhost-user socket server
(``-chardev socket,...,server=on,wait=off``); one
``ifcvf -vv serve --client --socket SOCK --device sim --wire udp:... --control CTL``
runs through three guests on the same socket path:

1. guest 1 boots and pings through the VF (a UDP ``Reflector`` on the wire
   sends each frame back, so both directions run); then its QEMU is
   SIGKILLed: the socket closes with no GET_VRING_BASE;
2. guest 2, a new QEMU on the same path, boots; the serve, which retries
   the connection every second, connects, is set up from scratch and
   carries traffic both ways; then QEMU quits gracefully (QMP ``quit``:
   it stops the vhost device with GET_VRING_BASE, then closes);
3. guest 3 boots the same way and traffic flows again.

Each time the serve must log why the front-end went away, tear the VF down
(``ifcvf ctl list --json``: not connected, state ``stopped``) and set it up
again for the new guest (connected, ``direct``, rings running).  Nothing
leaks across a reconnect: the serve's open fds, the eventfds among them,
its threads and its memfd mappings are the same while guest 2 and guest 3
run as while guest 1 ran.

About 30-40 s on 2 cores (three boots of ~7-10 s).

    IFCVF_REQUIRE_PEERS=1 .venv/bin/python -m pytest -q tests/peers/test_frontend_reconnect.py -s
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from guest_image import EXIT_MARKER, HELD_MARKER, HOLD_FAILED
from qemu_peer import Qmp, Reflector, SerialLines, Serve, vhost_user_config
from test_serve_client_restart import wait_rx_growth
import pytest

pytestmark = [pytest.mark.peer, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("guest_two_qemu.sh")
GUEST_IP, PEER_IP, PEER_MAC = "10.11.13.2", "10.11.13.1", "02:00:00:00:13:01"
PING_INTERVAL_S = 0.005
SAMPLE_INTERVAL_S = 0.05
KERNEL_ARGS = "quiet ifcvf_hold=1"
TRAFFIC_TIMEOUT_S = 30.0


def ctl_list(control: Path) -> dict:
    """The one VF as `ifcvf ctl list --json` describes it."""
    out = subprocess.run([sys.executable, "-m", "ifcvf", "ctl", "--control", str(control), "list", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30, check=True).stdout
    (vf,) = json.loads(out)
    return vf


def vf_when(control: Path, done, what: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        vf = ctl_list(control)
        if done(vf):
            return vf
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s; last: {vf}")
        time.sleep(0.05)


def resources(pid: int) -> dict:
    """What a leak would grow: open fds, the eventfds among them, threads, memfd mappings."""
    fds = eventfds = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue          # closed while we looked
        fds += 1
        eventfds += target == "anon_inode:[eventfd]"
    with open(f"/proc/{pid}/maps") as maps:
        memfd_maps = sum("/memfd:" in line for line in maps)
    return {"fds": fds, "eventfds": eventfds, "threads": len(os.listdir(f"/proc/{pid}/task")),
            "memfd_maps": memfd_maps}


def resources_settled(pid: int, timeout: float = 10.0, want: dict | None = None) -> dict:
    """``resources`` once two samples in a row agree (a `ctl` connection the serve is still
    closing is not a leak), and equal ``want`` if given; the last sample at the deadline."""
    deadline = time.monotonic() + timeout
    last = resources(pid)
    while True:
        time.sleep(0.1)
        now = resources(pid)
        if now == last and (want is None or now == want):
            return now
        if time.monotonic() > deadline:
            return now
        last = now


class Guests:
    """Boots guests on the same vhost-user socket, each with its own QMP and serial sockets."""

    def __init__(self, guest_env, work: Path, sock: Path, stack: contextlib.ExitStack):
        self.guest_env, self.work, self.sock, self.stack = guest_env, work, sock, stack
        self.count = 0

    def boot(self):
        """(guest, serial, qmp path) of a new guest whose network is up and pinging."""
        self.count += 1
        n = self.count
        qmp, rxc = self.work / f"qmp{n}.sock", self.work / f"rxc{n}.sock"
        cfg = vhost_user_config(
            self.sock, qmp, kernel_args=KERNEL_ARGS,
            extra_qemu_args=["-chardev", f"socket,id=rxc,path={rxc},server=on,wait=off",
                             "-serial", "chardev:rxc"])
        chardev = f"socket,id=vhu0,path={self.sock}"     # QEMU is the server
        cfg.extra_qemu_args = [a + ",server=on,wait=off" if a == chardev else a
                               for a in cfg.extra_qemu_args]
        guest = self.guest_env.start(["/bin/sh", str(SCRIPT), GUEST_IP, PEER_IP, PEER_MAC,
                                      str(PING_INTERVAL_S), str(SAMPLE_INTERVAL_S)],
                                     results_dir=self.work / f"results{n}", config=cfg, cwd=str(ROOT))
        self.stack.callback(guest.close)
        serial = SerialLines(rxc, timeout=60)
        self.stack.callback(serial.close)
        ready = guest.wait_for(rf"^(?:TWO-QEMU READY .*|{EXIT_MARKER} {guest.token} -?\d+)$", timeout=240)
        assert ready.group(0).startswith("TWO-QEMU READY"), ready.group(0)
        held = guest.wait_for(rf"^(?:{HELD_MARKER}|{HOLD_FAILED}) {guest.token}\b.*$", timeout=60)
        assert held.group(0).startswith(HELD_MARKER), held.group(0)
        return guest, serial, qmp


def traffic_both_ways(serial: SerialLines, reflector: Reflector, wire_port: int, why: str) -> None:
    """The guest receives (RX counter grows: frames the VF wrote) and sends (the wire sees frames)."""
    since = time.monotonic()
    wait_rx_growth(serial, since, 100, TRAFFIC_TIMEOUT_S, why)
    deadline = time.monotonic() + TRAFFIC_TIMEOUT_S
    while reflector.count_between(since, time.monotonic() + 1) < 100:
        assert time.monotonic() < deadline, f"{why}: TX did not reach the wire"
        time.sleep(0.05)
    assert ("127.0.0.1", wire_port) in reflector.arrivals


def wait_torn_down(serve: Serve, control: Path, start: int) -> str:
    """The serve logged why the front-end went away and the VF is stopped and unconnected; the reason."""
    reason = serve.wait_for(r"front-end disconnected \((.+)\)$", 30, start).group(1)
    serve.wait_for(r"datapath down", 30, start)
    vf_when(control, lambda vf: not vf["connected"] and vf["state"] == "stopped" and not vf["queues"],
            "the VF torn down after the front-end left")
    return reason


def wait_set_up(serve: Serve, control: Path, start: int) -> dict:
    """The serve reconnected and the VF runs for the new guest: connected, direct, both rings."""
    serve.wait_for(r"connected to ", 60, start)
    serve.wait_for(r"datapath up \(direct\)", 60, start)
    return vf_when(control, lambda vf: vf["connected"] and vf["state"] == "direct"
                   and sorted(vf["queues"]) == [0, 1], "the VF set up for the new guest")


def test_frontend_killed_and_quit_serve_client_reconnects(guest_env):
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ifcvf-fr-"))     # short unix socket paths
    sock, control = work / "vhu.sock", work / "ctl.sock"
    report: dict = {}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        reflector = Reflector()
        stack.callback(reflector.close)
        serve = Serve("--client", "--socket", str(sock), "--device", "sim", "--wire", reflector.wire,
                      "--control", str(control))
        stack.callback(serve.stop)
        serve.wait_for(r"control socket on ", timeout=60)
        guests = Guests(guest_env, work, sock, stack)

        # 1. The first guest; traffic both ways; what the serve holds while it runs.
        guest, serial, _ = guests.boot()
        wire_port = int(serve.wait_for(r"wire udp 127\.0\.0\.1:(\d+) -> ", 5).group(1))
        wait_set_up(serve, control, 0)
        traffic_both_ways(serial, reflector, wire_port, "guest 1")
        before = resources_settled(serve.proc.pid)
        assert before["eventfds"] >= 2, before       # non-vacuous: the kick and call fds at least
        report["resources"] = before
        report["boot1_s"] = round(time.monotonic() - started, 1)

        # SIGKILL: the socket closes with no GET_VRING_BASE.
        mark = len(serve.lines)
        os.kill(guest.proc.pid, signal.SIGKILL)
        guest.close()
        serial.close()
        report["kill_reason"] = wait_torn_down(serve, control, mark)
        assert serve.proc.poll() is None, serve.log()[-3000:]

        def reconnect(what: str, after: str):
            """A new QEMU on the same path: the serve reconnects by itself, carries the
            new guest's traffic and holds what it held for the first guest."""
            at = time.monotonic()
            mark = len(serve.lines)
            booted = guests.boot()
            wait_set_up(serve, control, mark)
            traffic_both_ways(booted[1], reflector, wire_port, what)
            report[f"reconnect_{what}_s"] = round(time.monotonic() - at, 1)
            now = resources_settled(serve.proc.pid, want=before)
            assert now == before, f"the serve leaked across the {after} reconnect: {before} -> {now}"
            return booted

        # 2. A new QEMU after the SIGKILL.
        guest, serial, qmp_path = reconnect("guest 2", "SIGKILL")

        # Graceful: QMP quit stops the vhost device (GET_VRING_BASE), then closes.
        mark = len(serve.lines)
        qmp = Qmp(qmp_path)
        qmp.execute("quit")
        qmp.close()
        guest.proc.wait(timeout=30)
        serial.close()
        report["quit_reason"] = wait_torn_down(serve, control, mark)
        serve.wait_for(r"GET_VRING_BASE 1 -> \d+$", 5, mark)
        assert serve.proc.poll() is None, serve.log()[-3000:]

        # 3. And once more, after the graceful quit.
        guest, serial, _ = reconnect("guest 3", "graceful")

        guest.close()
        assert not [line for line in serve.lines if "Traceback" in line or " ERROR " in line], \
            serve.log()[-3000:]
        report["serve_exit"] = serve.stop()
        assert report["serve_exit"] == 0, serve.log()[-3000:]
        report["total_s"] = round(time.monotonic() - started, 1)
    print(f"\nfront-end reconnect: {report}")
