"""Imports go down only (../shared/DESIGN.md, "Layers"): checked on the source, not by convention.

Every module belongs to one layer, by where it lives; the rules are between
layers, with no per-file exceptions:

- the driver core (``ifcvf/`` outside ``ifcvf/tools``: ids, devargs, hw, vdpa,
  relay, dirtylog, iova, vhost/) never imports ``sim``, ``ifcvf.tools`` or a HAL
  backend: from ``hal`` it uses the contract (``hal.api``) and host memory
  (``hal.memory``), nothing else;
- the vhost-user wire codec (``ifcvf.vhost`` protocol, channel and what they are
  built from) imports nothing of ours outside itself;
- ``hal.api`` imports nothing of ours; ``hal`` never imports the driver, and
  from ``sim`` only the ``SimDevice`` protocol it is written against (``sim.device``);
- ``sim`` is independent hardware: it never imports ``hal`` or the driver,
  except the wire codec (the QEMU role speaks vhost-user).  Its C is its own
  module, ``sim._native`` (csrc/sim/), never the driver's ``ifcvf._native``
  (csrc/driver/); the two modules share no C symbol;
- ``sim.testing`` serves tests and benchmarks only: nothing else imports it;
- the composition layer (``ifcvf/tools``, and ``ifcvf/__main__.py``, which is
  ``python -m ifcvf``, the CLI's other door) may import anything: it is the only
  code that sees both the driver and the simulator.
"""
import ast
import ctypes
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
OURS = ("ifcvf", "hal", "sim")

CODEC = tuple(f"ifcvf.vhost.{m}" for m in
              ("protocol", "channel", "messages", "codes", "errors", "payloads", "specs", "replies"))
CORE_MAY_USE_FROM_HAL = ("hal.api", "hal.memory")
HAL_MAY_USE_FROM_SIM = ("sim.device",)
SIM_MAY_USE_FROM_THE_DRIVER = CODEC
MAY_USE_SIM_TESTING = ("sim.testing", "ifcvf.tools.benchmarks")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imports_of(path: pathlib.Path, module: str | None = None) -> list[str]:
    """The modules of ours that ``path`` (module ``module``, by default where it lives)
    imports: ``from a.b import c`` is ``a.b.c`` when c is a module, else ``a.b``.
    Relative imports count too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = (module or module_name(path)).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here[:len(here) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.append(full if is_module(full) else base)
    return sorted({n for n in names if n.split(".")[0] in OURS})


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer(name: str) -> str:
    if within(name, ("ifcvf.tools",)) or name == "ifcvf.__main__":
        return "tools"
    if within(name, CODEC):
        return "codec"
    if within(name, ("ifcvf",)):
        return "core"
    if name == "hal.api":
        return "hal.api"
    if within(name, ("hal",)):
        return "hal"
    if within(name, ("sim.testing",)):
        return "sim.testing"
    return "sim"


def sources(*packages: str) -> list[pathlib.Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def in_layer(*layers: str) -> list[pathlib.Path]:
    return [p for p in sources("ifcvf", "hal", "sim") if layer(module_name(p)) in layers]


def rel(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", in_layer("core", "codec"), ids=rel)
def test_the_driver_core_sees_neither_the_simulator_nor_a_hal_backend_nor_the_tools(path):
    for name in imports_of(path):
        assert not within(name, ("sim", "ifcvf.tools")), f"{rel(path)} imports {name}"
        if within(name, ("hal",)):
            assert within(name, CORE_MAY_USE_FROM_HAL), f"{rel(path)} imports the HAL backend {name}"


@pytest.mark.parametrize("path", in_layer("codec"), ids=rel)
def test_the_wire_codec_imports_nothing_of_ours_but_itself(path):
    for name in imports_of(path):
        assert within(name, CODEC) or name in ("ifcvf", "ifcvf.vhost"), f"{rel(path)} imports {name}"


def test_hal_api_imports_nothing_of_ours():
    assert imports_of(ROOT / "hal" / "api.py") == []


@pytest.mark.parametrize("path", in_layer("hal", "hal.api"), ids=rel)
def test_hal_never_imports_the_driver_and_only_the_sim_device_protocol(path):
    for name in imports_of(path):
        assert not within(name, ("ifcvf",)), f"{rel(path)} imports {name}"
        if within(name, ("sim",)):
            assert within(name, HAL_MAY_USE_FROM_SIM), f"{rel(path)} imports {name}"


@pytest.mark.parametrize("path", in_layer("sim", "sim.testing"), ids=rel)
def test_sim_never_imports_hal_or_the_driver_except_the_wire_codec(path):
    for name in imports_of(path):
        assert not within(name, ("hal",)), f"{rel(path)} imports {name}"
        if within(name, ("ifcvf",)):
            # "from ifcvf.vhost import protocol" also loads the (import-free) packages.
            assert within(name, SIM_MAY_USE_FROM_THE_DRIVER) or name in ("ifcvf", "ifcvf.vhost"), \
                f"{rel(path)} imports {name}"


@pytest.mark.parametrize("path", sources("ifcvf", "hal", "sim"), ids=rel)
def test_only_tests_and_benchmarks_import_sim_testing(path):
    if within(module_name(path), MAY_USE_SIM_TESTING):
        return
    for name in imports_of(path):
        assert not within(name, ("sim.testing",)), f"{rel(path)} imports {name}"


@pytest.mark.parametrize("package", ["ifcvf", "ifcvf.vhost"])
def test_the_packages_the_simulator_passes_through_import_nothing(package):
    init = ROOT.joinpath(*package.split(".")) / "__init__.py"
    assert imports_of(init) == []


# --- what importing really loads --------------------------------------------------------
def loaded_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=ROOT).stdout
    return set(out.split())


@pytest.mark.parametrize("module", ["ifcvf.vdpa", "ifcvf.vhost.server"])
def test_importing_the_driver_loads_neither_simpy_nor_the_simulator(module):
    loaded = loaded_by(f"import {module}")
    assert module in loaded
    unwanted = sorted(m for m in loaded if within(m, ("simpy", "sim", "hal.sim", "hal.vfio", "ifcvf.tools")))
    assert unwanted == [], f"importing {module} loads {unwanted}"


def test_the_command_line_parser_loads_no_simpy():
    loaded = loaded_by("from ifcvf.tools.cli import build_parser; build_parser()")
    assert not [m for m in loaded if within(m, ("simpy", "matplotlib", "pytest", "hypothesis"))]


# --- the two native modules --------------------------------------------------------------
# What each native module exports: the driver's C and the simulator's C, apart.
DRIVER_C = ("ifc_log_mark", "ifc_mem_table_check", "ifc_relay_", "ifc_notify_")
SIM_C = ("ifc_log_fetch_clear", "ifc_dp_", "ifc_gvq_", "ifc_frame", "ifc_stream_", "ifc_link_",
         "ifc_pipe_", "ifc_wire_")


def test_the_drivers_native_module_has_no_simulator_c():
    # In a fresh interpreter: importing it loads nothing of the simulator.
    code = ("import sys, ifcvf._native as n; "
            "print(sorted(m for m in sys.modules if m == 'sim' or m.startswith(('sim.', 'simpy')))); "
            "print(n.__file__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=ROOT)
    loaded, path = done.stdout.splitlines()
    assert loaded == "[]"
    from ifcvf._native import ffi, lib
    names = [n for n in dir(lib) if n.startswith("ifc_")]
    assert any(n.startswith(DRIVER_C) for n in names)
    assert not [n for n in names if n.startswith(SIM_C)]
    assert not [t for t in ffi.list_types()[0] + ffi.list_types()[1]
                if t.startswith(("ifc_dp", "ifc_gvq", "ifc_stream", "ifc_check", "ifc_flow", "ifc_link",
                                 "ifc_pipe"))]
    exported = ctypes.CDLL(path)        # compiled in, even if undeclared, would show here
    for name in ("ifc_log_fetch_clear", "ifc_dp_tx_round", "ifc_gvq_rx", "ifc_frame_fill",
                 "ifc_wire_schedule", "ifc_link_read"):
        assert not hasattr(exported, name), name


def test_the_simulators_native_module_has_no_driver_c():
    from sim._native import ffi, lib
    names = [n for n in dir(lib) if n.startswith("ifc_")]
    assert any(n.startswith(SIM_C) for n in names)
    assert not [n for n in names if n.startswith(DRIVER_C)]
    assert not [t for t in ffi.list_types()[0] + ffi.list_types()[1]
                if t.startswith(("ifc_relay", "ifc_notify", "ifc_mem"))]
    import sim._native
    exported = ctypes.CDLL(sim._native.__file__)
    for name in ("ifc_log_mark", "ifc_mem_table_check", "ifc_relay_used", "ifc_notify_run"):
        assert not hasattr(exported, name), name


# --- the checker itself -------------------------------------------------------------------
def test_layering_check_sees_violations(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from ifcvf.hw import IfcvfHw\nimport sim.world\nfrom ifcvf.vhost import protocol\n"
                   "from hal import sim as hs\nfrom .tools import cli\nimport os\n")
    assert imports_of(bad, module="ifcvf.bad") == ["hal.sim", "ifcvf.hw", "ifcvf.tools.cli", "ifcvf.vhost.protocol",
                               "sim.world"]
    assert [layer(n) for n in ("ifcvf.hw", "ifcvf.vhost.protocol", "ifcvf.vhost.backend", "hal.api",
                               "hal.sim", "sim.world", "sim.testing.splitring", "ifcvf.tools.cli",
                               "ifcvf.__main__")] == \
        ["core", "codec", "core", "hal.api", "hal", "sim", "sim.testing", "tools", "tools"]
