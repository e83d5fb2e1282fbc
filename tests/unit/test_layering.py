"""Imports go down only (see the design): checked on the source, not by convention.

- ``sim`` is independent hardware: it may use the driver package only for its
  C atomics (``ifcvf._native``) and the vhost-user wire codec.
- ``hal.api`` imports nothing of ours; ``hal`` never imports the driver.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
OURS = ("ifcvf", "hal", "sim")
SIM_MAY_USE = ("ifcvf._native", "ifcvf.vhost.protocol", "ifcvf.vhost.channel", "ifcvf.vhost.messages")


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


@pytest.mark.parametrize("path", modules("sim"), ids=lambda p: p.name)
def test_sim_does_not_import_the_driver(path):
    for name in imports_of(path):
        if name.split(".")[0] == "ifcvf":
            # "from ifcvf.vhost import protocol" names the package too: allowed
            # as long as what is taken from it is.
            packages = {a.rsplit(".", n)[0] for a in SIM_MAY_USE for n in (1, 2)}
            assert name in packages or name.startswith(SIM_MAY_USE), \
                f"{path.relative_to(ROOT)} imports {name}"


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
