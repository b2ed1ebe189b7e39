"""compare --sizes: nested seeded subsets as link trees, features extracted once for the largest size, one row per size and strategy, the table and chart."""

from __future__ import annotations

import csv
import json
import os

import pytest
from PIL import Image

from conftest import make_tree
from pipeline.cli import main
from pipeline.core.errors import PipelineError
from pipeline.compare.config import check_sizes
from pipeline.compare.sizes import nested_subsets, table


def test_subsets_are_nested_seeded_and_balanced(tmp_path):
    make_tree(tmp_path / "train", classes=("a", "b", "c"), per_class=7, size=(8, 8))
    subsets = nested_subsets(tmp_path / "train", (2, 5, 7), seed=0)
    assert [len(subsets[n]) for n in (2, 5, 7)] == [6, 15, 21]
    assert set(subsets[2]) < set(subsets[5]) < set(subsets[7])
    for n in (2, 5):
        assert sorted(p.split("/")[0] for p in subsets[n]) == sorted(["a", "b", "c"] * n)
    assert nested_subsets(tmp_path / "train", (2, 5, 7), seed=0) == subsets
    assert nested_subsets(tmp_path / "train", (2, 5, 7), seed=1)[2] != subsets[2]


def test_a_size_over_a_class_is_refused(tmp_path):
    make_tree(tmp_path / "train", classes=("a", "b"), per_class=3, size=(8, 8))
    with pytest.raises(PipelineError, match=r"^--sizes 4: class 'a' of .*train has only 3 images$"):
        nested_subsets(tmp_path / "train", (2, 4), seed=0)
    make_tree(tmp_path / "d" / "train", classes=("a", "b"), per_class=3, size=(8, 8))
    make_tree(tmp_path / "d" / "test", classes=("a", "b"), per_class=2, size=(8, 8))
    out = tmp_path / "out"
    argv = ["compare", "--data", str(tmp_path / "d"), "-o", str(out), "--weights", "none", "--input-size", "32", "--strategies", "lr", "--sizes", "3,5", "--quiet"]
    assert main(argv) == 2
    assert not out.exists()  # the refused run's -o is not left behind empty (fifteenth pass)
    out.mkdir()
    assert main(argv) == 2 and out.is_dir()  # one the user made stays


@pytest.mark.parametrize("sizes, strategies, message", [
    ((0, 5), ("lr",), r"--sizes 0,5: every size must be a whole number"),
    ((2, 5), ("lr",), r"--sizes 2,5: every size must be a whole number of training images per class, at least 3 \(the frozen-feature rows' 3-fold search"),
    ((5, 5), ("lr",), r"--sizes 5,5: a size is repeated"),
    ((5,), ("probe",), r"--sizes: strategy 'probe' cannot be drawn"),
])  # fmt: skip
def test_bad_sizes_are_refused(sizes, strategies, message):
    with pytest.raises(PipelineError, match=message):
        check_sizes(sizes, strategies)


def test_bad_sizes_flag_is_one_error_line(tmp_path, capsys):
    make_tree(tmp_path / "d" / "train")
    make_tree(tmp_path / "d" / "test")
    with pytest.raises(SystemExit) as stop:  # every list flag: each value once (core.config.ListOf)
        main(["compare", "--data", str(tmp_path / "d"), "--sizes", "3,3", "--strategies", "lr"])
    assert stop.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith("argument --sizes: '3,3': lists 3 twice; name each of the whole numbers (e.g. 100,300,500) once")


def test_table_has_one_column_per_size():
    rows = [{"strategy": "x", "per_class": 5, "accuracy": 0.5}, {"strategy": "x", "per_class": 8, "accuracy": 0.75}]
    assert table(rows, (5, 8)) == "| strategy | 5/class | 8/class |\n|---|---:|---:|\n| x | 0.5000 | 0.7500 |\n"
    rows[1].update(ci_low=0.7, ci_high=0.8, status="tied")
    assert table(rows, (5, 8)).splitlines()[-1] == "| x | 0.5000 | 0.7500 [0.700, 0.800] * |"


@pytest.mark.slow
def test_compare_sizes_runs_each_strategy_at_each_size(tmp_path, capsys):
    root = tmp_path / "data"
    make_tree(root / "train", classes=("a", "b"), per_class=9, size=(24, 24))
    make_tree(root / "test", classes=("a", "b"), per_class=3, size=(24, 24))
    out = tmp_path / "out"
    argv = ["compare", "--data", str(root), "-o", str(out), "--weights", "none", "--input-size", "32", "--sizes", "8,5",
            "--strategies", "scratch-resnet,lr", "--resnet-depth", "8", "--resnet-input-size", "16", "--resnet-epochs", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    with open(out / "sizes.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["strategy"], r["per_class"]) for r in rows] == [
        ("from scratch ResNet-8", "5"), ("frozen features + logistic regression", "5"),
        ("from scratch ResNet-8", "8"), ("frozen features + logistic regression", "8"),
    ]  # fmt: skip
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        n = int(r["per_class"])
        # every final model saw the size's 2n images; the network chose its epochs on validation rows held out of them first
        assert int(r["n_train"]) == 2 * n and (int(r["n_val"]) == 0) == r["strategy"].startswith("frozen")
        assert float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"]) and r["status"] in ("best", "tied", "different")
    # the link trees: nested, the test tree shared
    small = {p.relative_to(out / "sizes" / "5" / "train") for p in (out / "sizes" / "5" / "train").rglob("*.png")}
    large = {p.relative_to(out / "sizes" / "8" / "train") for p in (out / "sizes" / "8" / "train").rglob("*.png")}
    assert len(small) == 10 and len(large) == 16 and small < large
    assert os.path.realpath(out / "sizes" / "5" / "test") == os.path.realpath(root / "test")
    # features extracted once, for the largest size (and the test tree)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.h5")) == ["sizes/8/train.h5", "test.h5"]
    saved = json.loads((out / "sizes.json").read_text())
    assert {r["n_test"] for r in saved} == {6}
    md = (out / "sizes.md").read_text()
    assert "| from scratch ResNet-8 |" in md and "- 5/class: best: " in md and "- 8/class: best: " in md
    assert Image.open(out / "sizes.png").size[0] > 100
    assert "| frozen features + logistic regression |" in capsys.readouterr().out


def test_compare_sizes_with_a_frozen_feature_row_first(tmp_path, monkeypatch):
    """The classical row runs before any network made the models folder: it makes its own. The training file's images are
    stat-ed once for every size and classical strategy (a review finding: once per row and size)."""
    import pipeline.classical.overlap as overlap

    read, row_files = [], overlap.row_files
    monkeypatch.setattr(overlap, "row_files", lambda ff: read.append(ff.path) or row_files(ff))
    root = tmp_path / "data"
    make_tree(root / "train", classes=("a", "b"), per_class=9, size=(24, 24))
    make_tree(root / "test", classes=("a", "b"), per_class=3, size=(24, 24))
    argv = ["compare", "--data", str(root), "-o", str(tmp_path / "out"), "--weights", "none", "--input-size", "32", "--sizes", "8,5", "--strategies", "lr,svm", "--quiet"]
    assert main(argv) == 0
    with open(tmp_path / "out" / "sizes.csv") as f:
        assert [r["per_class"] for r in csv.DictReader(f)] == ["5", "5", "8", "8"]
    assert len(read) == 1  # four rows, one reading


def test_a_frozen_feature_row_at_a_size_does_not_depend_on_the_order_of_the_rows(tmp_path):
    """A size's rows are picked by path and fitted in path order: the same row from a file storing them in another order (issue 22)."""
    import h5py
    import numpy as np

    from pipeline.compare.config import CompareConfig
    from pipeline.compare.rows import classical_row
    from pipeline.featurefile.schema import VERSION_COLUMNS

    root = tmp_path / "data"
    make_tree(root / "train", classes=("a", "b", "c"), per_class=8, size=(12, 12))
    make_tree(root / "test", classes=("a", "b", "c"), per_class=3, size=(12, 12))
    fast = ["--weights", "none", "--input-size", "32", "--quiet"]
    a, test = tmp_path / "a.h5", tmp_path / "test.h5"
    assert main(["extract", str(root / "train"), "-o", str(a), *fast]) == 0 and main(["extract", str(root / "test"), "-o", str(test), *fast]) == 0
    b = tmp_path / "b.h5"
    b.write_bytes(a.read_bytes())
    with h5py.File(b, "r+") as db:  # every row column follows its rows
        perm = np.random.default_rng(3).permutation(len(db["labels"]))
        for name in ("features", "labels", "paths", *VERSION_COLUMNS):
            db[name][...] = db[name][:][perm]
    assert main(["verify", str(b)]) == 0
    config = CompareConfig(data_root=root, output=tmp_path / "out", weights="none", input_size=32, quiet=True)
    subset = nested_subsets(root / "train", (6,), seed=0)[6]
    ra, rb = (classical_row(config, "lr", f, test, train_paths=subset, folder=tmp_path / f.stem) for f in (a, b))
    keys = ("accuracy", "macro_f1", "best_params", "n_train", "n_test", "predictions")
    assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys} and ra["n_train"] == 18


def test_compare_features_of_other_settings_give_compares_advice(tmp_path, capsys):
    """Fifth pass (#22): compare --input-size 48 on a -o holding 32-pixel features said "pass --overwrite", a flag compare does not have."""
    make_tree(tmp_path / "d" / "train", per_class=4)
    make_tree(tmp_path / "d" / "test", per_class=3)
    argv = ["compare", "--data", str(tmp_path / "d"), "-o", str(tmp_path / "o"), "--weights", "none", "--strategies", "lr", "--quiet"]
    assert main(argv + ["--input-size", "32"]) == 0
    assert main(argv + ["--input-size", "48"]) == 2
    err = capsys.readouterr().err
    assert "compare keeps its features there: remove that file to extract again with these settings, or choose another -o" in err and "--overwrite" not in err


def test_too_few_images_in_a_class_give_compares_advice_not_train_s(tmp_path, capsys):
    """Seventeenth pass: a class with 2 training images made compare say "lower --cv or add rows", and compare has no --cv."""
    make_tree(tmp_path / "d" / "train", classes=("a", "b"), per_class=4)
    for extra in ("002.png", "003.png"):
        (tmp_path / "d" / "train" / "a" / extra).unlink()
    make_tree(tmp_path / "d" / "test", classes=("a", "b"), per_class=2)
    argv = ["compare", "--data", str(tmp_path / "d"), "-o", str(tmp_path / "o"), "--weights", "none", "--input-size", "32", "--strategies", "lr", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "train.h5: class 'a' has 2 distinct training images but the frozen-feature rows' 3-fold search needs at least that many per class; add images" in err
    assert "--cv" not in err and err.count("\n") == 1


def test_what_a_user_put_in_the_sizes_tree_is_one_line_and_kept(tmp_path):
    """Ninth pass (#22): a plain file where a link of OUT/sizes/N/train belongs, or a folder at OUT/sizes/N/test, was a FileExistsError traceback."""
    from pipeline.compare.sizes import link_tree

    data = tmp_path / "d"
    make_tree(data / "train", classes=("a", "b"), per_class=3)
    make_tree(data / "test", classes=("a", "b"), per_class=2)
    paths = ["a/000.png", "b/000.png"]
    link_tree(tmp_path / "s", data / "train", data / "test", paths)
    (tmp_path / "s" / "train" / "a" / "000.png").unlink()
    (tmp_path / "s" / "train" / "a" / "000.png").write_text("my note")
    with pytest.raises(PipelineError, match=r"s/train/a/000\.png: is not a link compare made \(its --sizes tree holds only links"):
        link_tree(tmp_path / "s", data / "train", data / "test", paths)
    assert (tmp_path / "s" / "train" / "a" / "000.png").read_text() == "my note"
    (tmp_path / "t" / "test").mkdir(parents=True)
    (tmp_path / "t" / "test" / "mine.txt").write_text("keep")
    with pytest.raises(PipelineError, match=r"t/test: is not a link compare made"):
        link_tree(tmp_path / "t", data / "train", data / "test", paths)
    assert (tmp_path / "t" / "test" / "mine.txt").read_text() == "keep"
    (tmp_path / "u" / "train").mkdir(parents=True)
    (tmp_path / "u" / "train" / "a").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    link_tree(tmp_path / "u", data / "train", data / "test", paths)  # a linked folder is a link the tree does not want: removed, never written through
    assert not any((tmp_path / "elsewhere").iterdir()) and not (tmp_path / "u" / "train" / "a").is_symlink()
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "train").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(PipelineError, match=r"v/train: is not a link compare made"):
        link_tree(tmp_path / "v", data / "train", data / "test", paths)
    assert not any((tmp_path / "elsewhere").iterdir())


def test_sizes_with_a_file_name_that_is_not_utf8(tmp_path):
    """Ninth pass (#22): a training image named with a byte that is not UTF-8 was a UnicodeEncodeError traceback under --sizes (the subset's key)."""
    root = tmp_path / "data"
    make_tree(root / "train", classes=("a", "b"), per_class=4, size=(24, 24))
    make_tree(root / "test", classes=("a", "b"), per_class=2, size=(24, 24))
    os.rename(os.fsencode(root / "train" / "a" / "000.png"), os.fsencode(root / "train" / "a") + b"/caf\xe9.png")
    argv = ["compare", "--data", str(root), "-o", str(tmp_path / "out"), "--weights", "none", "--input-size", "32", "--sizes", "3,4", "--strategies", "lr", "--quiet"]
    assert main(argv) == 0
    assert main(argv) == 0  # reused: the same key
    with open(tmp_path / "out" / "sizes.csv") as f:
        assert [r["per_class"] for r in csv.DictReader(f)] == ["3", "4"]
