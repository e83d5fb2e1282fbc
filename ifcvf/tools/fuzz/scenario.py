"""Fuzz target ``scenario``: scenario TOML files (sim.scenario.load).

A case is a file built from the schema: every section, keys known and
unknown, values of the right type, the wrong type, at and past the allowed
edges (huge, negative, nan, inf, empty strings), [device] fields of
``IfcvfConfig`` with drawn values, and sometimes raw bytes spliced into the
text.  Properties: ``load`` returns a scenario or raises ``ScenarioError``
(nothing else), and whatever it returns holds only allowed values, and its
[device] table builds an ``IfcvfConfig``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile

from hypothesis import HealthCheck, given, settings, strategies as st

from sim.config import IfcvfConfig
from sim.scenario import SCHEMA, ScenarioError, device_config, load

DEVICE_FIELDS = sorted(f.name for f in dataclasses.fields(IfcvfConfig))

scalars = st.one_of(
    st.integers(-5, 70_000), st.sampled_from([0, 1, 2, 3, 4, 32, 33, 256, 32768, 65536, -1,
                                              2**63 - 1, -2**63, 2**31]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0, 1e9, -0.0]),
    st.booleans(), st.text(max_size=12),
    st.sampled_from(["bringup", "traffic", "migration", "msix", "intx", "qemu", "ifcvf",
                     "qemu-7.2", "dpdk-virtio-user", "constant", "poisson", "vdpa=1",
                     "vdpa=1,sw-live-migration=1", "vdpa=0x1,bogus=2", ""]))
values = scalars | st.lists(scalars, max_size=3)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        # Not json.dumps: it writes a character beyond the BMP as a surrogate
        # pair of escapes, which TOML refuses, so most non-ASCII strings made
        # the whole file invalid.  Only a lone surrogate is escaped (and refused).
        return '"' + "".join(_toml_char(c) for c in v) + '"'
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


def _toml_char(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    if ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF:
        return f"\\u{ord(c):04x}"
    return c


@st.composite
def section(draw, keys: list[str]):
    names = draw(st.lists(st.sampled_from(keys) | st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1,
                                                          max_size=10), unique=True, max_size=6))
    return {n: draw(values) for n in names}


@st.composite
def scenario_text(draw):
    lines = []
    top = draw(section([k.name for k in SCHEMA[""]]))
    lines += [f"{k} = {toml_value(v)}" for k, v in top.items()]
    names = [s for s in SCHEMA if s] + ["device"]
    for name in draw(st.lists(st.sampled_from(names) | st.just("bogus"), unique=True, max_size=6)):
        keys = DEVICE_FIELDS if name in ("device", "bogus") else [k.name for k in SCHEMA[name]]
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in draw(section(keys)).items()]
    text = ("\n".join(lines) + "\n").encode()
    if draw(st.integers(0, 7)) == 0:   # raw bytes spliced in (maybe not UTF-8)
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.binary(max_size=8)) + text[at:]
    return text


_DIR = tempfile.mkdtemp(prefix="ifcvf-fuzz-scenario-")


@settings(database=None, deadline=None, suppress_health_check=list(HealthCheck), max_examples=200)
@given(text=scenario_text())
def PROPERTY(text):
    path = os.path.join(_DIR, "case.toml")
    with open(path, "wb") as f:
        f.write(text)
    try:
        scenario = load(path)
    except ScenarioError as err:
        assert str(err).startswith(path), err
        return
    for name, keys in SCHEMA.items():
        got = scenario.sections[name] if name else {
            "name": scenario.name, "description": scenario.description,
            "kind": scenario.kind, "seed": scenario.seed}
        for k in keys:
            if name == "" and k.name == "name":
                continue
            v = got[k.name]
            assert isinstance(v, k.type) and not (k.type is int and isinstance(v, bool)), (name, k.name, v)
            assert not k.choices or v in k.choices, (name, k.name, v)
            assert k.allowed is None or k.allowed(v), (name, k.name, v)
    device_config(scenario.device)
