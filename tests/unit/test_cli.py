"""The command line: help that explains, scenario runs that write JSON, clear errors."""
import json
import pathlib
import subprocess
import sys

import pytest

from ifcvf.tools.cli import main
from sim.scenario import ScenarioError, load

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_help_explains_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for word in ("serve", "sim", "bench", "vhost-user"):
        assert word in out


def test_sim_run_help_lists_scenario_keys(capsys):
    with pytest.raises(SystemExit):
        main(["sim", "run", "--help"])
    out = capsys.readouterr().out
    assert "queue_pairs" in out and "seed" in out and "kind" in out


def _parsers(parser, path=()):
    """(command words, parser) for the CLI and every sub-command under it."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_every_help_fits_an_80_column_terminal(monkeypatch):
    """--help of every command, hand-written examples and the scenario keys
    included, wraps within 80 columns (a longer line folds in the terminal)."""
    from ifcvf.tools.cli import build_parser

    monkeypatch.setenv("COLUMNS", "80")
    seen = []
    for words, parser in _parsers(build_parser()):
        wide = [line for line in parser.format_help().splitlines() if len(line) > 80]
        assert not wide, (words, wide)
        seen.append(words)
    assert ("sim", "run") in seen and ("serve",) in seen and len(seen) > 12


def test_bringup_json(tmp_path):
    out = tmp_path / "bringup.json"
    assert main(["sim", "run", str(ROOT / "scenarios/bringup.toml"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert int(result["features"], 16) >> 32 & 1  # VERSION_1
    assert [q["index"] for q in result["queues"]] == [0, 1, 2, 3]
    assert all(q["last_avail"] == q["last_used"] == 7 for q in result["queues"])
    assert all(q["vector"] == q["index"] + 1 for q in result["queues"])
    assert len(result["trace_digest"]) == 64


def test_same_seed_same_digest_across_processes(tmp_path):
    digests = []
    for hashseed in ("1", "987"):
        out = tmp_path / f"{hashseed}.json"
        subprocess.run([sys.executable, "-m", "ifcvf", "sim", "run", str(ROOT / "scenarios/bringup.toml"),
                        "--json", str(out)], check=True, capture_output=True,
                       env={"PYTHONHASHSEED": hashseed, "PATH": "/usr/bin:/bin"}, cwd=ROOT)
        digests.append(json.loads(out.read_text())["trace_digest"])
    assert digests[0] == digests[1]


@pytest.mark.parametrize("text, message", [
    ("kind = 'dance'", "kind = 'dance': allowed values are bringup"),
    ("[driver]\nqueue_size = 300", "[driver] queue_size = 300: allowed is a power of two"),
    ("[driver]\nqueue_pairs = 'two'", "[driver] queue_pairs = 'two': expected int"),
    ("[driver]\nbogus = 1", "[driver] unknown key 'bogus'"),
    ("[weird]\nx = 1", "unknown section [weird]"),
    ("[device]\nqueue_pairs = 99", "[device]"),
    ("[device]\nnot_a_field = 1", "[device] unknown key 'not_a_field'"),
    ("seed = = 3", "not valid TOML"),
])
def test_bad_scenarios_name_file_key_value_and_what_is_allowed(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(ScenarioError) as err:
        load(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_bad_scenario_is_a_clean_cli_error(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("kind = 'dance'\n")
    assert main(["sim", "run", str(path)]) == 2
    assert "allowed values" in capsys.readouterr().err
