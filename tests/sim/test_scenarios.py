"""Every scenario in scenarios/ runs with its invariants asserted, plus the
negative control that proves the checker can fail."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from ifcvf.tools.runs import migration
from sim.scenario import load

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.toml"))
REQUIRED = ["invariants.memory_equal", "invariants.frames_lost", "invariants.frames_duplicated",
            "migration.mode", "migration.iterations", "migration.downtime_us", "migration.converged",
            "traffic.tx_frames", "traffic.rx_frames", "trace_digest", "invariants.live",
            "invariants.max_rx_gap_us", "invariants.rx_stalls"]
# Low-rate scenarios after issue 10: what each must show besides the invariants.
PING = ["migration-sw-ping-intx", "migration-hw-ping-intx"]


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
    assert result["invariants"]["live"], result["invariants"]["rx_stalls"]
    # drops of copies that reached a VF the guest was not on explain no missing frame
    assert result["traffic"]["rx_frames"] == result["traffic"]["rx_offered"] - (sum(
        result["traffic"]["rx_dropped_by_vf"].values()) - result["network"]["copies_dropped_elsewhere"])
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


def test_results_print_whole_in_an_80_column_terminal(tmp_path):
    """Every number of a run's tables is printed whole at 80 columns (as in a CI log
    or a small terminal): no cell cut to "…", no line wider than the terminal."""
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "ifcvf", "sim", "run",
                           str(ROOT / "scenarios/back-and-forth.toml"), "--json", str(out)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    result = json.loads(out.read_text())
    for it in result["migration"]["per_iteration"]:      # the pre-copy rows
        assert f"{it['duration_us'] / 1000:.3f}" in text and str(it["pages_copied"]) in text
    for b in result["network"]["blackout"]:               # a column per leg
        assert b["leg"] in text and f"{b['mac_moved_us']:,.1f} us" in text
        assert all(how in text for how in b["self_announce"])


@pytest.mark.parametrize("name", PING)
def test_a_pinged_guest_receives_throughout_the_precopy(name):
    """Issue 10: a Linux guest pinged a few hundred times a second over INTx stopped
    receiving for the whole pre-copy in sw mode.  Here every reply must arrive (no VF
    drop either), in every part of the run, the pre-copy must last several hundred ms,
    and no RX gap may exceed the bound the scenario states."""
    scenario = load(ROOT / f"scenarios/{name}.toml")
    assert scenario.section("driver")["interrupts"] == "intx"
    result = migration.run(scenario)
    assert result["ok"], result["problems"]
    t = result["traffic"]
    assert t["rx_replies"] == t["rx_offered"] == t["rx_frames"] > 200
    # the only VF drops are copies of the guest's own broadcasts (its gratuitous
    # ARPs) that the switch flooded to the VF it is not on
    assert sum(t["rx_dropped_by_vf"].values()) == result["network"]["copies_dropped_elsewhere"]
    assert result["migration"]["total_time_us"] > 300_000
    for part in ("before", "during", "after"):
        assert t[part]["rx_pps"] > 100, (part, t[part])
    assert t["interrupts"]["intx"] > 0 and t["interrupts"]["handled"][0] > 0
    assert result["invariants"]["live"] and result["invariants"]["max_rx_gap_us"] == 20_000


def test_on_off_traffic_scenario_exercises_refill_work_and_both_pairs():
    result = migration.run(load(ROOT / "scenarios/traffic-onoff-msix.toml"))
    assert result["ok"], result["problems"]
    t = result["traffic"]
    assert all(n > 100 for n in t["rx_offered_per_pair"])
    assert t["interrupts"]["refill_work"] > 0
    assert result["invariants"]["max_rx_gap_us"] == 3200.0   # 4 mean gaps at one RX queue


def test_liveness_negative_control_a_relay_that_only_waits_for_interrupts(monkeypatch):
    """The liveness checker must fail, naming the queue, the window and the ring
    indexes, when the software relay waits for the VF's interrupts only (its adaptive
    polls off): the VF completes replies past the guest's used_event silently."""
    from ifcvf import vdpa

    monkeypatch.setattr(vdpa, "RELAY_POLL_MIN_NS", 0)
    result = migration.run(load(ROOT / "scenarios/migration-sw-ping-intx.toml"))
    assert not result["ok"] and not result["invariants"]["live"]
    stall = result["invariants"]["rx_stalls"][0]
    assert stall["queue"] == 0 and stall["gap_us"] > 100_000
    ix = stall["indexes"]
    for key in ("avail_idx", "used_idx", "used_event", "avail_event", "vf_last_avail", "vf_last_used"):
        assert isinstance(ix[key], int), key
    # the guest shows fewer used entries than the VF completed, and its used_event is
    # behind the VF's index: no interrupt can come
    assert (ix["vf_last_used"] - ix["used_idx"]) & 0xFFFF > 0
    assert ix["used_event"] == ix["used_idx"]
    assert any(p.startswith("RX stall on queue 0") for p in result["problems"])


def test_liveness_negative_control_a_guest_that_loses_its_interrupts():
    """Independent of any relay: a hw-mode guest whose RX interrupts stop arriving
    (its call fd unwatched) must be reported as stalled."""
    scenario = load(ROOT / "scenarios/migration-hw-ping-intx.toml")
    sections = {k: dict(v) for k, v in scenario.sections.items()}
    sections["driver"]["interrupts"] = "msix"
    scenario = scenario.__class__(**{**scenario.__dict__, "sections": sections})
    run = migration.MigrationRun(scenario)
    guest = run.vm.guest
    world = run.host.world

    def deafen():
        yield world.timeout(world.cycles(20_000_000))
        guest._unwatch(guest.queues[0])
    world.process(deafen())
    result = run.run()
    assert not result["invariants"]["live"]
    stall = result["invariants"]["rx_stalls"][0]
    assert stall["queue"] == 0 and 20_000 <= stall["from_us"] < 40_000


@pytest.mark.parametrize("body,words", [
    ('[traffic]\nrx_gbps = 1\nrx_pps = 100\n', ["[traffic] rx_gbps = 1.0 and rx_pps = 100.0", "one of them"]),
    ('[traffic]\ntx_gbps = 1\ntx_pps = 100\n', ["tx_gbps", "tx_pps"]),
    ('[traffic]\noff_us = 100\n', ["[traffic] off_us = 100.0", "on_us > 0"]),
    ('[traffic]\nreply = true\n', ["[traffic] reply = true", "tx_pps or tx_gbps"]),
    ('[traffic]\npattern = "bursty"\n', ["[traffic] pattern = 'bursty'", "constant, poisson"]),
    ('[traffic]\nburst = 0\n', ["[traffic] burst = 0", "1..512"]),
    ('[traffic]\nrx_pps = -1\n', ["[traffic] rx_pps = -1.0", "0.0..10000000.0"]),
    ('[driver]\ninterrupts = "msi"\n', ["[driver] interrupts = 'msi'", "msix, intx"]),
    ('[driver]\nrx_alloc_fail = 2\n', ["[driver] rx_alloc_fail = 2.0", "0.0..1.0"]),
    ('[driver]\nguest_cost_scale = 0\n', ["[driver] guest_cost_scale = 0.0"]),
    ('[expect]\nmax_rx_gap_us = "1 ms"\n', ["[expect] max_rx_gap_us = '1 ms'", "expected float"]),
])
def test_new_keys_get_clear_errors(tmp_path, body, words):
    from sim.scenario import ScenarioError

    path = tmp_path / "bad.toml"
    path.write_text('kind = "traffic"\n' + body)
    with pytest.raises(ScenarioError) as err:
        load(path)
    for word in words:
        assert word in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios/scale").glob("*.toml")), ids=lambda p: p.stem)
def test_scale_scenarios_load(path):
    """The scale yardsticks (scenarios/scale/: tens of seconds each, run by hand for
    the numbers in the README) stay valid scenarios."""
    scenario = load(path)
    assert scenario.kind == "migration"
    assert scenario.section("driver")["guest_memory_mib"] >= 1024
