"""The scratch stage: its outputs and metrics contract for the CNN and the ResNet, its flags, the architecture's defaults, and its own checks."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tree, write_image
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
    """The flags of ``python -m pipeline ARGV`` (argv starts with ``scratch``), as argparse leaves them."""
    parser = argparse.ArgumentParser()
    scratch.COMMAND.add_to(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_scratch_resnet_writes_its_outputs(data, tmp_path):
    import keras

    out = tmp_path / "resnet"
    config = scratch.ScratchConfig(data, out_dir=out, arch="resnet", depth=8, input_size=16, epochs=2, batch_size=8, quiet=True)
    assert config.patience == 2  # every epoch runs: the step schedule needs its whole length
    metrics = scratch.run(config)
    on_disk = json.loads((out / "scratch.metrics.json").read_text())
    assert set(METRICS_KEYS) <= set(on_disk) and on_disk == json.loads(json.dumps(metrics))
    assert on_disk["strategy"] == "from scratch ResNet-8" and (on_disk["arch"], on_disk["depth"]) == ("resnet", 8)
    assert on_disk["epochs_run"] == 2 and on_disk["input_size"] == 16 and on_disk["config"]["lr"] == 0.1
    model = keras.saving.load_model(out / "scratch.keras")
    assert model.count_params() == on_disk["parameters"]
    assert tuple(model.outputs[0].shape) == (None, len(CLASSES))


def test_arch_defaults_fill_the_flags_left_at_none():
    cnn = scratch.ScratchConfig(Path("d"))
    assert (cnn.arch, cnn.depth, cnn.input_size, cnn.epochs, cnn.lr, cnn.patience) == ("cnn", None, *scratch.ARCH_DEFAULTS["cnn"].values())
    res = scratch.ScratchConfig(Path("d"), arch="resnet")
    want = scratch.ARCH_DEFAULTS["resnet"]
    assert (res.depth, res.input_size, res.epochs, res.lr, res.patience) == (scratch.DEFAULT_DEPTH, want["input_size"], want["epochs"], want["lr"], want["epochs"])
    assert res.strategy() == f"from scratch ResNet-{scratch.DEFAULT_DEPTH}"
    assert scratch.ScratchConfig(Path("d"), arch="resnet32").depth == 32
    mine = scratch.ScratchConfig(Path("d"), arch="resnet", depth=14, input_size=40, epochs=7, lr=0.05, patience=2)
    assert (mine.depth, mine.input_size, mine.epochs, mine.lr, mine.patience) == (14, 40, 7, 0.05, 2)
    assert scratch.ScratchConfig(Path("d"), arch="resnet", epochs=9).patience == 9


def test_cli_flags_build_the_config():
    assert parse("scratch", "d").input_size is None
    assert scratch.COMMAND.config(parse("scratch", "d"), ["scratch", "d"]).input_size == scratch.ARCH_DEFAULTS["cnn"]["input_size"]
    argv = ["scratch", "d", "--arch", "resnet20", "--epochs", "5"]
    c = scratch.COMMAND.config(parse(*argv), argv)
    assert (c.arch, c.depth, c.epochs, c.input_size) == ("resnet20", 20, 5, scratch.ARCH_DEFAULTS["resnet"]["input_size"])
    argv = ["scratch", "d", "--input-size", "48", "--epochs", "3", "--no-augment", "--quiet"]
    c = scratch.COMMAND.config(parse(*argv), argv)
    assert (c.data_dir, c.input_size, c.epochs, c.augment, c.quiet) == (Path("d"), 48, 3, False, True)
    assert c.filters == (32, 64, 128, 256) and c.command_line.startswith("python -m pipeline scratch d")
    assert not hasattr(parse("scratch", "d"), "filters")  # not a flag


def test_flag_defaults_are_the_config_defaults():
    args = parse("scratch", "d")
    config = scratch.ScratchConfig(Path("d"))
    from_flags = scratch.COMMAND.config(args, ["scratch", "d"])
    for f in dataclasses.fields(scratch.ScratchConfig):
        if f.name not in ("command_line", "filters", "data_dir"):
            assert getattr(args, f.name) == f.default, f.name
            assert getattr(from_flags, f.name) == getattr(config, f.name), f.name


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(input_size=8), r"^--input-size 8: 4 pooling blocks need at least 16 pixels$"),
        (dict(filters=(8, 0)), r"^filters \(8, 0\): need at least one block of at least 1 filter$"),
        (dict(epochs=0), r"^--epochs 0: must be a whole number in \[1, 4294967295\]$"),
        (dict(patience=-1), r"^--patience -1: must be a whole number in \[0, 4294967295\]$"),
        (dict(val_split=1.0), r"^--val-split 1.0: must be between 0 and 1"),
        (dict(arch="vgg"), r"^--arch vgg: must be cnn, resnet or resnetN \(N = 6n\+2 layers, e.g. resnet20\)$"),
        (dict(arch="resnet", depth=21), r"^--depth 21: a CIFAR ResNet has 6n\+2 layers"),
        (dict(arch="resnet21"), r"^--depth 21: a CIFAR ResNet has 6n\+2 layers"),
        (dict(arch="resnet20", depth=32), r"^--depth 32: --arch resnet20 means depth 20; give one of the two$"),
        (dict(depth=20), r"^--depth 20: only for --arch resnet$"),
        (dict(arch="resnet", input_size=3), r"^--input-size 3: a CIFAR ResNet halves the image twice"),
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


def test_refit_retrains_from_the_same_start_on_every_row(data, tmp_path):
    config = scratch.ScratchConfig(data, out_dir=tmp_path / "refit", input_size=32, filters=(8, 16, 16), dense=8, epochs=3, patience=3, batch_size=8, quiet=True)
    assert config.refit  # the default
    result = scratch.fit(config)
    m = result.metrics
    best = m["phases"][0]["best_epoch"]
    assert m["refit"]["chosen_epochs"] == {"train": best}
    assert [p["epochs_run"] for p in m["refit"]["phases"]] == ([best] if best else [])
    assert m["n_train"] == m["refit"]["n_train"] == len(result.data.train_y) + len(result.data.val_y) and m["n_val"] == len(result.data.val_y) > 0
    assert len(m["history"]["phase"]) == m["epochs_run"] + best and m["history"]["phase"][-1] == ("refit train" if best else "train")
    off = scratch.fit(dataclasses.replace(config, out_dir=tmp_path / "selection", refit=False)).metrics
    assert off["refit"] is None and off["n_train"] == len(result.data.train_y)
    assert off["phases"][0]["best_epoch"] == best  # the selection is the same run with or without the refit


def test_the_data_digest_is_of_the_images_before_they_were_read(tmp_path, monkeypatch):
    """Tenth pass (#22): the digest compare keys a network row to was taken after training: an image changed during the run
    was recorded as trained on, and the next compare reused the row."""
    from pipeline.images.listing import list_images

    data = make_tree(tmp_path / "data", classes=("cat", "dog"), per_class=6, size=(20, 20))
    before = list_images(data).content_digest()
    real = scratch.load_data

    def and_an_edit(*args, **kwargs):
        out = real(*args, **kwargs)
        write_image(data / "cat" / "000.png", seed=77)  # while training runs
        return out

    monkeypatch.setattr(scratch, "load_data", and_an_edit)
    metrics = scratch.run(scratch.ScratchConfig(data, out_dir=tmp_path / "out", input_size=16, filters=(4,), dense=4, epochs=1, batch_size=8, refit=False, quiet=True))
    assert metrics["data_digest"]["train"] == before != list_images(data).content_digest()
