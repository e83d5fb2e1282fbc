"""The 100G wire: exact serialization, delivery once per batch at the last arrival."""
from __future__ import annotations

import math

import pytest

from sim.frames import FrameBatch
from sim.wire import Port, connect, disconnect
from sim.world import World


def batch_of(lengths, fill=0xAB):
    b = FrameBatch()
    for n in lengths:
        b.append(bytes([fill]) * n)
    return b


@pytest.fixture
def pair():
    world = World(1)
    a, b = Port(world, "a"), Port(world, "b")
    got = []
    b.on_receive(lambda batch: got.append((world.now, batch)))
    connect(a, b, propagation_ns=100)
    return world, a, b, got


def test_64_byte_frames_leave_at_148_81_mpps_without_rounding_drift(pair):
    world, a, b, got = pair
    n = 10_000
    batch = batch_of([60] * n)                 # "64 B" frames: 60 bytes + FCS
    last = a.transmit(batch, 0)
    # 100 Gb/s at 250 MHz = 50 bytes per cycle; each frame is 60 + 24 byte times
    assert list(batch.times[:5]) == [math.ceil(84 * (i + 1) / 50) for i in range(5)]
    assert last == batch.times[-1] == math.ceil(84 * n / 50)
    assert a.line_rate_pps(64) == pytest.approx(148.81e6, rel=1e-4)
    mpps = (n - 1) / ((batch.times[-1] - batch.times[0]) / world.clock_hz) / 1e6
    assert mpps == pytest.approx(148.81, rel=1e-3)


def test_1518_byte_frames_leave_at_8_127_mpps(pair):
    world, a, b, got = pair
    batch = batch_of([1514] * 1000)
    a.transmit(batch, 0)
    assert batch.times[-1] == math.ceil(1538 * 1000 / 50)
    assert a.line_rate_pps(1518) / 1e6 == pytest.approx(8.127, rel=1e-3)


def test_the_handler_runs_once_per_batch_at_the_last_arrival(pair):
    world, a, b, got = pair
    sent = batch_of([100, 200, 300])
    a.transmit(sent, 10)
    world.advance(10_000)
    assert len(got) == 1
    at, delivered = got[0]
    prop = world.cycles(100)
    assert list(delivered.times) == [t + prop for t in sent.times]
    assert at == delivered.times[-1]               # called when the last frame is in
    assert all(t <= at for t in delivered.times)
    assert delivered.data is sent.data and list(delivered.lengths) == [100, 200, 300]
    assert b.rx_frames == 3 and b.rx_bytes == 600


def test_a_busy_port_queues_the_next_batch_back_to_back(pair):
    world, a, b, got = pair
    first = batch_of([1000] * 4)
    end = a.transmit(first, 0)
    second = batch_of([1000])
    end2 = a.transmit(second, 0)
    assert second.times[0] == end2 == math.ceil(1024 * 5 / 50)
    assert end == math.ceil(1024 * 4 / 50)
    later = batch_of([1000])
    assert a.transmit(later, 5000) == 5000 + math.ceil(1024 / 50)


def test_per_frame_ready_times_hold_frames_back(pair):
    world, a, b, got = pair
    batch = batch_of([1000, 1000, 1000])
    from array import array
    ready = array("q", [0, 500, 0])
    a.transmit(batch, 0, ready=ready)
    t0 = math.ceil(1024 / 50)
    assert batch.times[0] == t0
    assert batch.times[1] == 500 + math.ceil(1024 / 50)
    assert batch.times[2] == 500 + math.ceil(2048 / 50)


def test_short_frames_are_padded_to_the_ethernet_minimum(pair):
    world, a, b, got = pair
    batch = batch_of([20])
    assert a.transmit(batch, 0) == math.ceil(84 / 50)


def test_frames_nobody_receives_are_counted_as_lost():
    world = World(1)
    lone = Port(world, "lone")
    lone.transmit(batch_of([100] * 3), 0)
    assert lone.lost == 3
    a, b = Port(world, "a"), Port(world, "b")
    connect(a, b)                                   # b has no handler
    a.transmit(batch_of([100]), 0)
    world.advance(1000)
    assert a.lost == 1 and b.rx_frames == 0


def test_connect_rules_and_disconnect():
    world = World(1)
    a, b, c = Port(world, "a"), Port(world, "b"), Port(world, "c")
    with pytest.raises(ValueError):
        connect(a, a)
    with pytest.raises(ValueError):
        connect(a, b, propagation_ns=-1)
    connect(a, b)
    with pytest.raises(ValueError):
        connect(a, c)
    with pytest.raises(ValueError):
        connect(c, Port(World(2), "elsewhere"))
    disconnect(a)
    assert a.peer is None and b.peer is None
    connect(a, c)


def test_the_time_never_goes_backwards_when_earliest_is_in_the_past(pair):
    world, a, b, got = pair
    world.advance(1000)
    batch = batch_of([100])
    a.transmit(batch, 0)
    assert batch.times[0] >= world.now


def test_other_rates():
    world = World(1)
    p = Port(world, "p", rate_gbps=25)
    assert p.transmit(batch_of([60]), 0) == math.ceil(84 * 8 / 25e9 * 250e6)
