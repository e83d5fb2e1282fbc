"""Automatic receive steering (sim/steering.py) on a running model: TX teaches, RX follows,
and the driver's MQ register and queue stops bound the RX queues used."""
from __future__ import annotations

import pytest

from test_engine_rig import ALL, Rig
from sim.steering import install
from sim.testing.flows import in4, out4


@pytest.fixture
def rig():
    r = Rig(pairs=3)
    r.start(ALL)
    r.steering = install(r.model)
    for q in (0, 2, 4):
        r.post_rx(q, 64)
    yield r
    r.close()


def received(rig, q: int) -> list[bytes]:
    return [f for f, _ in rig.rx_frames(q)]


def test_answers_land_on_the_pair_each_flow_transmitted_on(rig):
    rig.post_tx(1, [out4(1000)])
    rig.post_tx(3, [out4(1001)])
    rig.post_tx(5, [out4(1002)])
    rig.run_ns(20_000)
    assert len(rig.capture.frames()) == 3
    # One batch from the wire holding all three answers, interleaved.
    rig.capture.send([in4(1002), in4(1000), in4(1001), in4(1000)])
    rig.run_ns(20_000)
    assert received(rig, 0) == [in4(1000), in4(1000)]
    assert received(rig, 2) == [in4(1001)]
    assert received(rig, 4) == [in4(1002)]
    assert rig.model.datapath.stats()["steering"]["hits"] == 4


def test_pairs_beyond_the_mq_register_receive_nothing(rig):
    rig.post_tx(5, [out4(port) for port in range(40)])     # every flow learned on pair 2
    rig.run_ns(50_000)
    rig.hw.set_mq(2)                                        # the driver: 2 pairs in use
    rig.capture.send([in4(port) for port in range(40)])
    rig.run_ns(50_000)
    on0, on2 = received(rig, 0), received(rig, 2)
    assert received(rig, 4) == []
    assert len(on0) + len(on2) == 40 and on0 and on2        # the hash spreads over 0 and 1
    rig.hw.set_mq(3)
    rig.capture.send([in4(7)])
    rig.run_ns(20_000)
    assert received(rig, 4) == [in4(7)]                     # in use again: the learned pair


def test_a_stopped_rx_queue_is_not_steered_to(rig):
    rig.post_tx(3, [out4(port) for port in range(20)])
    rig.run_ns(50_000)
    rig.hw.stop_queue(2)          # MQ still says 3: pair 1's RX queue stopped on its own
    rig.capture.send([in4(port) for port in range(20)])
    rig.run_ns(50_000)
    assert len(received(rig, 0)) + len(received(rig, 4)) == 20
    assert rig.model.queue(2).engine.dropped == 0


def test_without_steering_installed_everything_goes_to_pair_0():
    rig = Rig(pairs=2)
    try:
        rig.start(ALL)
        rig.post_rx(0, 8)
        rig.post_rx(2, 8)
        rig.post_tx(3, [out4(1)])
        rig.run_ns(20_000)
        rig.capture.send([in4(1)])
        rig.run_ns(20_000)
        assert received(rig, 0) == [in4(1)] and received(rig, 2) == []
        assert "steering" not in rig.model.datapath.stats()
    finally:
        rig.close()
