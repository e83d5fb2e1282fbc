"""`ifcvf bench sim` runs, explains itself and writes the JSON it promises (not a timed test).

The one-direction runs are checked on simulated rates only (deterministic), never on
the wall clock."""
import json

import pytest

from ifcvf.tools.benchmarks.measure import run_direction, run_directions
from ifcvf.tools.benchmarks.tlp import default_link, explain, explain_link
from ifcvf.tools.cli import main

LINE_1518 = 100e9 / ((1518 + 20) * 8) / 1e6      # 8.127 Mpps
LINE_64 = 100e9 / ((64 + 20) * 8) / 1e6          # 148.81 Mpps


def test_bench_sim_help_explains_the_columns(capsys):
    try:
        main(["bench", "sim", "--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for word in ("frames/wall-s", "sim/wall", "binds", "--json", "1518-byte", "copy limit",
                 "copy_limit_frames_per_s"):
        assert word in out


def test_bench_sim_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "sim", "--sim-us", "200", "--dir-us", "100", "--micro-frames", "1000",
               "--pairs", "1", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data["frames_per_wall_s"]) == {"64", "1500"}
    assert set(data["sim_to_wall_ratio"]) == {"64", "1500"}
    assert all(v > 0 for v in data["frames_per_wall_s"].values())
    assert "pipeline" in data
    # The copy limit, keyed like frames_per_wall_s, follows from the measured memcpy
    # bandwidth and the bytes each frame moves: 4 L + 12 for L = size without FCS.
    assert set(data["copy_limit_frames_per_s"]) == {"64", "1500"}
    copy = data["memcpy_bytes_per_s"]
    assert copy > 0
    for size, frame_len in (("64", 60), ("1500", 1514)):
        assert data["copy_limit_frames_per_s"][size] == pytest.approx(2 * copy / (4 * frame_len + 12))
    assert set(data["directions"]) == {"64", "1500"}
    for size in ("64", "1500"):
        for d in ("rx", "tx"):
            row = data["directions"][size][d]
            assert {"mpps", "wire_gbps", "of_line", "binds", "pcie_ceiling_mpps"} <= set(row)
            assert row["binds"] in ("wire", "pcie", "guest")
    assert set(data["explanation"]) == {"pcie", "64", "1500"}
    for row in data["guest_side"].values():
        assert {"fill", "check", "guest_rx_ring", "guest_tx_ring", "guest_model"} <= set(row)
    assert "guest side alone" in capsys.readouterr().out


def test_bench_sim_refuses_bad_sizes(capsys):
    assert main(["bench", "sim", "--sizes", "32", "--no-micro", "--no-full"]) == 2
    assert main(["bench", "sim", "--sizes", "x", "--no-micro", "--no-full"]) == 2


def test_the_bench_wiring_brings_a_vf_up_on_the_guest_rings():
    """build_stack: rings programmed into the VF, kicks reach its doorbells (idle engines)."""
    from ifcvf.tools.benchmarks.stack import build_stack
    from sim.queue_state import IdleEngine
    from sim.world import World

    world = World(2)
    dp = build_stack(world, pairs=2, queue_size=64, tx_rate_gbps=10, tx_sizes=512,
                        engine_factory=lambda fn, queue: IdleEngine(queue))
    try:
        for q in range(4):
            state = dp.model.queue(q)
            assert (state.desc, state.avail, state.used) == dp.guest.queue_addresses(q)
            assert state.enabled and state.running and state.size == 64
        assert dp.model.status & 0x4                      # DRIVER_OK
        dp.guest.start()
        world.advance_ns(200_000)
        # the guest's TX kicks became doorbells on the TX queues (nothing moves: idle engines)
        assert dp.model.queue(1).doorbells >= 1 and dp.model.queue(3).doorbells >= 1
        assert dp.guest.tx_frames() == 2 * 64            # both TX rings filled, then full
        # a queue interrupt from the device reaches the guest's RX consumer
        dp.model.raise_queue_interrupt(0)
        world.advance_ns(10_000)
        assert dp.guest.queues[0].interrupts == 1
    finally:
        dp.close()


@pytest.mark.parametrize("direction", ["rx", "tx"])
def test_1500_byte_traffic_reaches_line_rate_in_each_direction_alone(direction):
    """RX alone (generator -> VF -> guest) and TX alone (guest -> VF -> sink), the whole
    stack (GuestNet, ifcvf.hw over hal.sim, the engines, the wire), checked frames."""
    r = run_direction(1500, direction, window_us=2000)
    assert r.frame_size == 1518
    assert r.mpps == pytest.approx(LINE_1518, rel=0.01)
    assert r.wire_gbps == pytest.approx(100.0, rel=0.01)      # 100 Gb/s on the wire
    assert r.binds == "wire"
    assert r.clean and r.dropped == 0
    busy = r.pcie_up if direction == "rx" else r.pcie_down
    assert 0.85 < busy < 1.0                                  # PCIe nearly full, not over


def test_1500_byte_both_ways_need_more_upstream_than_gen3_x16_has():
    """What the full run's 85 Gb/s TX comes from: RX's writes plus TX's read requests
    at line rate exceed the TLP bandwidth upstream, as the explanation says."""
    dirs = {d: run_direction(1500, d, window_us=1000) for d in ("rx", "tx")}
    rx, tx = dirs["rx"], dirs["tx"]
    need = LINE_1518 * 1e6 * (rx.up_per_frame + tx.up_per_frame) * 8 / 1e9
    link = default_link()
    assert link.gbps == pytest.approx(113.7, abs=0.1)
    assert rx.up_per_frame > 1670 and tx.up_per_frame > 70   # 6 write TLPs; 3+ read requests
    assert need > link.gbps
    text = explain(1500, dirs, None, pairs=4, link=link)
    assert "the wire binds" in text and "upstream saturates" in text
    assert f"{need:.1f} Gb/s" in text


def test_64_byte_limit_is_the_guest_cpu_and_then_pcie_not_the_wire():
    """The 64 B binding limit the bench prints: the guest's cores (both directions), and
    with a guest that costs nothing PCIe, at the rate its TLP arithmetic predicts,
    below line rate."""
    dirs = run_directions(64, pairs=4, queue_size=256, burst=64, seed=1, window_us=500)
    for direction, r in dirs.items():
        assert r.binds == "guest", direction
        assert r.guest > 0.95
        assert 17 < r.mpps < 22                               # ~4.9 Mpps per core x 4 pairs
        assert r.pcie_ceiling_mpps < 0.92 * LINE_64           # PCIe could not reach line rate
        free = r.free_guest
        assert free is not None and free.binds == "pcie", direction
        assert free.mpps == pytest.approx(r.pcie_ceiling_mpps, rel=0.03)
        assert free.mpps < 0.92 * LINE_64
        assert r.clean and free.clean
    assert dirs["rx"].dropped > 0                             # the excess dropped at the FIFO
    # upstream for RX (72 B of header + frame in one 96 B write TLP, plus ring work),
    # downstream for TX (one 92 B completion, plus descriptor and ring reads)
    assert 96 < dirs["rx"].up_per_frame < 120 and dirs["rx"].free_guest.pcie_up > 0.97
    assert 92 < dirs["tx"].down_per_frame < 125 and dirs["tx"].free_guest.pcie_down > 0.97
    text = explain(64, dirs, None, pairs=4)
    assert text.count("the guest's CPU binds") == 2
    assert "PCIe-bound, never wire-bound" in text
    assert "113.7 Gb/s" in explain_link(default_link())
