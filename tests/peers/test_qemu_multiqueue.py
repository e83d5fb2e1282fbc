"""Issue 14: a QEMU guest with 2 queue pairs (``mq=on``) switching pairs with ``ethtool -L``.

- `ifcvf -vv serve --device sim --wire udp:... --control ...` serves a
  simulated IFCVF (it offers 4 pairs; QEMU's ``queues=2`` uses 2);
- QEMU boots the Debian kernel under TCG, 2 vCPUs, with
  ``-netdev vhost-user,...,queues=2`` and ``virtio-net-pci,mq=on,vectors=0``
  (INTx: virtio_net's vqs share the one line, which works for mq too);
- the guest script (guest_qemu_multiqueue.py) switches channels with the
  SIOCETHTOOL ioctl (ETHTOOL_SCHANNELS, the guest has no ethtool binary) to
  combined 2, 1, 2; after each switch it transmits from CPU 0 and from CPU 1
  (virtio_net's XPS: CPU i -> TX queue i) and reflects the host's pings.

Asserted from the host: at each switch the back-end's ``-vv`` log shows
QEMU's SET_VRING_ENABLE handled (the log names the request, not its ring or
value) and `ifcvf ctl stats --json` shows pair 1's rings stopped, then
running again; the VF's per-queue frame counters for each phase: with 2 pairs
both TX queues carry frames, with 1 pair pair 1 carries nothing and pair 0
keeps going.  About 15 s on the development machine (9 s booting).

RX: the simulated VF steers as a multiqueue virtio-net device without RSS
does (virtio 1.1 5.1.6.5.5, sim/steering.py): a flow's received frames go
to the RX queue of the pair it last transmitted on, never to a pair beyond
the ones in use.  Each CPU's frames are one UDP flow (its own source port);
the host answers every frame of both flows.  Asserted: with 2 pairs the
answers to CPU 0's flow land on RX queue 0 and those to CPU 1's flow on RX
queue 2 (each >= PER_CPU frames); with 1 pair RX queue 2 carries nothing,
not even answers to a flow that pair 1 carried before the switch (the host
sends those first, before the guest transmits again); every answer reaches
the guest's packet socket, and every frame the host sent in a phase is
counted on RX queue 0 or 2.
"""
from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from guest import NIC_MAC, host_python
from guest_qemu_frontend import HOST_MAC, frame, parse_tag
from guest_qemu_multiqueue import GUEST_IP, HOST_IP, PEER_PORT, flow_port, parse_udp, udp_frame
from qemu_peer import Serve, UdpEnd, vhost_user_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("guest_qemu_multiqueue.py")
GUEST_MAC = bytes.fromhex(NIC_MAC.replace(":", ""))
PER_CPU = 12
PINGS = 8
PHASES = (2, 1, 2)
STALE = 4          # answers per CPU flow sent right after a switch, before the guest transmits

pytestmark = [pytest.mark.peer, pytest.mark.slow]


def queue_stats(control: Path) -> tuple[dict[int, int], dict[int, bool]]:
    """The VF's device-side frame count per queue and which queues run, from `ifcvf ctl stats --json`."""
    out = subprocess.run([sys.executable, "-m", "ifcvf", "ctl", "--control", str(control),
                          "stats", "--json"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30, check=True).stdout
    (vf,) = json.loads(out)
    return ({q["index"]: (q["device"] or {}).get("frames", 0) for q in vf["queues"]},
            {q["index"]: q["running"] for q in vf["queues"]})


def stats_when(control: Path, done, what: str, timeout: float = 20.0):
    """queue_stats once ``done(counters, running)`` holds: polled, bounded in time."""
    deadline = time.monotonic() + timeout
    while True:
        counters, running = queue_stats(control)
        if done(counters, running):
            return counters, running
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s; last: {counters}, running {running}")
        time.sleep(0.05)


def mq_config(sock: Path, qmp: Path):
    config = vhost_user_config(sock, qmp)
    args = config.extra_qemu_args
    args[args.index("vhost-user,id=n0,chardev=vhu0")] += ",queues=2"
    device = next(i for i, a in enumerate(args) if a.startswith("virtio-net-pci,"))
    args[device] += ",mq=on"
    config.cpus = 2
    return config


@pytest.fixture(scope="module")
def run(guest_env) -> dict:
    token = secrets.token_hex(4)
    work = Path(tempfile.mkdtemp(prefix="ifcvf-mq-"))
    sock, qmp, control, results = work / "vf.sock", work / "qmp.sock", work / "ctl.sock", work / "r"
    udp = UdpEnd()
    serve = guest = None
    result: dict = {"phases": [], "seconds": {}}
    started = time.monotonic()
    ok = False
    try:
        serve = Serve("--socket", str(sock), "--device", "sim", "--wire", udp.wire,
                      "--control", str(control))
        udp.attach(serve, timeout=60)
        serve.wait_for(r"control socket on ", timeout=60)
        guest = guest_env.start([host_python(), str(SCRIPT), token, str(PER_CPU)],
                                results_dir=results, cwd=str(ROOT), config=mq_config(sock, qmp))
        ready = guest.wait_for(r"^QEMU-MQ READY (\S+) cpus=(\d+) channels=(\S+)$", timeout=240)
        result["ready"] = ready.groups()
        result["seconds"]["ready"] = time.monotonic() - started
        serve.wait_for(r"VF configured", timeout=60)
        for phase, combined in enumerate(PHASES):
            log_start = len(serve.lines)
            udp.send(frame("set", token, combined, GUEST_MAC, HOST_MAC, 64))
            got = guest.wait_for(rf"^QEMU-MQ COMBINED {combined} (\d+)$", timeout=60)
            # QEMU's SET_VRING_ENABLE follow the guest's ctrl command, not before it.
            want = set(range(2 * combined))
            before, _ = stats_when(control, lambda c, r: {q for q, on in r.items() if on} == want,
                                   f"rings {sorted(want)} running")
            sent = 0          # frames the host sends the guest in this phase
            if phase:
                # Answers on the flows as the last phase left them (learned on
                # its pairs): with fewer pairs now, none may use pair 1.
                for cpu in (0, 1):
                    for i in range(STALE):
                        udp.send(answer(token, cpu, phase * 1000 + 500 + cpu * 10 + i))
                sent += 2 * STALE
            udp.send(frame("send", token, phase, GUEST_MAC, HOST_MAC, 64))
            sent += 1
            guest.wait_for(rf"^QEMU-MQ SENT {phase}$", timeout=60)
            tx: list[tuple[int, int]] = []
            deadline = time.monotonic() + 30
            while len(tx) < 2 * PER_CPU and (data := udp.receive(deadline - time.monotonic())):
                tag = parse_udp(data)
                if tag and tag[2] == "tx" and tag[3] == token and tag[1] == PEER_PORT:
                    tx.append((tag[0], tag[4]))
            # Every frame of both flows answered, once all of them went out.
            for port, index in tx:
                udp.send(answer(token, port - flow_port(0), index))
            sent += len(tx)
            answers = len(tx) + (2 * STALE if phase else 0)
            udp.send(frame("report", token, phase * 10000 + answers, GUEST_MAC, HOST_MAC, 64))
            sent += 1
            received = guest.wait_for(rf"^QEMU-MQ RECEIVED {phase} (\d+)$", timeout=60)
            pongs = 0
            for i in range(PINGS):
                udp.send(frame("ping", token, phase * 100 + i, GUEST_MAC, HOST_MAC, 96))
                sent += 1
                deadline = time.monotonic() + 10
                while (data := udp.receive(deadline - time.monotonic())):
                    if parse_tag(data) == ("pong", token, phase * 100 + i):
                        pongs += 1
                        break
            # The VF's counters settle once the last pong's frames are through:
            # two reads in a row agree.
            last: dict[str, dict] = {}

            def settled(counters, _running) -> bool:
                same = last.get("counters") == counters
                last["counters"] = counters
                return same

            after, running = stats_when(control, settled, "the VF's queue counters to settle")
            result["phases"].append({
                "combined": combined, "now": int(got.group(1)), "tx": tx, "pongs": pongs,
                "sent": sent, "answers": answers, "received": int(received.group(1)),
                "delta": {q: after[q] - before[q] for q in after},
                "running": sorted(q for q, on in running.items() if on),
                "log": serve.lines[log_start:]})
        udp.send(frame("stop", token, 0, GUEST_MAC, HOST_MAC, 64))
        guest.wait_for(r"^QEMU-MQ STOPPED$", timeout=60)
        ok = True
    finally:
        if guest is not None:
            guest.close()
            result["console"] = guest.console
        if serve is not None:
            result["serve_exit"] = serve.stop()
            result["serve_log"] = serve.lines
        udp.close()
        shutil.rmtree(work, ignore_errors=True)
        result["seconds"]["total"] = time.monotonic() - started
        print(f"\nmultiqueue: {result['seconds']}; " + "; ".join(
            f"combined {p['combined']}: {p['delta']}" for p in result["phases"]))
        if not ok:
            print("--- ifcvf serve log ---\n" + "\n".join(result.get("serve_log", [])[-80:]))
            print("--- console ---\n" + result.get("console", "")[-3000:])
    return result


def answer(token: str, cpu: int, index: int) -> bytes:
    """The host's answer on CPU ``cpu``'s flow: UDP from PEER_PORT to the guest's port."""
    return udp_frame(GUEST_MAC, HOST_MAC, HOST_IP, GUEST_IP, PEER_PORT, flow_port(cpu),
                     "rx", token, index)


def enables(lines: list[str]) -> int:
    """How many SET_VRING_ENABLE the back-end handled (its -vv log)."""
    return sum("SET_VRING_ENABLE handled -> " in line for line in lines)


def test_the_guest_sees_two_queue_pairs(run):
    iface, cpus, chans = run["ready"]
    assert cpus == "2"
    max_combined, combined = (int(v) for v in chans.split(",")[3::4])
    assert (max_combined, combined) == (2, 2), chans


def test_ethtool_L_switches_pairs(run):
    assert [(p["combined"], p["now"]) for p in run["phases"]] == [(2, 2), (1, 1), (2, 2)]


def test_the_back_end_stops_and_restarts_pair_1(run):
    """QEMU turns the guest's ctrl-vq MQ command into SET_VRING_ENABLE of pair 1's rings;
    the back-end stops them and starts them again (`ifcvf ctl stats`: running)."""
    for p in run["phases"][1:]:
        assert enables(p["log"]) >= 2, "\n".join(p["log"])
        assert not [line for line in p["log"] if "refused" in line or "ERROR" in line], p["log"]
    assert [p["running"] for p in run["phases"]] == [[0, 1, 2, 3], [0, 1], [0, 1, 2, 3]]


def test_every_frame_crosses(run):
    for phase, p in enumerate(run["phases"]):
        assert sorted(p["tx"]) == sorted((flow_port(cpu), phase * 1000 + cpu * 100 + i)
                                         for cpu in (0, 1) for i in range(PER_CPU)), p["tx"]
        assert p["received"] == p["answers"], p
        assert p["pongs"] == PINGS, p


def test_both_tx_queues_carry_frames_with_two_pairs(run):
    for p in (run["phases"][0], run["phases"][2]):
        assert p["delta"][1] >= PER_CPU and p["delta"][3] >= PER_CPU, p["delta"]


def test_pair_1_stops_with_one_pair_while_pair_0_goes_on(run):
    d = run["phases"][1]["delta"]
    assert d[1] >= 2 * PER_CPU + PINGS and d[0] >= PINGS, d
    assert d[2] == 0 and d[3] == 0, d


def test_with_two_pairs_each_flow_is_answered_on_its_own_pair(run):
    """CPU 0's flow left on pair 0 and CPU 1's on pair 1: so do their answers."""
    for p in (run["phases"][0], run["phases"][2]):
        assert p["delta"][0] >= PER_CPU and p["delta"][2] >= PER_CPU, p["delta"]
        assert p["delta"][0] + p["delta"][2] == p["sent"], p


def test_with_one_pair_rx_queue_2_carries_nothing(run):
    """Even the answers to the flow pair 1 carried before the switch land on RX queue 0."""
    p = run["phases"][1]
    assert p["delta"][2] == 0 and p["delta"][0] == p["sent"], p


def test_the_back_end_exits_cleanly(run):
    assert run["serve_exit"] == 0
    assert not [line for line in run["serve_log"] if "refused" in line or "ERROR" in line]
