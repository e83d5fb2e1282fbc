"""Real QEMU 7.2 as the vhost-user front-end of `ifcvf serve`, with a real guest, and a live migration.

One guest boot per mode (``MODES``): the VF's hardware dirty logging, the
software relay (``sw-live-migration=1``), and hardware logging again with a
back-end that does not offer STATUS (QEMU 7.2 then orders start and stop
differently).  In each:

- `ifcvf -vv serve --device sim --wire udp:...` serves a simulated IFCVF in
  real time; its port is joined to a UDP socket of this test (``UdpEnd``);
- QEMU boots the Debian kernel under TCG with virtio-net-pci on a vhost-user
  netdev on that socket (``qemu_peer.vhost_user_config``: shared memfd RAM,
  ``vectors=0``), so QEMU's own message order configures the VF;
- the guest script (guest_qemu_frontend.py) loads virtio_net and talks raw
  Ethernet through AF_PACKET: its frames must reach our UDP socket byte for
  byte, ours must reach it byte for byte, and it answers a ping;
- the script ends and the guest's init unmounts its 9p shares (QEMU refuses
  to migrate a guest with a VirtFS share mounted; ``ifcvf_hold=1``); the
  guest kernel keeps answering ICMP echoes;
- QMP ``migrate`` to ``exec:cat > /dev/null`` while echoes flow, until
  ``completed``; then ``cont`` resumes the source and echoes must flow again
  (QEMU restarts the VF from the ring bases GET_VRING_BASE returned);
- the back-end's log must show QEMU's migration messages accepted and the
  mode's logging switched on, and in hardware mode the VF's dirty-page marks.

Everything is asserted here, on the host.  About 12 s per mode on the
development machine (7-9 s of it booting to the script under TCG).
"""
from __future__ import annotations

import ast
import json
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from guest import NIC_MAC, host_python
from guest_image import EXIT_MARKER, HELD_MARKER, HOLD_FAILED
from guest_qemu_frontend import (GUEST_IP, HOST_IP, HOST_MAC, RX_SIZES, TX_SIZES, frame,
                                 parse_tag)
from qemu_peer import Qmp, Serve, UdpEnd, icmp_echo, icmp_reply_of, vhost_user_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("guest_qemu_frontend.py")
GUEST_MAC = bytes.fromhex(NIC_MAC.replace(":", ""))
TX_COUNT = 16
RX_COUNT = 12
# Boot name -> `ifcvf serve` options.  "nostatus": the back-end does not offer
# the STATUS protocol feature, so QEMU 7.2 starts the device without
# SET_STATUS(DRIVER_OK) and stops it with GET_VRING_BASE alone (another order).
MODES = {"hw": ["--devargs", "vdpa=1"],
         "sw": ["--devargs", "vdpa=1,sw-live-migration=1"],
         "hw-nostatus": ["--devargs", "vdpa=1", "--no-status"]}

pytestmark = [pytest.mark.peer, pytest.mark.slow]


@dataclass
class Run:
    """What one boot observed; the tests below assert on it."""

    mode: str
    token: str
    ident: int
    tx_frames: list[bytes] = field(default_factory=list)       # ours, from the guest, in order
    other_frames: list[bytes] = field(default_factory=list)    # the guest's own (IPv6 ND, ...)
    pong: bytes | None = None
    guest: dict = field(default_factory=dict)
    guest_exit: int | None = None
    held: str = ""
    echo_before: bool = False
    echoes_during: int = 0         # round trips that began and ended while migration was active
    pings_during: int = 0
    statuses: list[str] = field(default_factory=list)
    migration: dict = field(default_factory=dict)
    run_state_after: str = ""
    log_at_completion: list[str] = field(default_factory=list)
    echo_after_cont: bool = False
    qemu_log: str = ""
    console: str = ""
    serve_exit: int | None = None
    serve_log: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)


def pong(token: str, index: int) -> bytes:
    return frame("pong", token, index, HOST_MAC, GUEST_MAC, 96)


def receive_until(udp: UdpEnd, run: Run, wanted, timeout: float) -> bytes | None:
    """The first frame ``wanted(frame)`` accepts within ``timeout``; the rest are kept aside."""
    deadline = time.monotonic() + timeout
    while (data := udp.receive(deadline - time.monotonic())) is not None:
        if wanted(data):
            return data
        run.other_frames.append(data)
    return None


def echo(udp: UdpEnd, run: Run, seq: int, timeout: float) -> bool:
    """An ICMP echo to the guest's kernel; True when its exact reply came back in time."""
    data = f"ifcvf {run.token} {seq} ".encode() + bytes(range(256))[:120]
    udp.send(icmp_echo(GUEST_MAC, HOST_MAC, HOST_IP, GUEST_IP, run.ident, seq, data))
    expected = (HOST_MAC, GUEST_MAC, GUEST_IP, HOST_IP, run.ident, seq, data)
    return receive_until(udp, run, lambda f: icmp_reply_of(f) == expected, timeout) is not None


def migrate_while_pinging(qmp: Qmp, udp: UdpEnd, run: Run, timeout: float) -> None:
    """``migrate`` to a pipe; ping the guest until QEMU says the migration is over."""
    qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    qmp.execute("migrate", uri="exec:cat > /dev/null")
    deadline = time.monotonic() + timeout
    seq = 1000
    while time.monotonic() < deadline:
        before = qmp.execute("query-migrate").get("status", "")
        run.statuses.append(before)
        if before not in ("setup", "active", "device"):
            break
        seq += 1
        run.pings_during += 1
        answered = echo(udp, run, seq, timeout=2.0)
        after = qmp.execute("query-migrate").get("status", "")
        # A round trip that began and ended inside "active" crossed the VF while
        # QEMU was collecting its dirty log.
        if answered and before == after == "active":
            run.echoes_during += 1
    run.migration = qmp.execute("query-migrate")
    qmp.wait_event("MIGRATION", timeout=max(deadline - time.monotonic(), 1), status="completed")


@pytest.fixture(scope="module", params=list(MODES), ids=lambda m: f"{m}-live-migration")
def run(request, guest_env) -> Run:
    mode = request.param
    result = Run(mode=mode, token=secrets.token_hex(4), ident=secrets.randbelow(0xFFFF))
    # Unix socket paths must stay under 108 bytes: not pytest's deep tmp dirs.
    work = Path(tempfile.mkdtemp(prefix="ifcvf-qfe-"))
    sock, qmp_path, results = work / "vf.sock", work / "qmp.sock", work / "results"
    udp = UdpEnd()
    serve = guest = qmp = None
    started = time.monotonic()
    ok = False
    try:
        serve = Serve("--socket", str(sock), "--device", "sim", "--wire", udp.wire, *MODES[mode])
        udp.attach(serve, timeout=60)
        serve.wait_for(r"serving sim on ", timeout=60)
        guest = guest_env.start([host_python(), str(SCRIPT), str(results / "guest.json"),
                                 result.token, str(TX_COUNT), str(RX_COUNT)],
                                results_dir=results, cwd=str(ROOT),
                                config=vhost_user_config(sock, qmp_path,
                                                         kernel_args="quiet ifcvf_hold=1"))
        guest.wait_for(r"^QEMU-PEER READY ", timeout=240)
        result.seconds["ready"] = time.monotonic() - started

        # Guest -> host: the frames it sent right after READY.
        deadline = time.monotonic() + 60
        while len(result.tx_frames) < TX_COUNT and (data := udp.receive(deadline - time.monotonic())):
            tag = parse_tag(data)
            (result.tx_frames if tag and tag[1] == result.token else result.other_frames).append(data)

        # Host -> guest: the guest keeps them and says when all arrived.
        for i in range(RX_COUNT):
            udp.send(frame("rx", result.token, i, GUEST_MAC, HOST_MAC, RX_SIZES[i % len(RX_SIZES)]))
        guest.wait_for(rf"^QEMU-PEER RX-DONE {RX_COUNT}$", timeout=60)

        udp.send(frame("ping", result.token, 0, GUEST_MAC, HOST_MAC, 96))
        result.pong = receive_until(udp, result, lambda f: parse_tag(f) == ("pong", result.token, 0),
                                    timeout=30)

        # The script ends; the guest's init unmounts the 9p shares and holds.
        udp.send(frame("stop", result.token, 0, GUEST_MAC, HOST_MAC, 64))
        held = guest.wait_for(rf"^(?:{EXIT_MARKER} {guest.token} (-?\d+)|"
                              rf"{HELD_MARKER} {guest.token}|{HOLD_FAILED} {guest.token}: .*)$",
                              timeout=60)
        if held.group(1) is not None:
            result.guest_exit = int(held.group(1))
            held = guest.wait_for(rf"^(?:{HELD_MARKER}|{HOLD_FAILED}) {guest.token}\b.*$", timeout=60)
        result.held = held.group(0)
        guest_json = results / "guest.json"
        result.guest = json.loads(guest_json.read_text()) if guest_json.exists() else {}
        assert result.held.startswith(HELD_MARKER), result.held

        result.echo_before = echo(udp, result, 1, timeout=30)
        qmp = Qmp(qmp_path)
        migrating = time.monotonic()
        migrate_while_pinging(qmp, udp, result, timeout=240)
        result.seconds["migration"] = time.monotonic() - migrating
        result.run_state_after = qmp.execute("query-status")["status"]
        result.log_at_completion = serve.lines

        # The source resumes: QEMU starts the vhost device again from the ring
        # bases GET_VRING_BASE returned, and the guest must be reachable.
        # QEMU announces RESUME before it restarts the vhost device, and a
        # frame that arrives before the VF runs again is dropped (as by any
        # NIC): wait for the back-end to say the VF is configured again.
        qmp.execute("cont")
        qmp.wait_event("RESUME", timeout=30)
        serve.wait_for(r"VF configured", timeout=60, start=len(result.log_at_completion))
        result.echo_after_cont = echo(udp, result, 2, timeout=60)
        ok = True
    finally:
        if qmp is not None:
            qmp.close()
        if guest is not None:
            guest.close()
            result.qemu_log, result.console = guest.qemu_log(), guest.console
        if serve is not None:
            result.serve_exit = serve.stop()
            result.serve_log = serve.lines
        udp.close()
        shutil.rmtree(work, ignore_errors=True)
        result.seconds["total"] = time.monotonic() - started
        # Shown with the results of the tests below (or with the error of this fixture).
        print(f"\n{mode}: {result.seconds}, migration {result.migration.get('total-time')} ms, "
              f"downtime {result.migration.get('downtime')} ms, echoes during migration "
              f"{result.echoes_during}/{result.pings_during}; guest NIC interrupts "
              f"{result.guest.get('interrupts')}")
        if not ok:
            print("--- ifcvf serve log ---\n" + "\n".join(result.serve_log[-80:]))
    return result


def messages(lines: list[str]) -> list[str]:
    """The vhost-user requests the back-end handled, in order (from its -vv log)."""
    out = []
    for line in lines:
        if " handled -> " in line:
            out.append(line.split(": ")[-1].split(" handled")[0])
    return out


def index_of(seq: list[str], item: str, start: int = 0) -> int:
    assert item in seq[start:], f"{item} not after position {start} in {seq[start:]}"
    return seq.index(item, start)


# --- the datapath on QEMU's guest memory ------------------------------------------------
def test_qemu_configures_the_vf(run):
    log = run.serve_log
    handled = messages(log)
    # QEMU 7.2's own order: the start burst after the guest's driver is ready.
    start = index_of(handled, "SET_MEM_TABLE")
    for name in ("SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
                 "SET_VRING_CALL"):
        index_of(handled, name, start)
    status = [name for name in handled if name in ("GET_STATUS", "SET_STATUS")]
    assert bool(status) == (not run.mode.endswith("nostatus")), handled
    assert any("datapath up (direct), vrings [0, 1]" in line for line in log), "\n".join(log)
    assert any("VF configured" in line for line in log)
    assert not [line for line in log if "refused" in line or "ERROR" in line], "\n".join(log)
    assert run.guest.get("driver") == "virtio_net", run.console[-3000:]
    stats, errors = vf_stats(log)
    assert not errors and all(q["broken"] is None for q in stats["queues"].values()), stats


def test_guest_frames_reach_the_host_byte_for_byte(run):
    expected = [frame("tx", run.token, i, HOST_MAC, GUEST_MAC, TX_SIZES[i % len(TX_SIZES)])
                for i in range(TX_COUNT)]
    assert run.tx_frames == expected


def test_host_frames_reach_the_guest_byte_for_byte(run):
    expected = [frame("rx", run.token, i, GUEST_MAC, HOST_MAC, RX_SIZES[i % len(RX_SIZES)]).hex()
                for i in range(RX_COUNT)]
    assert run.guest["received"] == expected
    assert run.guest["stats"]["rx_errors"] == 0


def test_interrupts_reach_the_guest_as_intx(run):
    """The VF's MSI-X vector -> call eventfd -> QEMU -> the guest's INTx line (vectors=0)."""
    stats, _ = vf_stats(run.serve_log)
    assert stats["queues"][0]["interrupts"] > 0 and stats["queues"][1]["interrupts"] > 0
    lines = run.guest["interrupts"]
    assert len(lines) == 1 and "IO-APIC" in lines[0], lines
    # The line is the NIC's alone (not shared with the 9p devices) and fired:
    # virtio_net has no other way to learn of received frames.
    assert lines[0].split()[-1] == run.guest["virtio_device"], lines
    count = sum(int(word) for word in lines[0].split()[1:] if word.isdigit())
    assert count >= 1 and run.guest["stats"]["rx_packets"] >= RX_COUNT


def test_the_guest_answers(run):
    assert run.pong == pong(run.token, 0)             # its script, through AF_PACKET
    assert run.guest_exit == 0 and run.guest["stopped"] is True
    assert run.echo_before                            # its kernel, once the shares are gone


# --- live migration driven by QEMU ------------------------------------------------------
def test_migration_completes(run):
    assert run.migration.get("status") == "completed", run.migration
    assert run.statuses[0] in ("setup", "active")
    assert run.run_state_after == "postmigrate"


def test_qemu_migration_messages_are_accepted(run):
    log = run.log_at_completion
    handled = messages(log)
    configured = index_of(handled, "SET_MEM_TABLE")
    log_base = index_of(handled, "SET_LOG_BASE", configured)
    # LOG_ALL arrives as SET_FEATURES after the log (QEMU's vhost_migration_log).
    index_of(handled, "SET_FEATURES", log_base)
    stop = index_of(handled, "GET_VRING_BASE", log_base)
    index_of(handled, "GET_VRING_BASE", stop + 1)      # both rings
    assert not [line for line in log if "refused" in line], "\n".join(log)
    assert any("dirty log of" in line and "mapped" in line for line in log)
    assert [line for line in log if "GET_VRING_BASE 0 ->" in line]
    assert [line for line in log if "GET_VRING_BASE 1 ->" in line]


def vf_stats(lines: list[str]) -> tuple[dict, str]:
    """The simulated VF's counters and its errors, from the line `ifcvf serve` logs on exit."""
    for line in lines:
        m = re.search(r"vf0: stats (\{.*\})(?:, errors (.*))?$", line)
        if m:
            return ast.literal_eval(m.group(1)), m.group(2) or ""
    raise AssertionError("no stats line from ifcvf serve:\n" + "\n".join(lines[-20:]))


def test_the_modes_logging_is_switched_on(run):
    log = run.log_at_completion
    hw = [i for i, line in enumerate(log) if "hardware dirty logging on" in line]
    sw = [i for i, line in enumerate(log) if "software relay interposed" in line]
    # Switched on by the SET_FEATURES that carries LOG_ALL, after the log base.
    base = next(i for i, line in enumerate(log) if "SET_LOG_BASE handled" in line)
    features = next(i for i, line in enumerate(log)
                    if i > base and "SET_FEATURES handled -> ACK_SUCCESS" in line)
    hardware = run.mode.startswith("hw")
    on = hw if hardware else sw
    assert len(on) == 1 and base < on[0] < features, "\n".join(log)
    assert not (sw if hardware else hw), "\n".join(log)
    marks = vf_stats(run.serve_log)[0]["log"]["marks"]
    if hardware:
        # Every frame the VF wrote into an RX buffer while QEMU migrated marked its page.
        assert marks >= run.echoes_during > 0
    else:
        assert marks == 0          # the relay logs instead of the VF


def test_frames_flow_during_the_migration(run):
    assert run.echoes_during >= 1, (run.echoes_during, run.pings_during, run.statuses)


def test_the_source_resumes_after_the_migration(run):
    assert run.echo_after_cont, "\n".join(run.serve_log[-40:])
    assert run.serve_exit == 0
    assert "segfault" not in run.qemu_log.lower() and "wrong value" not in run.qemu_log
