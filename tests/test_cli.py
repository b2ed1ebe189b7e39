"""The CLI dispatcher: every command is declared as data, defaults show in --help, every config is validated before its run, user errors are one line."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from conftest import ROOT
from pipeline import cli
from pipeline.core.command import Command
from pipeline.core.errors import PipelineError


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_is_declared_as_data(command):
    module = importlib.import_module(cli.COMMANDS[command])
    declared = module.COMMAND
    assert isinstance(declared, Command) and declared.name == command and declared is cli.command(command)
    assert dataclasses.is_dataclass(declared.Config) and declared.run is module.run and declared.help
    assert not hasattr(module, "add_parser") and not hasattr(module, "from_args")
    assert module.__doc__ and module.__doc__.strip()


def test_the_data_command_is_in_the_list():
    assert cli.COMMANDS["data"] == "pipeline.datasets" and list(cli.COMMANDS)[0] == "data"


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
    def boom(config):
        raise PipelineError(f"{tmp_path}/x.h5: the rule that was broken")

    monkeypatch.setattr(cli.command("verify"), "run", boom)
    assert cli.main(["verify", str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path}/x.h5: the rule that was broken\n"


def test_interrupt_exits_130(monkeypatch, capsys, tmp_path):
    def stop(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.command("verify"), "run", stop)
    assert cli.main(["verify", str(tmp_path / "x.h5")]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_results_that_are_not_an_exit_status_mean_success(monkeypatch, tmp_path):
    verify = cli.command("verify")
    monkeypatch.setattr(verify, "run", lambda config: {"accuracy": 1.0})
    assert cli.main(["verify", str(tmp_path / "x.h5")]) == 0
    monkeypatch.setattr(verify, "run", lambda config: 1)
    assert cli.main(["verify", str(tmp_path / "x.h5")]) == 1


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--data-path", "--repeats", "0"], r"^error: --repeats 0: must be a whole number in \[1, 4294967295\]$"),
        (["data", "d", "--train-per-class", "0"], r"^error: --train-per-class 0: must be a whole number in \[1, 4294967295\]$"),
        (["verify"], None),
    ],
)
def test_every_config_is_validated_before_its_run(argv, message, monkeypatch, capsys):
    ran = []
    for name in cli.COMMANDS:
        monkeypatch.setattr(cli.command(name), "run", ran.append)
    if message is None:  # verify has rules only: none broken, so it runs
        assert cli.main([*argv, "x.h5"]) == 0 and len(ran) == 1
        return
    assert cli.main(argv) == 2 and ran == []
    assert re.match(message, capsys.readouterr().err.strip())


def test_the_command_line_is_recorded_where_the_config_keeps_one(tmp_path):
    config = cli.command("merge").parse(["m.h5", "a.h5", "b.h5"])
    assert config.command_line == "python -m pipeline merge m.h5 a.h5 b.h5" and config.shards == (Path("a.h5"), Path("b.h5"))
    assert not hasattr(cli.command("verify").parse(["x.h5"]), "command_line")


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == "transfer-pipeline 0.1.0"


def test_a_quiet_extract_prints_only_its_summary_line(tree, tmp_path):
    """No TensorFlow start-up lines (absl's pre-init warning, the oneDNN notice) on stderr; stdout is the one summary line."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as on a user's machine
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "pipeline", "extract", str(tree), "-o", str(tmp_path / "x.h5"), "--weights", "none", "--input-size", "32", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert len(proc.stdout.splitlines()) == 1 and proc.stdout.startswith("extracted 6 images") and "(2 classes: cat 3, dog 3)" in proc.stdout


def test_the_start_up_filter_drops_only_tensorflow_s_notices():
    """Lines written to fd 2 inside the filter come back, except the known start-up notices."""
    import os
    import subprocess
    import sys

    code = (
        "import os\n"
        "from pipeline.core.quiet import filtered_stderr\n"
        "with filtered_stderr():\n"
        "    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n')\n"
        "    os.write(2, b'I0000 port.cc:153] oneDNN custom operations are on. You may see ...\\n')\n"
        "    os.write(2, b'a real warning\\n')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0 and proc.stderr == "a real warning\n"


@pytest.mark.parametrize("name, value", [("HDF5_DRIVER", "family"), ("HDF5_DRIVER", "split"), ("HDF5_VDS_PREFIX", "/tmp")])
def test_an_environment_that_makes_hdf5_open_other_files_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, name, value):
    """Eleventh pass (#22): HDF5_DRIVER=family or split made extract publish its file, then fail reading it back with a traceback (and
    call the good file incomplete on the next run)."""
    from conftest import make_tree
    from pipeline.cli import main

    data = make_tree(tmp_path / "d", per_class=2)
    monkeypatch.setenv(name, value)
    assert main(["extract", str(data), "-o", str(tmp_path / "x.h5"), "--weights", "none", "--input-size", "32", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {name}={value} is set in the environment: HDF5 would open other files than the ones named (a feature file is one file, its shards beside it); unset {name}\n"
    assert not any(tmp_path.glob("x*"))
    monkeypatch.setenv("HDF5_DRIVER", "sec2")
    monkeypatch.delenv("HDF5_VDS_PREFIX", raising=False)
    assert main(["extract", str(data), "-o", str(tmp_path / "x.h5"), "--weights", "none", "--input-size", "32", "--quiet"]) == 0


def test_make_clean_removes_only_the_generated_features(tmp_path):
    """Eleventh pass (#22): `make clean FEATURES="my features"` ran `rm -rf my features/*.h5 ...` and deleted the folder `my`;
    an empty FEATURES gave `rm -rf /*.h5 /*.partial /models`."""
    import shutil
    import subprocess

    from conftest import ROOT

    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "my").mkdir()
    (tmp_path / "my" / "thesis.txt").write_text("precious")
    gen = tmp_path / "my features"
    (gen / "models").mkdir(parents=True)
    (gen / "x.h5").write_bytes(b"")
    (gen / "keep.txt").write_text("kept")
    done = subprocess.run(["make", "-s", "clean", "FEATURES=my features"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "my" / "thesis.txt").read_text() == "precious" and sorted(p.name for p in gen.iterdir()) == ["keep.txt"]
    done = subprocess.run(["make", "-s", "clean", "FEATURES="], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "FEATURES is empty" in done.stderr


@pytest.mark.parametrize(
    "argv",
    [["extract", "", "-o", "x.h5"], ["train", ""], ["train", "x.h5", "--test", ""], ["predict", "m.joblib", ""], ["predict", "", "img.png"],
     ["compare", "--data", ""], ["verify", ""], ["evaluate", "m.joblib", ""], ["data", ""]],
)
def test_an_empty_path_is_refused_never_read_as_the_current_folder(argv, monkeypatch, capsys, tmp_path):
    """`extract "$DATA"` with DATA unset read the current folder as the data folder (Path("") is "."): every path flag refuses it."""
    monkeypatch.chdir(tmp_path)
    ran = []
    for name in cli.COMMANDS:
        monkeypatch.setattr(cli.command(name), "run", ran.append)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and ran == []
    assert capsys.readouterr().err.strip().endswith("an empty path names no file or folder (write . for the current folder)")


@pytest.mark.parametrize("source, message", [("", r"^extract_features: an empty path names no file or folder"), ([], r"^extract_features: no images given \(an empty list\)$")])
def test_the_api_refuses_an_empty_path_or_list(source, message, tmp_path, monkeypatch):
    from pipeline import extract_features

    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=message):
        extract_features(source, weights="none", input_size=32)
