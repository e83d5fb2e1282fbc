"""Timing of the datapath: line rate, the 64-byte limit, latencies, clock gating.

All assertions are on simulated time (deterministic), never on the wall clock.
"""
from __future__ import annotations

import math

import pytest

from test_engine_rig import ALL, Rig, frame
from sim.testing import enginebench
from sim.config import IfcvfConfig

LINE_1518 = 100e9 / ((1518 + 20) * 8) / 1e6      # 8.127 Mpps
LINE_64 = 100e9 / ((64 + 20) * 8) / 1e6          # 148.81 Mpps


@pytest.mark.parametrize("mode", ["tx", "rx", "loop"])
def test_1500_byte_traffic_reaches_line_rate_in_both_directions(mode):
    r = enginebench.run(mode, 1518, 1000.0)
    assert r["sim_mpps"] == pytest.approx(LINE_1518, rel=0.01)
    assert r["wire_gbps"] == pytest.approx(100.0, rel=0.01)
    assert r["dropped"] == 0


def test_64_byte_tx_is_bound_by_pcie_downstream():
    r = enginebench.run("tx", 64, 300.0)
    # data completions (72 B + 20 B TLP overhead each) plus descriptor reads fill
    # the downstream direction of Gen3 x16 (113.7 Gb/s of TLPs) before the wire
    assert r["sim_mpps"] < 0.9 * LINE_64
    assert r["pcie_down"] > 0.97
    assert r["pcie_up"] < 0.5


def test_64_byte_rx_is_bound_by_pcie_upstream():
    r = enginebench.run("rx", 64, 300.0)
    assert r["sim_mpps"] < 0.92 * LINE_64
    assert r["pcie_up"] > 0.97
    assert r["dropped"] > 0                      # the excess is dropped at the FIFO


def test_a_wider_link_moves_the_64_byte_limit_to_the_wire():
    wide = IfcvfConfig(queue_pairs=1, max_queue_size=1024, pcie_gen=4)
    r = enginebench.run("tx", 64, 200.0, config=wide)
    assert r["sim_mpps"] > 0.97 * LINE_64


def first_departure(config=None) -> tuple[int, int, int]:
    """(cycle of the kick's MMIO write, cycle the doorbell landed, first departure)."""
    rig = Rig(config=config)
    try:
        rig.start(ALL)
        rig.run_ns(5_000)
        rig.post_tx(1, [frame(1514, 0)], kick=False)
        kicked = rig.world.now
        rig.model.mmio_write(2, 1 * rig.config.notify_off_multiplier, 2, 1)
        rig.run_ns(20_000)
        doorbell = int(rig.world.trace.find("doorbell")[-1].split()[0])
        return kicked, doorbell, rig.capture.batches[0].times[0]
    finally:
        rig.close()


def test_the_first_frame_takes_doorbell_fetch_four_reads_and_serialization():
    kicked, doorbell, departed = first_departure()
    assert doorbell - kicked == 50                   # doorbell_ns = 200
    # 20 ns to the first read; avail idx, ring, descriptor, data reads (500 ns each,
    # plus their request and completion bytes); 1526 B of completions at 113.7 Gb/s
    # (56.85 B/cycle); 1538 B on the wire at 50 B/cycle
    floor = 5 + 4 * 125 + 1526 / 56.85 + 1538 / 50
    assert floor <= departed - doorbell <= floor + 8


@pytest.mark.parametrize("knob, reads", [("pcie_read_latency_ns", 4), ("doorbell_ns", 1),
                                         ("kick_to_fetch_ns", 1)])
def test_each_latency_parameter_shifts_the_first_frame_exactly(knob, reads):
    base = IfcvfConfig(queue_pairs=1)
    k0, _, a0 = first_departure(base)
    k1, _, a1 = first_departure(base.replace(**{knob: getattr(base, knob) + 400}))
    assert (a1 - k1) - (a0 - k0) == reads * 100        # 400 ns = 100 cycles per read


def test_msix_lands_msix_ns_after_the_used_entries():
    rig = Rig()
    try:
        rig.start(ALL)
        rig.post_tx(1, [frame(100, 0)])
        rig.run_ns(20_000)
        rounds = rig.world.trace.find("tx_round")
        delivered = [r for r in rig.world.trace.find("msix_deliver") if "vector=2" in r]
        done = int(rounds[0].split("done=")[1].split()[0])
        at = int(delivered[0].split()[0])
        assert at - done == rig.world.cycles(rig.config.msix_ns)
    finally:
        rig.close()


def test_a_busy_engine_takes_a_batch_per_wake_up():
    rig = Rig()
    try:
        rig.start(ALL)
        rig.post_tx(1, [frame(200, i) for i in range(200)])
        rig.run_ns(100_000)
        rounds = [r for r in rig.world.trace.find("tx_round")]
        assert [int(r.split("chains=")[1].split()[0]) for r in rounds] == [64, 64, 64, 8]
    finally:
        rig.close()


def test_idle_engines_schedule_nothing():
    rig = Rig()
    try:
        rig.start(ALL)
        rig.post_rx(0, 64)
        rig.post_tx(1, [frame(500, i) for i in range(100)])
        rig.capture.send([frame(500, i) for i in range(50)])
        rig.run_ns(200_000)
        assert len(rig.capture.frames()) == 100 and rig.rings[0].used_idx == 50
        assert rig.world.env.peek() == math.inf        # not a single timer left
        events = rig.world.trace.count
        rig.run_ns(1_000_000)
        assert rig.world.trace.count == events
    finally:
        rig.close()


def test_tx_queues_share_the_link_and_the_port():
    rig = Rig(pairs=2)
    try:
        rig.start(ALL)
        rig.post_tx(1, [frame(1514, i) for i in range(100)])
        rig.post_tx(3, [frame(1514, 1000 + i) for i in range(100)])
        rig.run_ns(100_000)
        times = rig.capture.times()
        assert len(times) == 200
        span = (max(times) - min(times)) / rig.world.clock_hz
        assert 199 / span / 1e6 == pytest.approx(LINE_1518, rel=0.02)   # one port's worth
    finally:
        rig.close()
