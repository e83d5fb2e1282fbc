"""`ifcvf fuzz`: every target runs clean for a short budget, the engine finds
failures, hangs and native crashes (negative controls), and the findings the
fuzzers made stay fixed (regression tests)."""
from __future__ import annotations

import json

import pytest

from ifcvf.tools.cli import main
from ifcvf.tools.fuzz import TARGETS, Target, engine

pytestmark = pytest.mark.slow
CONTROL = Target("control", "fuzz_controls", "negative control", ("fuzz_controls",))
CONTROL_ASAN = Target("control-asan", "fuzz_controls", "negative control, sanitized",
                      ("fuzz_controls",), sanitized=True)


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_target_runs_clean_for_a_short_budget(name):
    result = engine.run(name, 3)
    details = "\n".join(f"{f.signature}: {f.message}\n{f.detail}" for f in result.failures)
    assert result.cases > 0, f"{name} ran no case"
    assert (result.crashes, result.hangs, result.unique_failures) == (0, 0, 0), details


def test_engine_counts_failing_cases_and_tells_failures_apart(monkeypatch):
    monkeypatch.setenv("IFCVF_FUZZ_CONTROL", "fail")
    result = engine.run(CONTROL, 3)
    assert result.crashes > 0 and result.hangs == 0
    assert sorted(f.signature.split(" at ")[0] for f in result.failures) == ["AssertionError", "KeyError"]
    assert sum(f.count for f in result.failures) == result.crashes
    assert all(f.input_hex for f in result.failures)


def test_engine_counts_a_hang_and_ends_only_that_child(monkeypatch):
    monkeypatch.setenv("IFCVF_FUZZ_CONTROL", "hang")
    result = engine.run(CONTROL, 3, hang_timeout=1)
    assert 1 <= result.hangs <= result.children
    assert result.failures[0].kind == "hang" and "timeout" in result.failures[0].signature


def test_engine_survives_a_native_crash(monkeypatch):
    monkeypatch.setenv("IFCVF_FUZZ_CONTROL", "crash")
    result = engine.run(CONTROL, 2)
    assert result.crashes >= 1 and result.crashes <= result.children
    assert {f.signature for f in result.failures} == {"crash: ERROR: libFuzzer: deadly signal"}


def test_a_sanitizer_report_is_a_crash_of_a_sanitized_target(monkeypatch):
    """The relay-asan target's machinery (the sanitized build, the runtimes
    preloaded into the child, abort on a report) turns an out-of-bounds write
    by the C code, one the plain build lets pass, into a counted crash."""
    monkeypatch.setenv("IFCVF_FUZZ_CONTROL", "oob")
    result = engine.run(CONTROL_ASAN, 3)
    assert result.crashes >= 1 and result.hangs == 0
    (failure,) = result.failures           # one bug, one failure, however often it is hit
    assert failure.kind == "crash"
    assert failure.signature == "crash: ERROR: AddressSanitizer: heap-buffer-overflow", failure.signature
    assert "ifc_log_mark" in failure.detail, failure.detail
    assert failure.input_hex                # the input libFuzzer kept


def test_a_sanitized_target_without_a_sanitizer_runtime_is_a_clear_error(monkeypatch, capsys):
    from ifcvf.tools.fuzz import sanitized

    def missing(name):
        raise sanitized.SanitizerUnavailable(f"{name} not found (test)")

    monkeypatch.setattr(sanitized, "runtime", missing)
    assert main(["fuzz", "relay-asan", "--budget", "1"]) == 2
    assert "relay-asan: libasan.so not found (test)" in capsys.readouterr().out


def test_cli_lists_targets_and_writes_json(tmp_path, capsys):
    assert main(["fuzz", "--list"]) == 0
    out = capsys.readouterr().out
    for name in TARGETS:
        assert name in out
    report = tmp_path / "fuzz.json"
    assert main(["fuzz", "scenario", "--budget", "2", "--json", str(report)]) == 0
    (row,) = json.loads(report.read_text())["targets"]
    assert {"name", "cases", "seconds", "crashes", "hangs", "unique_failures"} <= set(row)
    assert row["name"] == "scenario" and row["cases"] > 0 and row["crashes"] == 0
    assert main(["fuzz", "nosuch", "--budget", "1"]) == 2


# --- findings -------------------------------------------------------------------------

def test_finding_scenario_file_not_utf8_is_a_scenario_error(tmp_path):
    """Fuzzer finding (scenario): a file with a byte that is not UTF-8 raised
    UnicodeDecodeError out of sim.scenario.load instead of a ScenarioError."""
    from sim.scenario import ScenarioError, load

    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'kind = "bringup"\n\xc5\x01\n')
    with pytest.raises(ScenarioError, match=r"bad.toml: not UTF-8 text \(byte 17"):
        load(bad)
    with pytest.raises(ScenarioError, match="cannot read"):
        load(tmp_path)   # a directory
