"""Hypothesis over seeds, traffic mixes and migration start times, both modes:
destination RAM equals source RAM, and nothing is lost or duplicated, every time."""
import pathlib

from hypothesis import given, settings, strategies as st

from ifcvf.runs import migration
from sim.scenario import load

BASE = load(pathlib.Path(__file__).resolve().parents[2] / "scenarios/live-migration.toml")


def scenario(seed, mode, pairs, rx, tx, size, warmup, chain_ring):
    sections = {name: dict(values) for name, values in BASE.sections.items()}
    sections["driver"].update(devargs="vdpa=1,sw-live-migration=1" if mode == "sw" else "vdpa=1",
                              queue_pairs=pairs, queue_size=chain_ring, guest_memory_mib=8)
    sections["traffic"].update(rx_gbps=rx, tx_gbps=tx, frame_size=size, warmup_us=warmup,
                               duration_us=150.0)
    sections["migration"].update(bandwidth_mib_s=2048.0, downtime_limit_ms=1.0)
    return BASE.__class__(**{**BASE.__dict__, "seed": seed, "device": {"queue_pairs": pairs},
                             "sections": sections})


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), mode=st.sampled_from(["hw", "sw"]), pairs=st.integers(1, 2),
       rx=st.sampled_from([0.0, 5.0, 40.0, 100.0]), tx=st.sampled_from([0.0, 5.0, 40.0]),
       size=st.sampled_from([64, 512, 1518]), warmup=st.floats(0.0, 400.0),
       ring=st.sampled_from([64, 256]))
def test_migration_invariants(seed, mode, pairs, rx, tx, size, warmup, ring):
    result = migration.run(scenario(seed, mode, pairs, rx, tx, size, warmup, ring))
    inv = result["invariants"]
    assert inv["memory_equal"] is True, inv["mismatched_pages"][:10]
    assert inv["frames_lost"] == 0 and inv["frames_duplicated"] == 0, result["problems"]
    assert inv["in_order"] and inv["exclusive"], result["problems"]
    assert result["ok"], result["problems"]
    assert result["migration"]["mode"] == mode
