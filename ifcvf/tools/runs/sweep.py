"""Sweeps: many scenario points (seeds times a grid of parameters), run anywhere.

A sweep file (TOML)::

    name = "blackout-vs-rate"                 # optional
    description = "..."                       # optional
    base = "blackout-announce.toml"           # a scenario, relative to the sweep file
    seeds = [1, 2, 3]                         # optional: the base scenario's seed
    [grid]
    "traffic.rx_pps" = [20000.0, 100000.0]    # dotted scenario keys -> value lists
    "driver.guest_announce" = [true, false]
    "device.max_queue_size" = [256, 1024]     # [device] keys too

Every point (the grid's product, times the seeds) is the base scenario with
its values set, validated as a scenario file is: a bad key or value is an
error naming the sweep file, the key, the value and what is allowed, before
anything runs.

A point runs in a fresh world from its own seed, so its trace digest does not
depend on where it ran: in this process (``workers=0``), in a local process
pool (the default), or on a Dask distributed cluster (``scheduler``: the
address of an existing scheduler; ``distributed.Client`` does the rest).  A
point that fails (an exception, a worker that died) is reported with its
error; the others go on.
"""
from __future__ import annotations

import copy
import itertools
import math
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sim.scenario import SCHEMA, ScenarioError, from_dict, read_toml

TOP = ("name", "description", "base", "seeds", "grid")
# The most points (grid combinations times seeds) a sweep may hold.  Each is
# validated before anything runs, so the bound is checked before the grid is
# expanded: a few lines of TOML can describe more points than memory holds.
MAX_POINTS = 10_000


@dataclass(frozen=True)
class Point:
    index: int
    params: dict
    seed: int


@dataclass
class Sweep:
    path: Path
    name: str
    description: str
    base: Path
    base_raw: dict
    seeds: list[int]
    grid: dict[str, list]
    points: list[Point] = field(default_factory=list)


def _where(path: Path, key: str) -> str:
    return f"{path}: [grid] {key!r}"


def _set(raw: dict, dotted: str, value) -> None:
    section, _, key = dotted.rpartition(".")
    table = raw.setdefault(section, {}) if section else raw
    table[key] = value


def _check_key(path: Path, dotted: str) -> None:
    section, _, key = dotted.rpartition(".")
    if "." in section:
        raise ScenarioError(f"{_where(path, dotted)}: a key is 'section.key' or a top-level key")
    if section == "device":
        import dataclasses
        from sim.config import IfcvfConfig
        names = {f.name for f in dataclasses.fields(IfcvfConfig)} | {"layout"}
        if key not in names:
            raise ScenarioError(f"{_where(path, dotted)}: [device] has no key {key!r}; known keys: "
                                f"{', '.join(sorted(names))}")
        return
    if section not in SCHEMA or not section and key in ("seed", "name", "description"):
        if not section:
            raise ScenarioError(f"{_where(path, dotted)}: the seed goes in `seeds`; top-level keys "
                                "in a grid: kind")
        known = ", ".join(["device"] + [s for s in SCHEMA if s])
        raise ScenarioError(f"{_where(path, dotted)}: unknown section [{section}]; known sections: {known}")
    known = [k.name for k in SCHEMA[section]]
    if key not in known:
        where = f"[{section}] " if section else ""
        raise ScenarioError(f"{_where(path, dotted)}: {where}unknown key {key!r}; known keys: "
                            f"{', '.join(known)}")


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file and every point of it."""
    path = Path(path)
    raw = read_toml(path, "sweep")
    for key in raw:
        if key not in TOP:
            raise ScenarioError(f"{path}: unknown key {key!r}; known keys: {', '.join(TOP)}")
    if not isinstance(raw.get("base"), str):
        raise ScenarioError(f"{path}: base = {raw.get('base')!r}: expected the path of a scenario "
                            "file (relative to the sweep file)")
    try:
        base = (path.parent / raw["base"]).resolve()
    except (OSError, RuntimeError, ValueError) as err:   # a symlink loop, an embedded NUL
        raise ScenarioError(f"{path}: base = {raw['base']!r}: not a usable path: {err}") from None
    try:
        base_raw = read_toml(base, "scenario")
        base_scenario = from_dict(base, base_raw)      # the base alone is valid
    except ScenarioError as err:
        raise ScenarioError(f"{path}: base = {raw['base']!r}: {err}") from None
    seeds = raw.get("seeds", [base_scenario.seed])
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in seeds)):
        raise ScenarioError(f"{path}: seeds = {seeds!r}: expected a non-empty list of integers "
                            f"in 0..{2**63 - 1}")
    grid = raw.get("grid", {})
    if not isinstance(grid, dict):
        raise ScenarioError(f"{path}: grid = {grid!r}: expected a table of dotted keys to lists")
    for key, values in grid.items():
        _check_key(path, key)
        if not isinstance(values, list) or not values:
            raise ScenarioError(f"{_where(path, key)} = {values!r}: expected a non-empty list of values")
    for key in ("name", "description"):
        if key in raw and not isinstance(raw[key], str):
            raise ScenarioError(f"{path}: {key} = {raw[key]!r}: expected str")
    # Before any expansion: a few lines of grid can mean an astronomical product.
    count = len(seeds) * math.prod(len(v) for v in grid.values())
    if count > MAX_POINTS:
        sizes = " x ".join(str(len(v)) for v in grid.values()) or "no grid"
        raise ScenarioError(f"{path}: {count} points ({sizes}, times {len(seeds)} seed(s)) are more "
                            f"than the {MAX_POINTS} a sweep may hold")
    sweep = Sweep(path, raw.get("name", path.stem), raw.get("description", ""), base, base_raw,
                  list(seeds), dict(grid))
    keys = list(grid)
    for key, values in grid.items():      # each value alone first: the error names it exactly
        for value in values:
            try:
                from_dict(base, point_raw(sweep, {key: value}))
            except ScenarioError as err:
                detail = str(err).split(": ", 1)[-1]
                raise ScenarioError(f"{_where(path, key)} = {value!r}: {detail}") from None
    index = 0
    for combo in itertools.product(*(grid[k] for k in keys)):
        params = dict(zip(keys, combo))
        scenario_raw = point_raw(sweep, params)
        try:
            from_dict(base, scenario_raw)
        except ScenarioError as err:      # values valid alone, not together
            detail = str(err).split(": ", 1)[-1]
            raise ScenarioError(f"{path}: [grid] point {params}: {detail}") from None
        for seed in sweep.seeds:
            sweep.points.append(Point(index, params, seed))
            index += 1
    return sweep


def point_raw(sweep: Sweep, params: dict) -> dict:
    raw = copy.deepcopy(sweep.base_raw)
    for key, value in params.items():
        _set(raw, key, value)
    return raw


# --- one point ----------------------------------------------------------------------------
def _headline(result: dict) -> dict:
    """The few numbers a sweep table shows of one run."""
    out: dict[str, Any] = {}
    mig = result.get("migration") or {}
    for key in ("converged", "iterations", "downtime_us", "total_time_us", "stop_copy_pages"):
        if key in mig:
            out[key] = mig[key]
    t = result.get("traffic", {})
    out["rx_frames"] = t.get("rx_frames")
    out["tx_frames"] = t.get("tx_frames")
    out["rx_gbps_after"] = (t.get("after") or {}).get("rx_gbps")
    out["frames_lost"] = result.get("invariants", {}).get("frames_lost")
    blackout = (result.get("network") or {}).get("blackout") or []
    if blackout:
        b = blackout[0]
        out["frames_to_old_port"] = b["frames_to_old_port"]
        out["mac_moved_us"] = b["mac_moved_us"]
        out["first_frame_at_destination_us"] = b["first_frame_at_destination_us"]
    out["simulated_us"] = result.get("simulated_us")
    return out


def run_point(base: str, raw: dict, params: dict, seed: int, index: int) -> dict:
    """Run one point (in whatever process this is); never raises."""
    wall0 = time.perf_counter()
    entry = {"index": index, "params": params, "seed": seed}
    try:
        from ifcvf.tools.runs import migration

        scenario = from_dict(Path(base), raw).with_seed(seed)
        if scenario.kind == "bringup":
            from ifcvf.tools.runs import bringup
            result = bringup.run(scenario).to_json()
        else:
            result = migration.run(scenario)
        entry.update(ok=bool(result.get("ok", True)), trace_digest=result.get("trace_digest"))
        entry.update(_headline(result))
        if result.get("problems"):
            entry["problems"] = result["problems"][:5]
    except Exception as err:  # a failed point is reported, the sweep goes on
        entry.update(ok=False, trace_digest=None,
                     error=f"{type(err).__name__}: {err}",
                     traceback=traceback.format_exc(limit=8))
    entry["wall_s"] = round(time.perf_counter() - wall0, 3)
    return entry


def _args(sweep: Sweep, point: Point) -> tuple:
    return (str(sweep.base), point_raw(sweep, point.params), point.params, point.seed, point.index)


# --- where the points run -----------------------------------------------------------------
def run_sweep(sweep: Sweep, *, workers: int | None = None, scheduler: str | None = None,
              on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Every point's entry, in point order.  ``workers=0``: in this process;
    ``scheduler``: on that Dask cluster; else a local pool of ``workers``."""
    on_done = on_done or (lambda entry: None)
    results: dict[int, dict] = {}

    def done(entry):
        results[entry["index"]] = entry
        on_done(entry)

    if scheduler:
        _run_dask(sweep, scheduler, done)
    elif workers == 0:
        for point in sweep.points:
            done(run_point(*_args(sweep, point)))
    else:
        import multiprocessing
        import os
        n = workers or min(len(sweep.points), os.cpu_count() or 1)
        with ProcessPoolExecutor(max_workers=max(1, n),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_point, *_args(sweep, p)): p for p in sweep.points}
            for fut in as_completed(futures):
                done(_collect(fut, futures[fut]))
    return [results[p.index] for p in sweep.points]


def _collect(fut, point: Point) -> dict:
    try:
        return fut.result()
    except Exception as err:   # the worker died, or the result could not come back
        return {"index": point.index, "params": point.params, "seed": point.seed, "ok": False,
                "trace_digest": None, "error": f"{type(err).__name__}: {err}"}


def _run_dask(sweep: Sweep, address, done) -> None:
    from distributed import Client, as_completed as dask_completed

    client = address if not isinstance(address, str) else Client(address)
    try:
        futures = {}
        for p in sweep.points:
            fut = client.submit(run_point, *_args(sweep, p), pure=False,
                                key=f"ifcvf-sweep-{sweep.name}-{p.index}-{time.time_ns()}")
            futures[fut.key] = (fut, p)
        for fut in dask_completed([f for f, _ in futures.values()]):
            done(_collect(fut, futures[fut.key][1]))
    finally:
        if isinstance(address, str):
            client.close()


# --- output ------------------------------------------------------------------------------------
def columns(entries: list[dict], params: list[str]) -> list[str]:
    metrics: list[str] = []
    for e in entries:
        for k in e:
            if k not in ("index", "params", "seed", "ok", "trace_digest", "problems", "error",
                         "traceback") and k not in metrics:
                metrics.append(k)
    return params + ["seed", "ok"] + metrics + ["trace_digest", "error"]


def row(entry: dict, cols: list[str], params: list[str]) -> list:
    out = []
    for c in cols:
        if c in params:
            out.append(entry["params"].get(c))
        elif c == "error":
            out.append(entry.get("error") or "; ".join(entry.get("problems", [])))
        else:
            out.append(entry.get(c))
    return out


def write_csv(entries: list[dict], params: list[str], path: Path) -> None:
    import csv
    cols = columns(entries, params)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for e in entries:
            w.writerow(["" if v is None else v for v in row(e, cols, params)])


def plot(entries: list[dict], params: list[str], x: str, y: str, path: Path) -> None:
    """``y`` against ``x``: the median over seeds, one line per combination of the other parameters."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [p for p in params if p != x]
    lines: dict[tuple, dict] = {}
    for e in entries:
        value = e.get(y)
        if not e.get("ok") or value is None or e["params"].get(x) is None:
            continue
        label = tuple((k, e["params"][k]) for k in others)
        lines.setdefault(label, {}).setdefault(e["params"][x], []).append(float(value))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(lines.items(), key=lambda kv: str(kv[0])):
        xs = sorted(points, key=lambda v: (isinstance(v, str), v))
        ys = [_median(points[v]) for v in xs]
        ax.plot([str(v) if isinstance(v, (bool, str)) else v for v in xs], ys, marker="o",
                label=", ".join(f"{k}={v}" for k, v in label) or y)
    ax.set_xlabel(x)
    ax.set_ylabel(y + " (median over seeds)")
    if len(lines) > 1 or others:
        ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def to_json(sweep: Sweep, entries: list[dict]) -> dict:
    return {"sweep": sweep.name, "base": str(sweep.base), "seeds": sweep.seeds,
            "grid": sweep.grid,
            "points": [{k: v for k, v in e.items() if k not in ("index", "traceback")}
                       for e in entries]}


__all__ = ["Sweep", "Point", "load_sweep", "run_sweep", "run_point", "to_json", "write_csv",
           "plot", "columns", "row"]
