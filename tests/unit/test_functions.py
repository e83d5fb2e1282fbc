"""The one place that opens a function (ifcvf.tools.functions) and the extras' messages."""
import pytest

from hal.api import HalError
from ifcvf.tools import extras
from ifcvf.tools.cli import main
from ifcvf.tools.functions import FunctionError, is_sim, open_function


def test_sim_names_a_simulated_function():
    assert is_sim("sim") and is_sim("sim:1")
    assert not is_sim("0000:3b:00.2") and not is_sim("simulated")


def test_open_sim_builds_a_model_in_a_world_of_its_own():
    from sim.config import IfcvfConfig

    fn = open_function("sim", config=IfcvfConfig(queue_pairs=2), seed=5)
    try:
        assert fn.address == "sim:0" and fn.model.name == "vf0"
        assert fn.model.config.queue_pairs == 2
        assert fn.world is fn.model.world
    finally:
        fn.close()


def test_simulated_functions_share_the_world_they_are_given():
    a = open_function("sim")
    b = open_function("sim", world=a.world, index=1)
    try:
        assert b.world is a.world
        assert (b.address, b.model.name) == ("sim:1", "vf1")
    finally:
        b.close()
        a.close()


@pytest.mark.parametrize("device", ["eth0", "", "3b:00", "sim0"])
def test_a_device_that_is_neither_is_a_clear_hal_error(device):
    with pytest.raises(FunctionError, match="neither `sim`.*nor a PCI address") as err:
        open_function(device)
    assert isinstance(err.value, HalError)


def test_a_missing_extra_names_the_extra_and_the_pip_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(extras, "_installed", lambda module: module != "simpy")
    with pytest.raises(extras.MissingExtra, match=r"needs the `sim` extra \(simpy is not installed\): "
                                                  r"pip install 'ifcvf\[sim\]'"):
        open_function("sim")
    assert main(["sim", "run", "scenarios/bringup.toml"]) == 2
    err = capsys.readouterr().err
    assert "`ifcvf sim run` needs the `sim` extra" in err and "Traceback" not in err


def test_an_extras_module_missing_past_the_check_is_still_named(monkeypatch, capsys):
    def boom(args):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")
    import ifcvf.tools.commands.sim as sim_command
    monkeypatch.setattr(sim_command, "cmd_run", boom)
    assert main(["sim", "run", "x.toml"]) == 2
    assert "pip install 'ifcvf[plot]'" in capsys.readouterr().err


def test_every_extra_is_declared_in_pyproject():
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[2]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, modules in extras.EXTRAS.items():
        assert extra in declared, extra
        text = " ".join(declared[extra]).lower()
        assert all(m in text for m in modules), (extra, declared[extra])
