"""One output guard for every stage that reads images or features: no output inside an image folder it reads, one run per output at a time, and train refuses a class without rows."""

from __future__ import annotations

import pytest

from conftest import make_tree
from feature_data import FAST_GRID, make_features
from pipeline.classical import train
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import OutputLock
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.nets import finetune, scratch

TINY_NET = dict(input_size=32, epochs=1, batch_size=8, quiet=True)


def test_train_refuses_an_output_inside_the_image_folder_of_its_features(tmp_path):
    data = make_tree(tmp_path / "data", classes=("cat", "dog"), per_class=4)
    extract.run(ExtractConfig(data_dir=data, output=tmp_path / "f.h5", input_size=32, weights="none", quiet=True))
    with pytest.raises(PipelineError, match=r"models: is inside the image folder of .*data \(its files would be read as images there next time\)"):
        train.run(train.TrainConfig(features=tmp_path / "f.h5", output=data / "cat" / "models", cv=2, quiet=True))
    assert not (data / "cat" / "models").exists()


@pytest.mark.parametrize("stage", ["finetune", "scratch"])
def test_networks_refuse_an_output_inside_their_images_and_a_second_run_on_one_output(stage, tmp_path):
    data = make_tree(tmp_path / "data", classes=("cat", "dog"), per_class=4)
    make = (lambda out: finetune.FinetuneConfig(data, out_dir=out, weights="none", **TINY_NET)) if stage == "finetune" else (
        lambda out: scratch.ScratchConfig(data, out_dir=out, filters=(4, 4, 4), dense=4, **TINY_NET))
    module = finetune if stage == "finetune" else scratch
    with pytest.raises(PipelineError, match=r"is inside the training images .*data"):
        module.run(make(data / "dog" / "out"))
    assert not (data / "dog" / "out").exists()
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out / f"{stage}.keras"):  # another run holds this output
        with pytest.raises(PipelineError, match=rf"{stage}\.keras\.lock: another run is writing this output"):
            module.run(make(out))
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written beside the other run's files


def test_train_refuses_a_class_without_training_rows(tmp_path):
    feats = make_features(tmp_path / "f.h5", per_class=[20, 20, 0])  # every image of "cat" rejected at extraction, say
    with pytest.raises(PipelineError, match=r"f\.h5: class 'cat' has no training rows \(were all its images rejected\?\)"):
        train.run(train.TrainConfig(features=feats, output=tmp_path / "m", quiet=True, **FAST_GRID["lr"]))


@pytest.mark.parametrize("argv", [["compare", "--data", "{data}", "--weights", "none", "--input-size", "32", "--strategies", "lr", "--quiet"],
                                  ["bench", "--data", "{data}", "--quiet"]])  # fmt: skip
def test_compare_and_bench_hold_their_output_for_the_whole_run(argv, tmp_path, capsys):
    """#22: compare and bench took a lock only to publish their tables: two runs on one -o raced on the rows."""
    from pipeline.cli import main

    root = tmp_path / "data"
    make_tree(root / "train", classes=("a", "b"), per_class=4, size=(24, 24))
    make_tree(root / "test", classes=("a", "b"), per_class=2, size=(24, 24))
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out / argv[0]):  # another run of the same command on this -o
        assert main([a.format(data=root) for a in argv] + ["-o", str(out)]) == 2
    assert f"{out}/{argv[0]}.lock: another run is writing this output" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written beside the other run's files


@pytest.mark.parametrize("inside", [".", "train", "train/a"])
def test_compare_refuses_an_output_inside_its_data_folder_before_any_work(inside, tmp_path, capsys):
    """Third adversarial pass (#22): compare -o DATA/train left an empty DATA/train/models (a class folder with no image) before extract refused."""
    from pipeline.cli import main

    root = tmp_path / "data"
    make_tree(root / "train", classes=("a", "b"), per_class=4, size=(24, 24))
    make_tree(root / "test", classes=("a", "b"), per_class=2, size=(24, 24))
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    out = root / inside
    assert main(["compare", "--data", str(root), "-o", str(out), "--weights", "none", "--input-size", "32", "--strategies", "lr", "--quiet"]) == 2
    assert f"is inside the data folder {root} (its files would be read as images there next time); choose another -o folder" in capsys.readouterr().err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
