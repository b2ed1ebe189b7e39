"""The CLI dispatcher: every command has the stage contract, defaults show in --help, user errors are one line."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from pipeline import cli
from pipeline.core.errors import PipelineError


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_has_the_stage_contract(command):
    module = importlib.import_module(cli.COMMANDS[command])
    for name in ("add_parser", "from_args", "run"):
        assert callable(getattr(module, name, None)), f"{cli.COMMANDS[command]} lacks {name}"
    assert module.__doc__ and module.__doc__.strip()


def test_the_dispatcher_has_no_transition_table_left():
    assert not hasattr(cli, "_LEGACY")


def _subparser(command):
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[command]


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_shows_each_default_once_from_the_config(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m pipeline " + command)
    for action in _subparser(command)._actions:
        if action.default not in (None, False, True, argparse_suppress()) and action.help and action.option_strings:
            assert "(default" in action.help, f"{command} {action.option_strings}: no default in its help"


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def test_flag_defaults_are_the_config_defaults():
    from pipeline.classical.train import TrainConfig
    from pipeline.extract.config import ExtractConfig

    for command, cls in (("extract", ExtractConfig), ("train", TrainConfig)):
        defaults = {a.dest: a.default for a in _subparser(command)._actions}
        for f in dataclasses.fields(cls):
            if f.name in defaults and f.default is not dataclasses.MISSING:
                assert defaults[f.name] == f.default, f"{command} --{f.name}"


def test_a_user_error_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    module = importlib.import_module(cli.COMMANDS["verify"])

    def boom(config):
        raise PipelineError(f"{tmp_path}/x.h5: the rule that was broken")

    monkeypatch.setattr(module, "run", boom)
    assert cli.main(["verify", str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path}/x.h5: the rule that was broken\n"


def test_interrupt_exits_130(monkeypatch, capsys, tmp_path):
    module = importlib.import_module(cli.COMMANDS["verify"])

    def stop(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "run", stop)
    assert cli.main(["verify", str(tmp_path / "x.h5")]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_results_that_are_not_an_exit_status_mean_success(monkeypatch, tmp_path):
    module = importlib.import_module(cli.COMMANDS["verify"])
    monkeypatch.setattr(module, "run", lambda config: {"accuracy": 1.0})
    assert cli.main(["verify", str(tmp_path / "x.h5")]) == 0
    monkeypatch.setattr(module, "run", lambda config: 1)
    assert cli.main(["verify", str(tmp_path / "x.h5")]) == 1


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
