"""`ifcvf bench sim` runs, explains itself and writes the JSON it promises (not a timed test)."""
import json

from ifcvf.cli import main


def test_bench_sim_help_explains_the_columns(capsys):
    try:
        main(["bench", "sim", "--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for word in ("frames/wall-s", "sim/wall", "binds", "--json", "1518-byte"):
        assert word in out


def test_bench_sim_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "sim", "--sim-us", "200", "--micro-frames", "1000", "--pairs", "1",
               "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data["frames_per_wall_s"]) == {"64", "1500"}
    assert set(data["sim_to_wall_ratio"]) == {"64", "1500"}
    assert all(v > 0 for v in data["frames_per_wall_s"].values())
    assert "pipeline" in data
    for row in data["guest_side"].values():
        assert {"fill", "check", "guest_rx_ring", "guest_tx_ring", "guest_model"} <= set(row)
    assert "guest side alone" in capsys.readouterr().out


def test_bench_sim_refuses_bad_sizes(capsys):
    assert main(["bench", "sim", "--sizes", "32", "--no-micro", "--no-full"]) == 2
    assert main(["bench", "sim", "--sizes", "x", "--no-micro", "--no-full"]) == 2


def test_the_bench_wiring_brings_a_vf_up_on_the_guest_rings():
    """build_datapath: rings programmed into the VF, kicks reach its doorbells (idle engines)."""
    from ifcvf.benchmarks.sim import build_datapath
    from sim.queue_state import IdleEngine
    from sim.world import World

    world = World(2)
    dp = build_datapath(world, pairs=2, queue_size=64, tx_rate_gbps=10, tx_sizes=512,
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
