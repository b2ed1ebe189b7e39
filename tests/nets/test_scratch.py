"""The scratch stage: its outputs and metrics contract, its flags, and its own checks."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tree
from pipeline.cli import main
from pipeline.core.errors import PipelineError
from pipeline.core.splits import split_indices
from pipeline.nets import scratch
from pipeline.nets.results import METRICS_KEYS

CLASSES = ("ant", "bee", "cat")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    data = make_tree(tmp_path_factory.mktemp("scratch") / "data", classes=CLASSES, per_class=6)
    (data / "bee" / "broken.png").write_bytes(b"")  # undecodable: counted, never fatal
    return data


def test_scratch_writes_its_outputs(data, tmp_path):
    out = tmp_path / "scratch"
    config = scratch.ScratchConfig(data, out_dir=out, input_size=32, filters=(8, 16, 16), dense=8, epochs=2, batch_size=8, quiet=True)
    metrics = scratch.run(config)
    for name in ("scratch.keras", "scratch.metrics.json", "scratch.curves.png"):
        assert (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "scratch.metrics.json").read_text())
    assert set(METRICS_KEYS) <= set(on_disk) and on_disk == json.loads(json.dumps(metrics))
    assert on_disk["strategy"] == "from scratch CNN" and on_disk["mode"] == "plain" and on_disk["epochs_run"] >= 1
    assert on_disk["n_test"] == len(split_indices(np.repeat([0, 1, 2], 6), 0.2, 0)[1])
    assert on_disk["filters"] == [8, 16, 16] and on_disk["config"]["filters"] == [8, 16, 16]
    assert [p["name"] for p in on_disk["phases"]] == ["train"] and on_disk["rejected"] == 1


def parse(*argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    scratch.add_parser(sub)
    return parser.parse_args(argv)


def test_cli_flags_build_the_config():
    assert parse("scratch", "d").input_size == 64
    argv = ["scratch", "d", "--input-size", "48", "--epochs", "3", "--no-augment", "--quiet"]
    c = scratch.from_args(parse(*argv), argv)
    assert (c.data_dir, c.input_size, c.epochs, c.augment, c.quiet) == (Path("d"), 48, 3, False, True)
    assert c.filters == (32, 64, 128, 256) and c.command_line.startswith("python -m pipeline scratch d")
    assert not hasattr(parse("scratch", "d"), "filters")  # not a flag


def test_flag_defaults_are_the_config_defaults():
    args = parse("scratch", "d")
    config = scratch.ScratchConfig(Path("d"))
    for f in dataclasses.fields(scratch.ScratchConfig):
        if f.name not in ("command_line", "filters"):
            assert getattr(args, f.name) == getattr(config, f.name), f.name


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(input_size=8), r"^--input-size 8: 4 pooling blocks need at least 16 pixels$"),
        (dict(filters=(8, 0)), r"^filters \(8, 0\): need at least one block of at least 1 filter$"),
        (dict(epochs=0), r"^--epochs 0: must be a whole number in \[1, 4294967295\]$"),
        (dict(patience=-1), r"^--patience -1: must be a whole number in \[0, 4294967295\]$"),
        (dict(val_split=1.0), r"^--val-split 1.0: must be between 0 and 1"),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, change, message):
    config = scratch.ScratchConfig(tmp_path / "missing", out_dir=tmp_path / "out", **change)
    with pytest.raises(PipelineError, match=message):
        scratch.run(config)
    assert not (tmp_path / "out").exists()


def test_test_folder_must_differ_from_the_data_folder(data, tmp_path, capsys):
    assert main(["scratch", str(data), "--test", str(data), "-o", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: --test {data}: is the training folder; pass a separate test tree or omit --test\n"
