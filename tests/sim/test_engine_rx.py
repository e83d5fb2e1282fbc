"""RX engine: frames from the wire -> guest buffers, headers, merging, FIFO, stop."""
from __future__ import annotations

import struct

import pytest

from test_engine_rig import ALL, BASE_FEATURES, EVENT_IDX, VERSION_1, Rig, frame
from sim.config import IfcvfConfig
from sim.testing.splitring import USED_F_NO_NOTIFY


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def test_frames_land_in_buffers_behind_a_12_byte_header(rig):
    rig.start(ALL)
    heads = rig.post_rx(0, 16)
    frames = [frame(60 + 50 * i, i) for i in range(10)]
    rig.run_ns(1_000)
    rig.capture.send(frames)
    rig.run_ns(20_000)
    used = rig.rings[0].take_used()
    assert [u[0] for u in used] == heads[:10]
    assert [u[1] for u in used] == [12 + len(f) for f in frames]
    for (head, _), f in zip(used, frames):
        data = rig.gather(0, head, 12 + len(f))
        assert data[:12] == bytes(10) + struct.pack("<H", 1)   # num_buffers = 1
        assert data[12:] == f
    assert (rig.model.queue(0).last_avail, rig.model.queue(0).last_used) == (10, 10)


def test_mergeable_buffers_carry_a_frame_bigger_than_one_buffer(rig):
    rig.start(ALL)
    rig.post_rx(0, 32, buf_len=512)
    big = frame(1514, 7)
    rig.capture.send([frame(100, 1), big, frame(200, 2)])
    rig.run_ns(20_000)
    got = rig.rx_frames(0)
    assert [g[0] for g in got] == [frame(100, 1), big, frame(200, 2)]
    assert [g[1] for g in got] == [1, 3, 1]                 # 12 + 1514 over 512-byte buffers
    assert rig.model.queue(0).last_used == 5


def test_without_mrg_a_frame_too_big_for_its_buffer_is_dropped_and_counted(rig):
    rig.start(VERSION_1 | EVENT_IDX)
    rig.post_rx(0, 4, buf_len=600)
    rig.capture.send([frame(1000, 1), frame(500, 2)])
    rig.run_ns(20_000)
    got = rig.rx_frames(0)
    assert [g[0] for g in got] == [frame(500, 2)]             # the buffer served the next frame
    engine = rig.model.queue(0).engine
    assert engine.too_big == 1 and not rig.model.needs_reset


def test_a_legacy_guest_gets_a_10_byte_header(rig):
    rig.start(BASE_FEATURES & ~VERSION_1)
    assert rig.hdr == 10
    rig.post_rx(0, 4)
    rig.capture.send([frame(300, 3)])
    rig.run_ns(20_000)
    (head, length), = rig.rings[0].take_used()
    assert length == 10 + 300
    assert rig.gather(0, head, length) == bytes(10) + frame(300, 3)


def test_chained_and_indirect_rx_buffers(rig):
    rig.start(ALL)
    rig.post_rx(0, 4, buf_len=1600, pieces=4)      # indirect tables of 4 x 400 bytes
    rig.capture.send([frame(1514, 1), frame(64, 2)])
    rig.run_ns(20_000)
    assert [g[0] for g in rig.rx_frames(0)] == [frame(1514, 1), frame(64, 2)]


def test_frames_wait_for_buffers_then_the_fifo_overflows(rig):
    rig2 = Rig(config=IfcvfConfig(queue_pairs=1, rx_fifo_bytes=4000), name="vf9")
    try:
        rig2.start(ALL)
        rig2.capture.send([frame(1000, i) for i in range(6)])   # 4 fit in the FIFO
        rig2.run_ns(20_000)
        engine = rig2.model.queue(0).engine
        assert engine.fifo_drops == 2 and rig2.rings[0].used_idx == 0
        assert rig2.rings[0].avail_event == 0    # starved: kick me at the first buffer
        rig2.post_rx(0, 8)                       # the guest kicks
        rig2.run_ns(20_000)
        assert [g[0] for g in rig2.rx_frames(0)] == [frame(1000, i) for i in range(4)]
    finally:
        rig2.close()


def test_rx_asks_for_kicks_only_when_starved_without_event_idx(rig):
    rig.start(ALL & ~EVENT_IDX)
    rig.post_rx(0, 2)
    rig.capture.send([frame(100, i) for i in range(4)])
    rig.run_ns(20_000)
    ring = rig.rings[0]
    assert ring.used_idx == 2 and ring.used_flags == 0       # starved: kicks wanted
    rig.post_rx(0, 8)
    rig.run_ns(20_000)
    assert ring.used_idx == 4 and ring.used_flags == USED_F_NO_NOTIFY   # fed: no kicks


def test_frames_to_a_stopped_queue_are_dropped_and_counted(rig):
    rig.start(ALL)
    rig.stop([0])
    rig.capture.send([frame(100, 1)])
    rig.run_ns(10_000)
    assert rig.model.queue(0).engine.not_running_drops == 1


def test_stop_finishes_dma_in_flight_and_the_indexes_agree(rig):
    rig.start(ALL)
    rig.post_rx(0, 200)
    rig.run_ns(1_000)
    for k in range(15):                            # 15 wire batches of 10 frames
        rig.capture.send([frame(1514, 10 * k + i) for i in range(10)])
    rig.run_ns(4_000)                              # some frames in, DMA in flight
    engine = rig.model.queue(0).engine
    assert engine._pending                        # DMA in flight
    state = rig.stop([0])[0]
    got = rig.rx_frames(0)
    assert state.last_avail == state.last_used == len(got) > 0
    assert [g[0] for g in got] == [frame(1514, i) for i in range(len(got))]
    assert engine.stop_drops + len(got) + engine.fifo_drops <= 150


def test_multiple_queue_pairs_steer_by_the_datapath_hook():
    rig = Rig(pairs=2)
    try:
        rig.start(ALL)
        rig.post_rx(0, 4)
        rig.post_rx(2, 4)
        rig.model.datapath.steer = lambda batch: batch.data[14] % 2   # seq byte picks the pair
        rig.capture.send([frame(100, 1)])
        rig.capture.send([frame(100, 2)])
        rig.run_ns(20_000)
        assert [g[0] for g in rig.rx_frames(2)] == [frame(100, 1)]
        assert [g[0] for g in rig.rx_frames(0)] == [frame(100, 2)]
    finally:
        rig.close()


def test_mrg_buffers_shorter_than_the_header_are_a_fault(rig):
    rig.start(ALL)
    rig.post_rx(0, 4, buf_len=8)
    rig.capture.send([frame(100, 1)])
    rig.run_ns(20_000)
    assert rig.model.needs_reset
    assert "shorter than the net header" in rig.model.errors[0]
    assert rig.rings[0].used_idx == 0


def test_loopback_two_vfs_back_to_back():
    a = Rig(name="vf0", capture=False)
    b = Rig(name="vf1", index=1, capture=False, world=a.world)
    try:
        from sim.wire import connect
        connect(a.model.port, b.model.port, propagation_ns=5)
        a.start(ALL)
        b.start(ALL)
        b.post_rx(0, 64)
        frames = [frame(64 + 13 * i, i) for i in range(40)]
        a.post_tx(1, frames)
        a.run_ns(30_000)
        assert [g[0] for g in b.rx_frames(0)] == frames
    finally:
        a.close()
        b.close()
