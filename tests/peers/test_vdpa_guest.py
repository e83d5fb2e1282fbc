"""The driver's real code path on a device nobody here wrote: QEMU's virtio-net-pci behind a vIOMMU.

One TCG guest boot (tests/peers/guest_vdpa_peer.py) binds the NIC to
vfio-pci with the project's sysfs code, runs the conformance suite against
it, then drives it through ``VdpaDevice`` with
``vdpa=1,generic-virtio-net=1,sw-live-migration=1``: once in direct mode
and once with the software relay and a dirty log, frames flowing both ways
through the NIC's UDP socket netdev, whose host end is this process.
Everything is asserted here, on the host, from the guest's JSON and JUnit
XML and from the frames that reach the host socket; each part of the run is
its own test.
"""
from __future__ import annotations

import json
import secrets
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import ifcvf.tools.conformance.suite as suite
from guest import NIC_MAC, GuestConfig, GuestNet, host_python

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("guest_vdpa_peer.py")
PHASES = ("direct", "sw")
RX_SIZES = (60, 64, 200, 777, 1514)
HOST_MAC = bytes.fromhex("020000c0ffee")
NIC = bytes.fromhex(NIC_MAC.replace(":", ""))
ETHERTYPE = b"\x88\xb5"
NET_HDR = 12
PAGE = 4096
VERSION_1 = 1 << 32
ACCESS_PLATFORM = 1 << 33
LOG_ALL = 1 << 26
STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET, STATUS_FAILED = 0x04, 0x08, 0x40, 0x80
IOVA_MEDIATED_RINGS = 0x2000_0000_0000
RUN_TIMEOUT_S = 600.0       # the whole run; about 25-50 s of TCG time in practice
CONFORMANCE_FRAME = b"ifcvf conformance frame"
# The mediated ring lives at IOVA 2**45: QEMU's default 39-bit vIOMMU cannot map it.
CONFIG = GuestConfig(iommu_options="aw-bits=48")

pytestmark = [pytest.mark.peer, pytest.mark.slow]


def host_frames(token: str, phase: str) -> list[bytes]:
    """What the host sends the guest NIC in one phase: distinct sizes and payloads."""
    frames = []
    for i, size in enumerate(RX_SIZES):
        payload = f"ifcvf-peer {token} rx {phase} {i} ".encode()
        body = (payload * (size // len(payload) + 1))[:size - 14]
        frames.append(NIC + HOST_MAC + ETHERTYPE + body)
    return frames


@pytest.fixture(scope="module")
def peer(guest_env, tmp_path_factory):
    """Boot once, feed the guest its frames when it says READY, collect everything it sent."""
    results = tmp_path_factory.mktemp("vdpa-peer")
    token = secrets.token_hex(6)
    net = GuestNet()
    sent: dict[str, list[bytes]] = {}
    command = [host_python(), str(SCRIPT), str(results), token, str(len(RX_SIZES))]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        with guest_env.start(command, results_dir=results, cwd=str(ROOT), net=net, config=CONFIG) as guest:
            for phase in PHASES:
                m = guest.wait_for(rf"^IFCVF-PEER (READY|SKIP) {phase} {token}$",
                                   max(deadline - time.monotonic(), 1.0))
                if m.group(1) == "READY":
                    sent[phase] = host_frames(token, phase)
                    for frame in sent[phase]:
                        net.send(frame)
            run = guest.wait(max(deadline - time.monotonic(), 1.0))
        received = []
        while (frame := net.receive(timeout=0.5 if received else 2.0)) is not None:
            received.append(frame)
    finally:
        net.close()
    print(f"guest run: boot {run.boot_seconds:.1f} s, total {run.total_seconds:.1f} s")
    data = json.loads((results / "peer.json").read_text()) if (results / "peer.json").exists() else {}
    assert data, f"the guest wrote no results\n{run.describe()}"
    return {"run": run, "data": data, "token": token, "sent": sent, "received": received,
            "results": results}


def part(peer, name: str) -> dict:
    """One part's results; its guest traceback, if it failed, is the failure message."""
    data = peer["data"].get(name)
    assert data is not None, f"part {name} never ran\n{peer['run'].describe()}"
    assert "error" not in data, f"part {name} failed in the guest:\n{data['error']}"
    return data


def tx_on_host(peer, phase: str) -> list[bytes]:
    """The frames of this run's ``phase`` that reached the host socket, in arrival order."""
    tag = f"ifcvf-peer {peer['token']} tx {phase} ".encode()
    return [f for f in peer["received"] if tag in f]


def chain_pages(chain: dict) -> set[int]:
    pages = set()
    for gpa, length in chain["buffers"]:
        pages.update(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))
    return pages


# --- 1. bound with our code, conformant ------------------------------------------------------

def test_the_nic_is_bound_to_vfio_pci_by_our_sysfs_code(peer):
    bind = part(peer, "bind")
    assert bind["iommu_enabled"] is True and len(bind["nics"]) == 1
    assert bind["driver_before"] == "virtio-pci"
    assert bind["driver"] == "vfio-pci" and bind["group_device_exists"] is True


def test_the_conformance_suite_passes_on_the_real_device(peer):
    conf = part(peer, "conformance")
    junit = peer["results"] / "conformance.xml"
    assert junit.exists(), (peer["results"] / "conformance.txt").read_text()
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    cases = [c for s in suites for c in s.iter("testcase")]
    names = sorted(c.get("name") for c in cases)
    print("conformance tests run on the guest's virtio-net-pci:", ", ".join(names))
    bad = {c.get("name"): (c.find("failure") if c.find("failure") is not None else c.find("error")).get("message")
           for c in cases if c.find("failure") is not None or c.find("error") is not None}
    skipped = [c.get("name") for c in cases if c.find("skipped") is not None]
    assert sum(int(s.get("failures", 0)) for s in suites) == 0 and sum(int(s.get("errors", 0)) for s in suites) == 0, bad
    assert not bad and not skipped, (bad, skipped)
    # Every test of the suite ran, on the guest's function (not on the simulator).
    address = peer["data"]["bind"]["address"]
    assert names == sorted(f"{t}[{address}]" for t in dir(suite) if t.startswith("test_"))
    assert conf["exit_code"] == 0
    # The suite's own TX frame left through the real device.
    assert any(CONFORMANCE_FRAME in f for f in peer["received"]), "the conformance TX frame never arrived"


# --- the driver's probe ---------------------------------------------------------------------

def test_probe_drives_a_generic_virtio_net_only_when_asked_and_with_sw_migration(peer):
    part(peer, "open")
    probe = part(peer, "probe")
    assert probe["kind"] == "generic virtio-net"
    assert probe["has_lm_block"] is False and probe["has_stop_command"] is False
    assert "BAR 4 holds virtio configuration" in probe["lm_absent_reason"]
    assert "sw-live-migration=1" in probe["without_sw_live_migration_error"]
    assert probe["lm_absent_reason"] in probe["without_sw_live_migration_error"]
    assert "generic-virtio-net=1" in probe["without_generic_virtio_net_error"]
    assert probe["device_features"] & ACCESS_PLATFORM, "QEMU offers ACCESS_PLATFORM with iommu_platform=on"
    assert not probe["get_features"] & ACCESS_PLATFORM, "ACCESS_PLATFORM must never reach the guest"
    assert probe["get_features"] & LOG_ALL and probe["queue_pairs"] == 1


# --- 2. direct mode -------------------------------------------------------------------------

def test_direct_features_access_platform_towards_the_device_only(peer):
    d = part(peer, "direct")
    assert d["mode"] == "direct"
    assert not d["negotiated"] & ACCESS_PLATFORM
    assert d["driver_features"] & ACCESS_PLATFORM and d["driver_features"] & VERSION_1
    assert d["driver_features"] & ~(d["negotiated"] | ACCESS_PLATFORM) == 0
    assert d["status"] & (STATUS_FEATURES_OK | STATUS_DRIVER_OK) == STATUS_FEATURES_OK | STATUS_DRIVER_OK
    assert not d["status"] & (STATUS_NEEDS_RESET | STATUS_FAILED)


@pytest.mark.parametrize("phase", PHASES)
def test_host_frames_arrive_in_guest_rx_buffers_byte_for_byte(peer, phase):
    d = part(peer, phase)
    sent = peer["sent"][phase]
    assert d["rx_used_idx"] == len(sent)
    heads = [c["head"] for c in d["rx_posted"]]
    assert [e["id"] for e in d["rx"]] == heads[:len(sent)], "buffers are used in the order posted"
    assert [bytes.fromhex(e["frame"]) for e in d["rx"]] == sent
    assert [e["len"] for e in d["rx"]] == [NET_HDR + len(f) for f in sent]


@pytest.mark.parametrize("phase", PHASES)
def test_guest_frames_arrive_on_the_host_byte_for_byte(peer, phase):
    d = part(peer, phase)
    expected = [bytes.fromhex(f) for f in d["tx_frames"]]
    assert len(expected) >= 3 and len(set(expected)) == len(expected)
    assert tx_on_host(peer, phase) == expected
    assert [t["used_idx"] for t in d["tx"]] == list(range(1, len(expected) + 1))


@pytest.mark.parametrize("phase", PHASES)
def test_msix_vectors_fire_the_call_eventfds(peer, phase):
    d = part(peer, phase)
    assert d["rx_call"] >= 1, "no RX interrupt reached the vring's call eventfd"
    assert d["tx_call"] >= 1, "no TX interrupt reached the vring's call eventfd"


@pytest.mark.parametrize("phase", PHASES)
def test_kicks_go_through_the_c_relay_to_the_mmapped_doorbell(peer, phase):
    d = part(peer, phase)
    bar = d["bar"]
    assert bar["index"] == peer["data"]["probe"]["notify_bar"] and bar["base"]
    for q in ("0", "1"):
        doorbell = d["doorbells"][q]
        assert doorbell["c"] == doorbell["expected"], "the C relay rings the queue's own doorbell"
        assert bar["base"] <= doorbell["c"] < bar["base"] + bar["size"], "a pointer into the BAR mmap"
        assert d["relay_stats"][q]["broken"] is None
    # One kick per TX frame (each completed before the next), and the RX kick.
    assert d["relay_stats"]["1"]["kicks"] == len(d["tx_frames"])
    assert d["relay_stats"]["0"]["kicks"] >= 1


@pytest.mark.parametrize("phase", PHASES)
def test_queue_enable_0_is_never_written_and_the_device_never_wants_a_reset(peer, phase):
    d = part(peer, phase)
    writes = d["queue_enable_writes"]
    assert writes and all(w["value"] == 1 for w in writes), writes
    closing = [r for r in d["resets"] if r["phase"].endswith("dev_close")]
    assert closing, "dev_close resets a device without IFCVF's stop command"
    for r in closing:
        assert r["status_before"] & STATUS_DRIVER_OK and not r["status_before"] & (STATUS_NEEDS_RESET | STATUS_FAILED)
    assert d["status_before_close"] & STATUS_DRIVER_OK and not d["status_before_close"] & STATUS_NEEDS_RESET
    assert d["status_after_close"] == 0
    qemu = peer["run"].qemu_log
    assert "queue_enable" not in qemu and "wrong value" not in qemu, qemu


@pytest.mark.parametrize("phase", PHASES)
def test_dev_close_saves_ring_state_from_the_used_ring_and_unmaps(peer, phase):
    d = part(peer, phase)
    used = d["used_at_close"]
    assert sorted(map(tuple, d["bases"])) == [(0, used["0"], used["0"]), (1, used["1"], used["1"])]
    assert used == {"0": len(peer["sent"][phase]), "1": len(d["tx_frames"])}
    assert d["dma_mappings"], "guest memory was mapped while running"
    assert d["dma_mappings_after_close"] == []
    assert d["mode_after_close"] == "stopped"
    # Logged runs end by marking the used rings dirty (the relay's last writes); direct runs log nothing.
    logged = set(d["used_rings_logged_at_close"])
    assert logged == ({d["guest_used"]["0"], d["guest_used"]["1"]} if phase == "sw" else set())


# --- 3. software relay with logging over the real device ------------------------------------

def test_sw_relay_interposes_a_mediated_rx_used_ring(peer):
    s = part(peer, "sw")
    assert s["mode"] == "sw-relay" and s["negotiated"] & LOG_ALL
    assert not s["driver_features"] & LOG_ALL and s["driver_features"] & ACCESS_PLATFORM
    mediated = s["mediated"]["0"]
    assert mediated["iova"] >= IOVA_MEDIATED_RINGS
    assert s["queue_used"]["0"] == mediated["iova"] + mediated["used_offset"], "the device writes RX used entries there"
    assert s["queue_used"]["0"] != s["guest_used"]["0"]
    assert s["queue_used"]["1"] == s["guest_used"]["1"], "TX is not relayed"
    assert [mediated["iova"], mediated["size"]] in s["dma_mappings"]
    # Direct mode, for contrast: the device wrote the guest's RX used ring itself.
    d = part(peer, "direct")
    assert d["queue_used"]["0"] == d["guest_used"]["0"] and "mediated" not in d


def test_sw_relay_copied_every_used_entry_and_signalled_the_guest(peer):
    s = part(peer, "sw")
    n = len(peer["sent"]["sw"])
    assert s["mediated_used_idx"] == n and s["rx_used_idx"] == n
    stats = s["relay_stats"]["0"]
    assert stats["relayed"] == n and stats["interrupts"] >= 1 and stats["signals"] >= 1


def test_sw_relay_logs_every_page_of_every_rx_buffer_it_completed(peer):
    s = part(peer, "sw")
    chains = {c["head"]: c for c in s["rx_posted"]}
    used = {e["id"] for e in s["rx"]}
    expected = set().union(*(chain_pages(chains[i]) for i in used))
    dirty = set(s["dirty_pages_running"])
    assert expected and expected <= dirty, f"pages not logged: {sorted(expected - dirty)}"
    # The guest used ring the relay wrote is logged too.
    assert s["guest_used"]["0"] // PAGE in dirty
    # Buffers the device never completed are not logged (the chains share no page).
    untouched = set().union(*(chain_pages(c) for h, c in chains.items() if h not in used))
    assert untouched and not untouched & dirty, sorted(untouched & dirty)
    assert set(s["dirty_pages_closed"]) >= dirty


# --- 4. cleanup -----------------------------------------------------------------------------

def test_close_releases_everything_and_unbinds(peer):
    c = part(peer, "cleanup")
    assert c["fn_closed"] is True and c["dma_mappings"] == []
    assert c["device_fds"] == [-1, -1, -1]
    assert c["fds_after"] == c["fds_before"], "file descriptors leaked"
    assert c["threads_after"] == c["threads_before"], c["threads"]
    assert c["reopened_ids"] == [0x1AF4, 0x1041]
    assert c["driver_after_unbind"] == "virtio-pci"
    assert peer["run"].exit_status == 0, peer["run"].describe()
