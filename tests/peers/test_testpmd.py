"""DPDK 22.11 `dpdk-testpmd` with `net_virtio_user` as the front-end of `ifcvf serve --device sim`.

The simulated VF's port is bridged to a UDP socket of this test (``UdpEnd``);
frames are counted at the simulated wire (the VF's port counters, read
through the control socket: a Python reader on the host's UDP socket cannot
keep up, and the kernel drops what overflows its buffer):

- txonly: every frame testpmd says it sent arrives at the wire, across a
  `port stop` / `port start` cycle (which stops the VF with GET_VRING_BASE and
  starts it again from the ring bases);
- rxonly: frames sent into the wire reach testpmd, and what the VF received
  is accounted for (delivered, or dropped by the VF and counted).

testpmd runs as the real-peers reference says (``--no-huge -m 512
--total-num-mbufs=8192``), driven through its interactive prompt; every wait
is bounded and both processes are killed by PID on every way out.  The rates
printed are wall-clock figures of a Python simulator on a shared machine, for
the record only.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time

import pytest

from qemu_peer import Serve, UdpEnd, _die_with_parent
from ifcvf.tools.control import request

pytestmark = [pytest.mark.peer, pytest.mark.slow]

TESTPMD = "dpdk-testpmd"
STEP_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def testpmd_binary():
    path = shutil.which(TESTPMD)
    if path is None:
        reason = f"{TESTPMD} is not installed (Debian: dpdk-dev, librte-net-virtio23, librte-mempool-ring23)"
        if os.environ.get("IFCVF_REQUIRE_PEERS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


class PmdProcess:
    """An interactive testpmd; ``lines`` is what it printed."""

    def __init__(self, binary: str, sock: str, prefix: str, mode: str):
        self.prefix = prefix
        self.proc = subprocess.Popen(
            # Line-buffered: testpmd's printf output is read as it comes, not at exit.
            ["stdbuf", "-oL", binary, f"--file-prefix={prefix}", "--lcores", "0@0,1@1", "--no-pci", "--no-huge", "-m", "512",
             "--vdev", f"net_virtio_user0,path={sock},queues=1", "--",
             "-i", "--nb-cores=1", "--total-num-mbufs=8192", f"--forward-mode={mode}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, preexec_fn=_die_with_parent)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def send(self, command: str) -> int:
        """Write a command; the index of the next output line (to wait from)."""
        with self._cond:
            start = len(self.lines)
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return start

    def wait_for(self, pattern: str, start: int = 0, timeout: float = STEP_TIMEOUT_S) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    m = regex.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(f"testpmd: no {pattern!r} ({'exited' if self._eof else 'timeout'}):\n"
                                         + "\n".join(self.lines[-60:]))
                self._cond.wait(left)

    def forward_stats(self, start: int) -> tuple[int, int]:
        """(RX-packets, TX-packets) of the forward statistics printed after ``start``."""
        m = self.wait_for(r"Accumulated forward statistics", start)
        rx = self.wait_for(r"RX-packets:\s+(\d+)", start)
        tx = self.wait_for(r"TX-packets:\s+(\d+)", start)
        assert m
        return int(rx.group(1)), int(tx.group(1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        # EAL leaves its runtime directory behind (one per --file-prefix).
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)
        return self.proc.returncode


@pytest.fixture
def rig(tmp_path, testpmd_binary):
    udp = UdpEnd()
    sock, control = str(tmp_path / "vu.sock"), str(tmp_path / "ctl.sock")
    serve = Serve("--socket", sock, "--device", "sim", "--wire", udp.wire, "--control", control,
                  verbosity="-v")
    pmds = []
    try:
        serve.wait_for(r"control socket on ", STEP_TIMEOUT_S)
        udp.attach(serve, STEP_TIMEOUT_S)

        def start(mode: str) -> PmdProcess:
            pmd = PmdProcess(testpmd_binary, sock, f"ifcvf{os.getpid()}{len(pmds)}", mode)
            pmds.append(pmd)
            pmd.wait_for(r"Port 0: [0-9A-F:]{17}")
            return pmd

        yield serve, udp, control, start
    finally:
        for pmd in pmds:
            pmd.stop()
        assert serve.stop() == 0, serve.log()[-4000:]
        udp.close()


def vf_stats(control: str, sock: str) -> dict:
    reply = request(control, {"cmd": "stats", "socket": sock}, timeout=30)
    assert reply["ok"], reply
    return reply["result"]


def wire_tx(control: str, sock: str, at_least: int, timeout: float = STEP_TIMEOUT_S) -> int:
    """Frames the simulated VF put on its wire, once at least ``at_least`` (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        frames = vf_stats(control, sock)["device"]["port_tx_frames"]
        if frames >= at_least or time.monotonic() >= deadline:
            return frames


def test_txonly_every_frame_reaches_the_wire_across_a_port_stop_start(rig):
    serve, udp, control, start = rig
    pmd = start("txonly")
    sock = serve.args[1]
    total_sent = 0
    rates = []
    for cycle in range(2):
        t0 = time.monotonic()
        pmd.send("start")
        wire_tx(control, sock, total_sent + 20_000)
        at = pmd.send("stop")
        _, tx = pmd.forward_stats(at)
        total_sent += tx
        seen = wire_tx(control, sock, total_sent)     # what was still in the ring at the stop
        rates.append(tx / (time.monotonic() - t0))
        assert tx > 0
        assert seen == total_sent, f"cycle {cycle}: testpmd sent {total_sent}, the wire saw {seen}"
        if cycle == 0:
            pmd.wait_for(r"Stopping ports?", pmd.send("port stop 0"))
            pmd.wait_for(r"Port 0: [0-9A-F:]{17}", pmd.send("port start 0"))
    stats = vf_stats(control, sock)
    assert stats["device"]["port_tx_frames"] == total_sent
    assert stats["queues"][1]["device"]["frames"] == total_sent
    assert stats["queues"][1]["driver"]["kicks"] > 0
    print(f"testpmd txonly through the simulated VF: {total_sent} frames, "
          f"{', '.join(f'{r / 1e3:.1f}' for r in rates)} kpps (wall clock, per run)")


def test_rxonly_frames_from_the_wire_reach_testpmd(rig):
    serve, udp, control, start = rig
    pmd = start("rxonly")
    sock = serve.args[1]
    at = pmd.send("start")
    pmd.wait_for(r"rxonly packet forwarding", at)
    frame = bytes.fromhex("ffffffffffff" "020000000001" "0800") + bytes(46)   # 60 B: 64 with the FCS
    sent, batch = 0, 64
    t0 = time.monotonic()
    deadline = t0 + STEP_TIMEOUT_S
    while sent < 20_000 and time.monotonic() < deadline:
        for _ in range(batch):
            udp.send(frame)
        sent += batch
        # Wait until the VF has taken this batch off the wire (bounded): the loopback
        # socket's buffer never overflows, so nothing is lost before the VF.
        while time.monotonic() < deadline and vf_stats(control, sock)["device"]["port_rx_frames"] < sent:
            pass
    # The VF has placed (or dropped) every frame; wait until testpmd has polled them all.
    while time.monotonic() < deadline:
        stats = vf_stats(control, sock)
        q0 = stats["queues"][0]["device"]
        if q0["frames"] + q0["dropped"] + stats["device"]["rx_no_queue"] >= sent:
            break
    placed = q0["frames"]
    port_rx = 0
    while time.monotonic() < deadline and port_rx < placed:
        port_rx = int(pmd.wait_for(r"RX-packets:\s+(\d+)", pmd.send("show port stats 0")).group(1))
    elapsed = time.monotonic() - t0
    at = pmd.send("stop")
    rx, _ = pmd.forward_stats(at)
    stats = vf_stats(control, sock)
    dev = stats["device"]
    assert dev["port_rx_frames"] == sent
    dropped = stats["queues"][0]["device"]["dropped"]
    # Every frame the VF placed in the guest's ring, testpmd's port received.
    assert stats["queues"][0]["device"]["frames"] == placed == port_rx, (placed, port_rx)
    assert placed + dropped + dev["rx_no_queue"] == sent, (placed, dropped, dev)
    assert 0 < rx <= port_rx
    assert placed >= sent // 2, f"testpmd received {placed} of {sent}"
    print(f"testpmd rxonly through the simulated VF: {port_rx} of {sent} frames, {port_rx / elapsed / 1e3:.1f} kpps "
          f"(wall clock), {dropped} dropped by the VF")
