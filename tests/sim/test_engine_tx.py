"""TX engine: guest chains -> frames on the wire, used entries, notifications, stop."""
from __future__ import annotations

import pytest

from test_engine_rig import ALL, BASE_FEATURES, EVENT_IDX, INDIRECT, MRG, Rig, frame
from sim.testing.splitring import AVAIL_F_NO_INTERRUPT, USED_F_NO_NOTIFY


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


@pytest.mark.parametrize("layout", ["single", "split", "indirect"])
def test_chains_of_every_shape_leave_on_the_wire_intact_and_in_order(rig, layout):
    rig.start(ALL)
    frames = [frame(60 + 97 * i, i) for i in range(12)]
    heads = rig.post_tx(1, frames, layout)
    rig.run_ns(30_000)
    assert rig.capture.frames() == frames
    assert rig.rings[1].take_used() == [(h, 0) for h in heads]
    q = rig.model.queue(1)
    assert (q.last_avail, q.last_used) == (12, 12)
    assert not rig.model.needs_reset


def test_a_legacy_guest_with_the_10_byte_header_carries_traffic(rig):
    # virtio 0.95-style: neither VERSION_1 nor MRG_RXBUF -> 10-byte header
    features = rig.start(BASE_FEATURES & ~(1 << 32) | EVENT_IDX)
    assert rig.hdr == 10 and not features >> 32 & 1
    frames = [frame(100, i) for i in range(5)]
    rig.post_tx(1, frames, "split")
    rig.run_ns(20_000)
    assert rig.capture.frames() == frames


def test_a_chain_shorter_than_a_header_plus_ethernet_header_is_a_counted_drop(rig):
    rig.start(ALL)
    ring = rig.rings[1]
    ring.set_desc(0, rig.slot_addr(1, 0), 12 + 5)       # 5 bytes after the header: a runt
    ring.post(0)
    rig.next_slot[1] = 1
    good = rig.post_tx(1, [frame(80, 1)], publish=True)  # next slot
    rig.run_ns(20_000)
    assert rig.capture.frames() == [frame(80, 1)]
    assert ring.take_used() == [(0, 0), (good[0], 0)]
    assert rig.model.queue(1).engine.runts == 1
    assert not rig.model.needs_reset


def test_frames_longer_than_the_mtu_allows_are_dropped_not_faults(rig):
    rig.start(ALL)
    rig.post_tx(1, [frame(1518 + 1, 0), frame(1514, 1)])   # mtu 1500: 1518 B max (VLAN)
    rig.run_ns(20_000)
    assert rig.capture.frames() == [frame(1514, 1)]
    assert rig.model.queue(1).engine.oversize == 1
    assert rig.rings[1].used_idx == 2


def test_start_looks_at_the_ring_without_a_kick(rig):
    # A migration destination: the guest posted while nobody ran the queue.
    ring = rig.rings[1]
    ring.start_at(500)
    rig.post_tx(1, [frame(64, i) for i in range(3)], kick=False)
    rig.start(ALL, bases={0: 0, 1: 500}, init_rings=False)
    rig.run_ns(20_000)
    assert len(rig.capture.frames()) == 3
    assert rig.model.queue(1).last_used == 503


def test_event_idx_idle_engine_asks_for_the_next_kick_and_no_kick_is_missed(rig):
    rig.start(ALL)
    rig.post_tx(1, [frame(64, 0)])
    rig.run_ns(20_000)
    ring = rig.rings[1]
    assert ring.avail_event == 1              # idle: kick me when entry 1 is published
    doorbells = rig.model.queue(1).doorbells
    rig.post_tx(1, [frame(64, 1)], kick=False)  # a guest that checks avail_event would kick
    rig.kick(1)
    rig.run_ns(20_000)
    assert rig.model.queue(1).doorbells == doorbells + 1
    assert len(rig.capture.frames()) == 2


def test_without_event_idx_the_device_sets_no_notify_while_busy_and_clears_it_idle(rig):
    rig.start(ALL & ~EVENT_IDX)
    ring = rig.rings[1]
    assert ring.used_flags == 0
    seen = []
    engine = rig.model.queue(1).engine
    original = engine._round

    def spy():
        original()
        seen.append(ring.used_flags)
    engine._round = spy
    rig.post_tx(1, [frame(64, i) for i in range(200)])   # > one batch: busy for a while
    rig.run_ns(50_000)
    assert USED_F_NO_NOTIFY in seen[:-1]
    assert ring.used_flags == 0                # drained: kicks wanted again
    assert len(rig.capture.frames()) == 200


def test_interrupts_follow_no_interrupt_flag_without_event_idx(rig):
    rig.start(ALL & ~EVENT_IDX)
    rig.rings[1].avail_flags = AVAIL_F_NO_INTERRUPT
    rig.post_tx(1, [frame(64, 0)])
    rig.run_ns(20_000)
    assert rig.rings[1].used_idx == 1 and rig.interrupts(1) == 0
    rig.rings[1].avail_flags = 0
    rig.post_tx(1, [frame(64, 1)])
    rig.run_ns(20_000)
    assert rig.interrupts(1) == 1


def test_interrupts_follow_used_event_with_event_idx(rig):
    rig.start(ALL)
    ring = rig.rings[1]
    ring.used_event = 5                       # interrupt when used idx passes 5
    for i in range(5):                        # used idx 1..5: entry 5 not yet used
        rig.post_tx(1, [frame(64, i)])
        rig.run_ns(10_000)
    assert ring.used_idx == 5 and rig.interrupts(1) == 0
    rig.post_tx(1, [frame(64, 5)])            # used idx 6: passes 5
    rig.run_ns(10_000)
    assert rig.interrupts(1) == 1
    rig.post_tx(1, [frame(64, 6)])
    rig.run_ns(10_000)
    assert rig.interrupts(1) == 1             # used_event not moved: no more


def test_stop_completes_fetched_frames_and_reports_exact_indexes(rig):
    rig.start(ALL)
    frames = [frame(1514, i) for i in range(100)]
    rig.post_tx(1, frames)
    rig.run_ns(600)                           # doorbell landed, first rounds in flight
    engine = rig.model.queue(1).engine
    assert engine._pending                    # work in flight when the stop comes
    states = rig.stop([1])
    sent = rig.capture.frames()
    used = rig.rings[1].take_used()
    assert states[1].last_avail == states[1].last_used == len(used)
    assert 0 < len(used) < 100
    rig.run_ns(20_000)                        # the wire drains what was fetched
    assert rig.capture.frames() == frames[:len(used)]
    assert len(sent) <= len(used)


def test_a_destination_vf_continues_where_the_source_stopped():
    src, dst = Rig(name="vf0"), Rig(name="vf1", index=1)
    try:
        src.start(ALL)
        frames = [frame(800, i) for i in range(150)]
        src.post_tx(1, frames)
        src.run_ns(1_500)
        state = src.stop([1])[1]
        done = state.last_used
        assert 0 < done < 150
        # "migrate": copy guest memory, restore the ring state on the destination
        dst.mem.view[:] = src.mem.view
        dst.rings[1].shadow_avail = src.rings[1].shadow_avail
        dst.start(ALL, bases={0: 0, 1: done}, queues=[1], init_rings=False)
        dst.run_ns(60_000)
        src.run_ns(20_000)
        assert src.capture.frames() + dst.capture.frames() == frames
        assert dst.model.queue(1).last_used == 150
    finally:
        src.close()
        dst.close()


def test_indirect_descriptors_need_the_feature(rig):
    rig.start(ALL & ~INDIRECT)
    rig.post_tx(1, [frame(64, 0)], "indirect")
    rig.run_ns(10_000)
    assert rig.model.needs_reset
    assert "VIRTIO_F_INDIRECT_DESC" in rig.model.errors[0]


def test_mrg_is_irrelevant_to_tx(rig):
    rig.start(ALL & ~MRG)
    rig.post_tx(1, [frame(300, 1)])
    rig.run_ns(10_000)
    assert rig.capture.frames() == [frame(300, 1)]
