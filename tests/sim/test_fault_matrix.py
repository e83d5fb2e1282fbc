"""The fault matrix (issue 13): every fault at every phase of a migration ends as
expected, with no page lost, no frame lost (except to a front-end that is gone),
and nothing leaked (fds, eventfds, threads, IOMMU mappings, logging)."""
from __future__ import annotations

import json

import pytest

from ifcvf.tools.cli import main
from ifcvf.tools.runs import faults

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return faults.matrix(tmp=tmp_path_factory.mktemp("faults"))


def test_every_fault_at_every_phase_is_a_row(rows):
    assert [(r.fault, r.phase) for r in rows] == [(f, p) for f in faults.FAULTS for p in faults.PHASES]


@pytest.mark.parametrize("fault", list(faults.FAULTS))
def test_each_row_as_expected_with_nothing_lost_or_leaked(rows, fault):
    for r in (r for r in rows if r.fault == fault):
        assert r.outcome == r.expected, r
        assert r.pages_lost == 0, r
        assert r.leaks == [], r
        assert r.frames_lost == 0 or r.frames_lost_allowed, r
        assert r.ok


def test_failures_and_faults_name_their_reason_in_the_log(rows):
    for r in rows:
        if r.outcome == "failed":
            assert "disconnected" in r.reason, r
    by = {(r.fault, r.phase): r for r in rows}
    assert "never reported disabled" in by["stop-never-acks", "stop-and-copy"].reason
    assert "covers less than the memory table" in by["small-log", "pre-copy"].reason
    assert "switching to software relay failed" in by["relay-map-fails", "before-logging"].reason
    for phase in faults.PHASES:
        assert "DEVICE_NEEDS_RESET" in by["dma-fault", phase].reason
        assert "surprise removal" in by["surprise-removal", phase].reason


def test_the_leak_check_sees_a_leak(tmp_path, monkeypatch):
    """Negative control: an eventfd the fault leaves open is reported."""
    import os

    kept = []

    def leaky(run, phase):
        kept.append(os.eventfd(0))
    monkeypatch.setitem(faults.FAULTS, "leaky", (leaky, {p: "completed" for p in faults.PHASES}))
    try:
        row = faults.run_one("leaky", "pre-copy", tmp=tmp_path)
    finally:
        for fd in kept:
            os.close(fd)
    assert not row.ok and any("eventfd" in leak for leak in row.leaks), row


def test_cli_writes_the_rows(tmp_path):
    out = tmp_path / "faults.json"
    assert main(["sim", "faults", "--fault", "small-log", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["phase"] for r in data["rows"]] == list(faults.PHASES)
    for r in data["rows"]:
        assert {"fault", "phase", "outcome", "expected", "pages_lost", "frames_lost", "leaks"} <= set(r)
    assert main(["sim", "faults", "--fault", "nosuch"]) == 2


def test_cli_prints_every_reason_whole_in_an_80_column_terminal(tmp_path, monkeypatch, capsys):
    """At 80 columns a table per fault, no cell cut to "…", and each phase's reason
    whole under it (the one-table layout cut reasons and collapsed columns)."""
    monkeypatch.setenv("COLUMNS", "80")
    out = tmp_path / "faults.json"
    assert main(["sim", "faults", "--fault", "small-log", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    flat = " ".join(text.split())
    for r in json.loads(out.read_text())["rows"]:
        assert r["reason"] and f"{r['phase']}: {' '.join(r['reason'].split())}" in flat


def test_a_removed_function_reads_all_ones_and_stops_its_dma():
    from ifcvf.tools.runs.stack import SimHost
    from sim.config import IfcvfConfig

    host = SimHost(seed=3)
    try:
        vf = host.add_vf(IfcvfConfig(queue_pairs=1))
        assert vf.model.config_read(0, 2) == 0x1AF4
        vf.model.surprise_remove()
        assert vf.model.config_read(0, 2) == 0xFFFF
        assert vf.model.mmio_read(0, 0, 4) == 0xFFFF_FFFF
        vf.model.mmio_write(0, 0x14, 1, 0)    # goes nowhere
        assert not any(q.running for q in vf.model.queues)
    finally:
        host.close()
