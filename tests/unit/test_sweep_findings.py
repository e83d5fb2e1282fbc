"""What `ifcvf fuzz sweep` found in the sweep-file parser, kept fixed.

Each case raised something other than a ScenarioError out of load_sweep, or
hung, before its fix: the file and the message name what is wrong instead.
"""
from __future__ import annotations

import os
import threading

import pytest

from ifcvf.tools.runs import sweep as sweeps
from ifcvf.tools.runs.sweep import load_sweep
from sim.scenario import MAX_TOML_BYTES, ScenarioError, load

BASE = 'kind = "bringup"\nseed = 3\n'


@pytest.fixture
def files(tmp_path):
    (tmp_path / "base.toml").write_text(BASE)
    return tmp_path


def sweep_file(dirpath, text: str):
    path = dirpath / "sweep.toml"
    path.write_text(text)
    return path


def refused(path, match: str, timeout: float = 20.0) -> str:
    """load_sweep raises a ScenarioError matching ``match``, within ``timeout`` (a thread, so a
    regression that blocks fails here instead of hanging the suite)."""
    out: dict = {}

    def run():
        try:
            load_sweep(path)
        except BaseException as err:          # noqa: B036 -- reported below, whatever it is
            out["err"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"load_sweep({path}) still running after {timeout} s"
    err = out.get("err")
    assert isinstance(err, ScenarioError), repr(err)
    assert str(err).startswith(str(path)) and match in str(err), str(err)
    return str(err)


def test_values_nested_deeper_than_the_parsers_stack(files):
    """RecursionError from tomllib (sim.scenario.read_toml), for sweeps and scenarios alike."""
    deep = "x = " + "[" * 3000 + "]" * 3000 + "\n"
    refused(sweep_file(files, 'base = "base.toml"\n[grid]\n' + deep), "nested too deeply")
    (files / "deep.toml").write_text(deep)
    with pytest.raises(ScenarioError, match="nested too deeply"):
        load(files / "deep.toml")


def test_a_grid_beyond_max_points_is_refused_before_it_is_expanded(files):
    """A hang: 40^6 points were each built and validated before anything said no."""
    grid = "\n".join(f'"{k}" = [{", ".join(["1"] * 40)}]' for k in
                     ("driver.queue_pairs", "traffic.burst", "traffic.flows_per_pair",
                      "migration.max_iterations", "network.announce_rounds", "driver.napi_budget"))
    msg = refused(sweep_file(files, f'base = "base.toml"\n[grid]\n{grid}\n'), "a sweep may hold", 5)
    assert f"{40 ** 6} points (40 x 40 x 40 x 40 x 40 x 40, times 1 seed(s))" in msg


def test_seeds_alone_count_toward_max_points(files):
    """Found: 18889 seeds and no grid passed, the bound only looked at grid keys."""
    seeds = ", ".join(str(i) for i in range(sweeps.MAX_POINTS + 1))
    refused(sweep_file(files, f'base = "base.toml"\nseeds = [{seeds}]\n'),
            f"{sweeps.MAX_POINTS + 1} points (no grid, times {sweeps.MAX_POINTS + 1} seed(s))")


def test_max_points_is_the_boundary(files, monkeypatch):
    monkeypatch.setattr(sweeps, "MAX_POINTS", 4)
    grid = '[grid]\n"traffic.burst" = [1, 2]\n"driver.queue_pairs" = [1, 2]\n'
    assert len(load_sweep(sweep_file(files, f'base = "base.toml"\n{grid}')).points) == 4
    refused(sweep_file(files, f'base = "base.toml"\nseeds = [1, 2]\n{grid}'), "more than the 4")


@pytest.mark.parametrize("base, match", [
    ("/dev/zero", "not a regular file"),           # read until memory ran out
    ("fifo.toml", "not a regular file"),           # open() waited for a writer forever
    (".", "not a regular file"),                   # a directory: IsADirectoryError
    ("base.toml\x00x", "not a usable path"),       # ValueError: embedded null byte
    ("loop.toml", "loop.toml"),                    # a symlink loop
    ("big.toml", f"larger than {MAX_TOML_BYTES} bytes"),
])
def test_path_tricks_in_base(files, base, match):
    os.mkfifo(files / "fifo.toml")
    os.symlink("loop.toml", files / "loop.toml")
    with open(files / "big.toml", "wb") as f:
        f.truncate(MAX_TOML_BYTES + 1)
    escaped = base.replace("\x00", "\\u0000")
    msg = refused(sweep_file(files, f'base = "{escaped}"\n'), match)
    assert "base = " in msg
