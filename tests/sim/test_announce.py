"""After switch-over: QEMU's announce (sim/announce.py), the guest's gratuitous
ARPs, the switch moving the MAC, and the RX blackout with and without
VIRTIO_NET_F_GUEST_ANNOUNCE (ifcvf/tools/runs/migration.py).  And the
decision on PROTOCOL_F_RARP: the back-end does not offer it (the VF cannot
send a RARP); QEMU then never sends SEND_RARP, and one that arrives anyway is
harmless."""
from __future__ import annotations

import dataclasses
import pathlib

import pytest

from ifcvf.tools.runs import migration
from ifcvf.tools.runs.stack import SimHost
from ifcvf.vhost import protocol as p
from ifcvf.vhost.backend import OFFERED_PROTOCOL
from sim import virtio_regs as vr
from sim.announce import (GUEST_ANNOUNCED, SENT_RARP, UNSUPPORTED, AnnounceParams,
                          VirtioNetAnnounce, announce_self, migration_done)
from sim.guest import gratuitous_arp, negotiate
from sim.scenario import load
from sim.world import World

ROOT = pathlib.Path(__file__).resolve().parents[2]
ANNOUNCE = 1 << vr.F_NET_GUEST_ANNOUNCE | 1 << vr.F_NET_CTRL_VQ | 1 << vr.F_NET_STATUS
MS = 1_000_000


def test_qemu_default_announce_timing():
    params = AnnounceParams()
    assert [params.delay_ms(r) for r in (4, 3, 2, 1)] == [50, 150, 250, 350]
    assert AnnounceParams(initial_ms=500, max_ms=550, step_ms=100).delay_ms(1) == 550  # capped
    with pytest.raises(ValueError):
        AnnounceParams(initial_ms=600, max_ms=550)


def test_five_rounds_each_armed_by_the_guests_ack():
    world = World(1)
    announcer = None

    def guest_acks():                       # config interrupt -> GARP -> ANNOUNCE_ACK 1 ms later
        assert announcer.read_status() & vr.NET_S_ANNOUNCE
        world.call_at(world.now + world.cycles(MS), lambda _ev: announcer.handle_ack())
    announcer = VirtioNetAnnounce(world, ANNOUNCE, guest_acks)
    announcer.post_load()
    world.advance_ns(2000 * MS)
    fired_ms = [world.ns(t) / MS for t in announcer.fired]
    assert fired_ms == pytest.approx([0, 51, 202, 453, 804])
    assert len(announcer.acks) == 5 and announcer.round == 0
    assert not announcer.read_status() & vr.NET_S_ANNOUNCE
    assert announcer.read_status() & vr.NET_S_LINK_UP
    assert announcer.handle_ack() is False and announcer.refused == 1   # no bit set: VIRTIO_NET_ERR


def test_a_guest_that_never_acks_gets_one_notification_and_none_without_the_feature():
    world = World(1)
    silent = VirtioNetAnnounce(world, ANNOUNCE, lambda: None)
    silent.post_load()
    without = VirtioNetAnnounce(world, ANNOUNCE & ~(1 << vr.F_NET_GUEST_ANNOUNCE), lambda: None)
    without.post_load()
    world.advance_ns(2000 * MS)
    assert len(silent.fired) == 1 and not without.fired


def test_guest_announce_needs_ctrl_vq():
    offered = ANNOUNCE | 1 << vr.F_VERSION_1
    assert negotiate(offered) >> vr.F_NET_GUEST_ANNOUNCE & 1
    assert not negotiate(offered & ~(1 << vr.F_NET_CTRL_VQ)) >> vr.F_NET_GUEST_ANNOUNCE & 1


def test_gratuitous_arp_layout():
    mac = bytes.fromhex("525400000001")
    frame = gratuitous_arp(mac)
    assert len(frame) == 60 and frame[:6] == b"\xff" * 6 and frame[6:12] == mac
    assert frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x01"      # ARP request
    assert frame[22:28] == mac and frame[28:32] == frame[38:42]            # sender IP = target IP


class _FakeFrontEnd:
    def __init__(self, protocol_features):
        self.protocol_features = protocol_features
        self.sent = []

    def send(self, request, payload=None, **_kw):
        self.sent.append((request, payload))


def test_migration_done_follows_qemu():
    mac = bytes.fromhex("525400000001")
    with_rarp = _FakeFrontEnd(1 << p.ProtocolFeature.RARP)
    assert migration_done(with_rarp, mac, ANNOUNCE) == GUEST_ANNOUNCED and not with_rarp.sent
    assert migration_done(with_rarp, mac, 0) == SENT_RARP
    (request, payload), = with_rarp.sent
    assert request is p.Request.SEND_RARP and payload.value.to_bytes(8, "little")[:6] == mac
    assert migration_done(_FakeFrontEnd(0), mac, 0) == UNSUPPORTED


def test_the_backend_does_not_offer_rarp_so_qemu_never_sends_send_rarp():
    """Decision: PROTOCOL_F_RARP stays off (the VF cannot make a RARP, as DPDK's
    IFCVF driver says).  QEMU's announce_self then ends in -ENOTSUP for a guest
    without GUEST_ANNOUNCE, and sends nothing to the back-end."""
    assert not OFFERED_PROTOCOL >> p.ProtocolFeature.RARP & 1
    host = SimHost(seed=2)
    try:
        vf = host.add_vf()
        fe = host.connect(vf)
        fe.connect(2)
        assert not fe.protocol_features >> p.ProtocolFeature.RARP & 1
        rounds = announce_self(host.world, fe, bytes.fromhex("525400000001"), 0)
        host.world.advance_ns(1000 * MS)
        assert [o for _, o in rounds] == [UNSUPPORTED] * 5
        assert [round(host.world.ns(t) / MS) for t, _ in rounds] == [0, 50, 200, 450, 800]
        assert "SEND_RARP" not in fe.log
        # one sent anyway (a front-end that ignores the negotiation) is accepted and logged
        fe.send(p.Request.SEND_RARP, p.U64(0x0100_0054_5200))
        assert fe.get_u64(p.Request.GET_FEATURES) == fe.features     # the connection lives on
    finally:
        host.close()


def _short(name: str, **sections):
    scenario = load(ROOT / "scenarios" / f"{name}.toml")
    merged = {k: {**scenario.sections[k], **sections.get(k, {})} for k in scenario.sections}
    return dataclasses.replace(scenario, sections=merged)


def test_rx_blackout_with_guest_announce_is_short():
    result = migration.run(_short("blackout-announce", traffic={"duration_us": 3000.0,
                                                                "rx_pps": 200000.0}))
    assert result["ok"], result["problems"]
    net = result["network"]
    b, = net["blackout"]
    assert net["guest_announce"] and b["mac_moved_by"] == "gratuitous ARP"
    assert b["self_announce"] == [GUEST_ANNOUNCED]
    assert b["announce_rounds_us"] and b["announce_acks_us"]
    assert 0 < b["mac_moved_us"] < 100 and b["first_frame_at_destination_us"] < 100
    assert b["frames_to_old_port"] < 25
    assert result["traffic"]["after"]["rx_pps"] > 150000


def test_rx_blackout_without_guest_announce_lasts_until_the_guest_sends():
    rx_only = migration.run(_short("blackout-no-announce", traffic={"duration_us": 3000.0,
                                                                    "rx_pps": 200000.0}))
    assert rx_only["ok"], rx_only["problems"]
    b, = rx_only["network"]["blackout"]
    assert not rx_only["network"]["guest_announce"] and b["self_announce"] == [UNSUPPORTED]
    assert b["mac_moved_us"] is None and b["first_frame_at_destination_us"] is None
    assert b["frames_to_old_port"] > 500 and rx_only["traffic"]["after"]["rx_pps"] == 0
    assert rx_only["invariants"]["frames_lost"] == 0      # dropped by the old VF, counted
    # the guest transmits: its first frame moves the MAC
    talking = migration.run(_short("blackout-no-announce",
                                   traffic={"duration_us": 3000.0, "rx_pps": 200000.0,
                                            "tx_pps": 1000.0}))
    assert talking["ok"], talking["problems"]
    b, = talking["network"]["blackout"]
    assert b["mac_moved_by"] == "guest traffic" and b["first_frame_at_destination_us"] is not None
    assert b["mac_moved_us"] <= 1100


def test_intx_guest_announces_too():
    result = migration.run(_short("blackout-announce",
                                  driver={"interrupts": "intx"},
                                  traffic={"duration_us": 2000.0}))
    assert result["ok"], result["problems"]
    assert result["network"]["blackout"][0]["mac_moved_by"] == "gratuitous ARP"


def test_network_keys_are_validated():
    from sim.scenario import ScenarioError, load as load_text
    bad = ROOT / "scenarios" / "blackout-announce.toml"
    text = bad.read_text().replace("[traffic]", "[network]\nannounce_max_ms = 10.0\n\n[traffic]")
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    with pytest.raises(ScenarioError, match=r"\[network\] announce_max_ms = 10.0"):
        load_text(f.name)
    pathlib.Path(f.name).unlink()


def test_back_and_forth_reports_a_blackout_per_leg_each_counted_for_its_own_leg():
    result = migration.run(load(ROOT / "scenarios" / "back-and-forth.toml"))
    assert result["ok"], result["problems"]
    first, second = result["network"]["blackout"]
    assert (first["leg"], second["leg"]) == ("vf0->vf1", "vf1->vf0")
    for b in (first, second):
        # 30 Gb/s of 1518 B frames is 2.4 frames/us: what reached the old port is what
        # came before the MAC moved, not the traffic after the guest came back
        assert b["mac_moved_us"] is not None and b["frames_to_old_port"] < 3 * (b["mac_moved_us"] + 15)


# --- the guest model's side, over a ring device (no VF, no QEMU) ----------------------------
def _guest(features, interrupts="msix"):
    import os

    from hal.memory import HostMemory
    from sim.guest import GuestNet
    from sim.testing.guest_testdev import RingDevice

    world = World(5)
    mem = HostMemory(8 << 20, "guest-ram")
    guest = GuestNet(world, mem, features=features, queue_size=64, interrupts=interrupts)
    dev = RingDevice(world, mem, [guest.queue_addresses(q) for q in range(2)], 64, features)
    fds = []
    for q in range(2):
        kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        fds += [kick, call]
        guest.attach(q, kick, call)
        dev.attach(q, kick, call)

    def close():
        for fd in fds:
            os.close(fd)
        mem.close()
    return world, guest, dev, close


@pytest.mark.parametrize("interrupts", ["msix", "intx"])
def test_guest_announces_and_acks_on_a_config_interrupt_taken_after_a_pause(interrupts):
    features = vr.feature_mask(vr.F_VERSION_1, vr.F_EVENT_IDX) | ANNOUNCE
    world, guest, dev, close = _guest(features, interrupts)
    try:
        acks = []
        status = {"v": vr.NET_S_LINK_UP | vr.NET_S_ANNOUNCE}

        def ack():
            acks.append(world.now)
            status["v"] &= ~vr.NET_S_ANNOUNCE
            return True
        guest.attach_control(lambda: status["v"], ack)
        guest.start()
        world.advance_ns(100_000)
        guest.pause()
        guest.config_interrupt()
        world.advance_ns(100_000)
        assert not acks and not dev.tx_frames          # a paused vCPU takes nothing
        guest.resume()
        world.advance_ns(100_000)
        assert len(acks) == 1 and guest.announce_acks == 1
        garp, = dev.tx_frames
        assert garp == gratuitous_arp(guest.mac)
        if interrupts == "intx":
            assert guest.irq_none >= 1                 # config-only: IRQ_NONE, as Linux counts it
    finally:
        close()


def test_no_status_feature_no_announce():
    features = vr.feature_mask(vr.F_VERSION_1) | ANNOUNCE & ~(1 << vr.F_NET_STATUS)
    world, guest, dev, close = _guest(features)
    try:
        guest.attach_control(lambda: vr.NET_S_ANNOUNCE, lambda: True)
        guest.start()
        guest.config_interrupt()
        world.advance_ns(100_000)
        assert not dev.tx_frames and guest.announce_acks == 0
    finally:
        close()
