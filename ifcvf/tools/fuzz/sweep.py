"""Fuzz target ``sweep``: sweep files (ifcvf.tools.runs.sweep.load_sweep).

A case is a sweep file built from its format: the top-level keys (known and
unknown, of the right and the wrong type), ``base`` with path tricks (up and
out of the directory, absolute, empty, the directory itself, the sweep file
itself, a missing file, a symlink loop, a FIFO, /dev/zero, an embedded NUL,
a base that is not UTF-8 or not valid), ``seeds`` of every type and size, a
``[grid]`` of dotted keys (scenario and [device] keys, unknown ones, too
many dots, top-level ones) to value lists, with grids whose product is far
beyond what a sweep may hold, values nested deeper than the parser's stack,
and sometimes raw bytes spliced into the text.  Property: ``load_sweep``
returns a sweep of at most MAX_POINTS valid points or raises
``ScenarioError`` naming the file; nothing else, and fast (the engine's
hang timeout catches a grid expanded before it is bounded).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

from hypothesis import HealthCheck, given, settings, strategies as st

from ifcvf.tools.fuzz.scenario import scalars, toml_value
from ifcvf.tools.runs.sweep import MAX_POINTS, TOP, load_sweep, point_raw
from sim.config import IfcvfConfig
from sim.scenario import SCHEMA, ScenarioError, from_dict

_DIR = tempfile.mkdtemp(prefix="ifcvf-fuzz-sweep-")
SWEEP = os.path.join(_DIR, "sweeps", "case.toml")


def _prepare() -> None:
    """The files a case's ``base`` may name (once per process)."""
    os.makedirs(os.path.join(_DIR, "sweeps", "dir.toml"), exist_ok=True)
    files = {
        "base.toml": b'kind = "bringup"\nseed = 3\n[driver]\nqueue_size = 256\n',
        "bad.toml": b'kind = "nosuch"\n',
        "latin1.toml": b'name = "caf\xe9"\n',
        "deep.toml": b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n",
    }
    for name, data in files.items():
        with open(os.path.join(_DIR, name), "wb") as f:
            f.write(data)
    for link, target in (("sweeps/loop.toml", "loop.toml"), ("sweeps/zero.toml", "/dev/zero")):
        path = os.path.join(_DIR, link)
        if not os.path.lexists(path):
            os.symlink(target, path)
    fifo = os.path.join(_DIR, "sweeps", "fifo.toml")
    if not os.path.exists(fifo):
        os.mkfifo(fifo)


_prepare()

BASES = ["../base.toml", "./../base.toml", "../sweeps/../base.toml", os.path.join(_DIR, "base.toml"),
         "../bad.toml", "../latin1.toml", "../deep.toml", "", ".", "..", "/", "dir.toml", "case.toml",
         "missing.toml", "loop.toml", "zero.toml", "/dev/zero", "/dev/null", "fifo.toml",
         "../base.toml\x00.toml", "../" * 64 + "etc/passwd", "x" * 300, "/proc/self/fd/0"]
DEVICE_FIELDS = sorted(f.name for f in dataclasses.fields(IfcvfConfig))
GRID_KEYS = ([f"{s}.{k.name}" for s, keys in SCHEMA.items() if s for k in keys]
             + [f"device.{n}" for n in DEVICE_FIELDS]
             + ["kind", "seed", "name", "device", "a.b.c", ".x", "x.", "", "bogus.key", "traffic..rx_pps"])
# Values each grid key accepts, so that grids get past per-value checks and big.
GOOD = {"traffic.rx_pps": [1000.0, 2000.0, 3000.0], "driver.queue_size": [256, 512, 1024],
        "driver.guest_announce": [True, False], "traffic.duration_us": [1000.0, 2000.0],
        "migration.max_iterations": [1, 2, 3, 4, 5], "network.announce_rounds": [1, 2, 3]}


def _no_surrogates(v) -> bool:
    """A string TOML can carry (json.dumps escapes a lone surrogate, which TOML refuses)."""
    return not isinstance(v, str) or not any(0xD800 <= ord(c) <= 0xDFFF for c in v)


items = scalars.filter(_no_surrogates)
item_lists = st.lists(items, max_size=4)
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@st.composite
def grid_table(draw) -> list[str]:
    lines = ["[grid]"]
    if draw(st.booleans()):   # a grid made to be big: valid values, many combinations
        for key, good in GOOD.items():
            if draw(st.integers(0, 3)):
                n = draw(st.integers(1, 40))
                lines.append(f'"{key}" = [{", ".join(toml_value(good[i % len(good)]) for i in range(n))}]')
    bad = draw(st.integers(0, 2)) == 0      # keys and values from anywhere, often refused
    for key in draw(st.lists(st.sampled_from(GRID_KEYS) | text, unique=True, max_size=5 if bad else 0)):
        lines.append(f"{toml_value(key)} = {toml_value(draw(item_lists | items))}")
    return lines


@st.composite
def sweep_text(draw) -> bytes:
    lines = []
    if draw(st.integers(0, 15)):      # mostly a base, mostly a good one
        base = draw(st.sampled_from(BASES[:4]) if draw(st.integers(0, 2))
                    else st.sampled_from(BASES) | text | items)
        lines.append(f"base = {toml_value(base)}")
    if draw(st.integers(0, 3)):
        seeds = draw(st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=4) | item_lists | items
                     | st.integers(0, 20_000).map(lambda n: list(range(n))))
        lines.append(f"seeds = {toml_value(seeds)}")
    for key in draw(st.lists(st.sampled_from(["name", "description"]), unique=True, max_size=2)):
        lines.append(f"{key} = {toml_value(draw(text if draw(st.integers(0, 3)) else items))}")
    if draw(st.integers(0, 7)) == 0:
        key = draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8))
        if key not in TOP:
            lines.append(f"{key} = {toml_value(draw(items))}")
    choice = draw(st.integers(0, 9))
    if choice < 7:
        lines += draw(grid_table())
    elif choice == 7:
        lines.append("grid = " + toml_value(draw(item_lists | items)))   # not a table
    elif choice == 8:
        lines.append("[grid]\nx = " + "[" * 3000 + "]" * 3000)      # deeper than the parser's stack
    data = ("\n".join(lines) + "\n").encode()
    if draw(st.integers(0, 7)) == 0:   # raw bytes spliced in (maybe not UTF-8)
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=8)) + data[at:]
    return data


@settings(database=None, deadline=None, suppress_health_check=list(HealthCheck), max_examples=200)
@given(text=sweep_text())
def PROPERTY(text):
    with open(SWEEP, "wb") as f:
        f.write(text)
    try:
        sweep = load_sweep(SWEEP)
    except ScenarioError as err:
        assert str(err).startswith(SWEEP), err
        return
    assert 0 < len(sweep.points) <= MAX_POINTS, len(sweep.points)
    assert [p.index for p in sweep.points] == list(range(len(sweep.points)))
    assert os.path.isfile(sweep.base)
    for point in sweep.points[:: max(1, len(sweep.points) // 20)]:   # a sample: each is valid
        assert isinstance(point.seed, int) and 0 <= point.seed < 2**63
        from_dict(sweep.base, point_raw(sweep, point.params))
