"""Imports go down only (see the design): checked on the source, not by convention.

- ``sim`` is independent hardware: it may use the driver package only for the
  vhost-user wire codec.  Its C is its own module, ``sim._native`` (csrc/sim/),
  never the driver's ``ifcvf._native`` (csrc/driver/); the two modules share
  no C symbol.
- ``hal.api`` imports nothing of ours; ``hal`` never imports the driver.
"""
import ast
import ctypes
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
OURS = ("ifcvf", "hal", "sim")
SIM_MAY_USE = ("ifcvf.vhost.protocol", "ifcvf.vhost.channel", "ifcvf.vhost.messages")


def imports_of(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return [n for n in names if n.split(".")[0] in OURS]


def modules(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def sim_may_import(name: str) -> bool:
    if name.split(".")[0] != "ifcvf":
        return True
    # "from ifcvf.vhost import protocol" names the package too: allowed as
    # long as what is taken from it is.
    packages = {a.rsplit(".", n)[0] for a in SIM_MAY_USE for n in (1, 2)}
    return name in packages or name.startswith(SIM_MAY_USE)


@pytest.mark.parametrize("path", modules("sim"), ids=lambda p: p.name)
def test_sim_does_not_import_the_driver(path):
    for name in imports_of(path):
        assert sim_may_import(name), f"{path.relative_to(ROOT)} imports {name}"


@pytest.mark.parametrize("path", modules("hal"), ids=lambda p: p.name)
def test_hal_does_not_import_the_driver(path):
    for name in imports_of(path):
        assert not name.startswith("ifcvf"), f"{path.relative_to(ROOT)} imports {name}"


def test_hal_api_imports_nothing_of_ours():
    assert imports_of(ROOT / "hal" / "api.py") == []


def test_layering_check_sees_violations(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from ifcvf.hw import IfcvfHw\nimport sim.world\n")
    assert imports_of(bad) == ["ifcvf.hw", "ifcvf.hw.IfcvfHw", "sim.world"]


def test_layering_check_refuses_the_drivers_native_module_in_sim(tmp_path):
    bad = tmp_path / "bad.py"
    for line in ("from ifcvf._native import ffi, lib\n", "from ifcvf import _native\n",
                 "import ifcvf._native\n"):
        bad.write_text(line)
        assert not all(map(sim_may_import, imports_of(bad))), line
    bad.write_text("from ifcvf.vhost import protocol\nfrom sim._native import ffi, lib\n")
    assert all(map(sim_may_import, imports_of(bad)))


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
