"""`ifcvf sim sweep`: sweep files validated like scenarios, points run in this
process, in a local pool or on Dask, a failed point reported without stopping
the sweep, and a point's digest the same wherever it ran."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from ifcvf.tools.runs import sweep as sw
from sim.scenario import ScenarioError

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE = ROOT / "scenarios" / "blackout-announce.toml"


def write(tmp_path, text: str, name="s.toml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def small(tmp_path, grid='"traffic.rx_pps" = [20000.0, 80000.0]', seeds="[1, 2]"):
    return write(tmp_path, f'base = "{BASE}"\nseeds = {seeds}\n[grid]\n{grid}\n'
                           '"traffic.pattern" = ["poisson"]\n"traffic.duration_us" = [1000.0]\n'
                           '"traffic.warmup_us" = [500.0]\n')


def test_points_are_the_grid_times_the_seeds_with_base_relative_to_the_sweep(tmp_path):
    (tmp_path / "sub").mkdir()
    base = tmp_path / "sub" / "base.toml"
    base.write_text(BASE.read_text())
    path = write(tmp_path, 'base = "sub/base.toml"\nseeds = [3, 4, 5]\n[grid]\n'
                           '"traffic.rx_pps" = [1000.0, 2000.0]\n"driver.guest_announce" = [true, false]\n'
                           '"device.max_queue_size" = [512]\n')
    sweep = sw.load_sweep(path)
    assert sweep.base == base.resolve() and len(sweep.points) == 12
    assert sweep.points[0].params == {"traffic.rx_pps": 1000.0, "driver.guest_announce": True,
                                      "device.max_queue_size": 512}
    assert [p.seed for p in sweep.points[:3]] == [3, 4, 5]


@pytest.mark.parametrize("text, message", [
    ('base = "B"\n[grid]\n"traffic.rx_ppz" = [1.0]\n', r"\[grid\] 'traffic.rx_ppz': \[traffic\] unknown key 'rx_ppz'"),
    ('base = "B"\n[grid]\n"trafic.rx_pps" = [1.0]\n', r"unknown section \[trafic\]"),
    ('base = "B"\n[grid]\n"traffic.rx_pps" = [1.0, -5.0]\n', r"\[grid\] 'traffic.rx_pps' = -5.0: .*allowed is 0.0..10000000.0"),
    ('base = "B"\n[grid]\n"driver.interrupts" = ["msi"]\n', r"allowed values are msix, intx"),
    ('base = "B"\n[grid]\n"device.queue_pears" = [2]\n', r"\[device\] has no key 'queue_pears'"),
    ('base = "B"\n[grid]\n"traffic.rx_pps" = 5.0\n', r"expected a non-empty list"),
    ('base = "B"\nseeds = [1, "x"]\n', r"seeds = \[1, 'x'\]"),
    ('base = "B"\nsead = [1]\n', r"unknown key 'sead'; known keys: name, description, base, seeds, grid"),
    ('base = "nowhere.toml"\n', r"no such scenario file"),
    ('seeds = [1]\n', r"base = None: expected the path of a scenario file"),
])
def test_bad_sweep_files_get_clear_errors(tmp_path, text, message):
    path = write(tmp_path, text.replace('"B"', f'"{BASE}"'))
    with pytest.raises(ScenarioError, match=message) as err:
        sw.load_sweep(path)
    assert str(path) in str(err.value)


def test_a_failed_point_is_reported_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from ifcvf.tools.runs import migration
    real = migration.run

    def sometimes(scenario, progress=None):
        if scenario.section("traffic")["rx_pps"] > 50000:
            raise RuntimeError("boom")
        return real(scenario, progress)
    monkeypatch.setattr(migration, "run", sometimes)
    sweep = sw.load_sweep(small(tmp_path, seeds="[1]"))
    seen = []
    entries = sw.run_sweep(sweep, workers=0, on_done=seen.append)
    assert [e["ok"] for e in entries] == [True, False] and len(seen) == 2
    assert entries[1]["error"] == "RuntimeError: boom" and entries[1]["trace_digest"] is None
    assert entries[0]["trace_digest"] and entries[0]["frames_to_old_port"] is not None


def _digests(entries):
    return {(json.dumps(e["params"], sort_keys=True), e["seed"]): e["trace_digest"] for e in entries}


def test_a_points_digest_does_not_depend_on_where_it_ran(tmp_path):
    """In this process, in a local process pool, and on a Dask LocalCluster."""
    sweep = sw.load_sweep(small(tmp_path))
    here = sw.run_sweep(sweep, workers=0)
    assert all(e["ok"] for e in here), here
    assert len(set(_digests(here).values())) == 4         # seeds and rates change the run
    pool = sw.run_sweep(sweep, workers=2)
    assert _digests(pool) == _digests(here)

    distributed = pytest.importorskip("distributed")

    def on_dask():
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster:
            with distributed.Client(cluster) as client:
                return sw.run_sweep(sweep, scheduler=client)
    with ThreadPoolExecutor(1) as ex:
        dask = ex.submit(on_dask).result(timeout=180)
    assert _digests(dask) == _digests(here)


def test_cli_sweep_writes_json_csv_and_a_plot(tmp_path):
    path = small(tmp_path, seeds="[1]")
    out, csv, png = tmp_path / "p.json", tmp_path / "p.csv", tmp_path / "p.png"
    proc = subprocess.run([sys.executable, "-m", "ifcvf", "sim", "sweep", str(path), "--workers", "2",
                           "--json", str(out), "--csv", str(csv), "--plot", str(png),
                           "--x", "traffic.rx_pps", "--y", "frames_to_old_port"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    points = json.loads(out.read_text())["points"]
    assert [p["params"]["traffic.rx_pps"] for p in points] == [20000.0, 80000.0]
    for p in points:
        assert p["seed"] == 1 and p["ok"] is True and len(p["trace_digest"]) == 64
        assert {"downtime_us", "frames_to_old_port", "mac_moved_us"} <= set(p)
    header = csv.read_text().splitlines()[0].split(",")
    assert header[:3] == ["traffic.rx_pps", "traffic.pattern", "traffic.duration_us"]
    assert png.stat().st_size > 1000
    # the table in an 80-column terminal: the varying key and the headline
    # metrics whole (no "…"), the single-valued keys under the table
    narrow = subprocess.run([sys.executable, "-m", "ifcvf", "sim", "sweep", str(path), "--workers", "0"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COLUMNS": "80"})
    assert narrow.returncode == 0, narrow.stdout + narrow.stderr
    lines = narrow.stdout.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in narrow.stdout
    assert any(line.split()[:1] == ["80000"] for line in lines)
    assert "traffic.pattern = poisson" in narrow.stdout and "wider terminal" in narrow.stdout
    bad = write(tmp_path, f'base = "{BASE}"\n[grid]\n"traffic.nope" = [1]\n', "bad.toml")
    proc = subprocess.run([sys.executable, "-m", "ifcvf", "sim", "sweep", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown key 'nope'" in proc.stderr


def test_values_valid_alone_but_not_together_name_the_point(tmp_path):
    path = write(tmp_path, f'base = "{BASE}"\n[grid]\n"traffic.tx_gbps" = [0.0, 1.0]\n'
                           '"traffic.tx_pps" = [0.0, 1000.0]\n')
    with pytest.raises(ScenarioError, match=r"\[grid\] point \{'traffic.tx_gbps': 1.0, "
                                            r"'traffic.tx_pps': 1000.0\}: .*give one of them"):
        sw.load_sweep(path)
