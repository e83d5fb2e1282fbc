"""Every scenario in scenarios/ runs with its invariants asserted, plus the
negative control that proves the checker can fail."""
import json
import pathlib
import subprocess
import sys

import pytest

from ifcvf.runs import migration
from sim.scenario import load

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.toml"))
REQUIRED = ["invariants.memory_equal", "invariants.frames_lost", "invariants.frames_duplicated",
            "migration.mode", "migration.iterations", "migration.downtime_us", "migration.converged",
            "traffic.tx_frames", "traffic.rx_frames", "trace_digest"]


def get(result, dotted):
    for part in dotted.split("."):
        result = result[part]
    return result


@pytest.mark.parametrize("path", [p for p in SCENARIOS if load(p).kind != "bringup"], ids=lambda p: p.stem)
def test_scenario_invariants_hold(path):
    scenario = load(path)
    result = migration.run(scenario)
    assert result["ok"], result["problems"]
    assert result["invariants"]["frames_lost"] == 0
    assert result["invariants"]["frames_duplicated"] == 0
    assert result["invariants"]["exclusive"]
    assert result["traffic"]["rx_frames"] == result["traffic"]["rx_offered"] - sum(
        result["traffic"]["rx_dropped_by_vf"].values())
    if scenario.kind == "migration":
        for key in REQUIRED:
            get(result, key)
        expect = scenario.section("expect")
        assert result["migration"]["converged"] == expect["converged"] or expect["cancelled"]
        assert result["migration"]["cancelled"] == expect["cancelled"]
        if expect["converged"] and not expect["cancelled"]:
            assert result["invariants"]["memory_equal"] is True
            assert result["migration"]["downtime_us"] > 0
        else:
            assert result["invariants"]["memory_equal"] is None  # the guest never left


def test_negative_control_the_checker_names_the_pages():
    """A VF that skips dirty marks must make the memory invariant fail, naming the pages."""
    scenario = load(ROOT / "scenarios/live-migration.toml")
    scenario = scenario.__class__(**{**scenario.__dict__,
                                     "device": {**scenario.device, "dirty_log_skip_fraction": 1.0}})
    result = migration.run(scenario)
    assert not result["ok"]
    mismatched = result["invariants"]["mismatched_pages"]
    assert result["invariants"]["memory_equal"] is False and mismatched
    assert set(mismatched) <= set(result["migration"]["skipped_dirty_marks"])
    assert any("pages differ" in p for p in result["problems"])


def test_half_the_marks_skipped_is_caught_too():
    scenario = load(ROOT / "scenarios/migration-hw-1qp-idle.toml")
    scenario = scenario.__class__(**{**scenario.__dict__,
                                     "device": {**scenario.device, "dirty_log_skip_fraction": 0.5},
                                     "sections": {**scenario.sections,
                                                  "traffic": {**scenario.section("traffic"),
                                                              "rx_gbps": 0.3, "warmup_us": 50.0}}})
    result = migration.run(scenario)
    mismatched = result["invariants"]["mismatched_pages"]
    assert mismatched and set(mismatched) <= set(result["migration"]["skipped_dirty_marks"])


def test_main_job_json_and_digest_are_the_same_in_two_processes(tmp_path):
    digests = []
    for hashseed in ("0", "4242"):
        out = tmp_path / f"{hashseed}.json"
        subprocess.run([sys.executable, "-m", "ifcvf", "sim", "run", str(ROOT / "scenarios/live-migration.toml"),
                        "--json", str(out), "--plot", str(tmp_path / "t.png")],
                       check=True, capture_output=True, env={"PYTHONHASHSEED": hashseed, "PATH": "/usr/bin:/bin"},
                       cwd=ROOT, timeout=300)
        result = json.loads(out.read_text())
        for key in REQUIRED:
            get(result, key)
        digests.append(result["trace_digest"])
    assert digests[0] == digests[1]
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
