"""Compare: the table from real (tiny) runs of every strategy with each row's training and validation rows, collection of existing results, and the same-test-set check."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from conftest import make_tree
from pipeline.cli import main
from pipeline.compare.stage import COLUMNS, assemble_table, chart_label, to_csv, to_markdown
from pipeline.core.errors import PipelineError


@pytest.mark.slow
def test_compare_runs_every_strategy_and_writes_table_chart(tmp_path, capsys):
    root = tmp_path / "data"
    make_tree(root / "train", classes=("a", "b"), per_class=8, size=(24, 24))
    make_tree(root / "test", classes=("a", "b"), per_class=3, size=(24, 24))
    out = tmp_path / "out"
    argv = ["compare", "--data", str(root), "-o", str(out), "--weights", "none", "--input-size", "32", "--unfreeze", "block5_conv1,block4_conv1",
            "--scratch-input-size", "32", "--epochs", "1", "--head-epochs", "1", "--scratch-epochs", "1",
            "--resnet-depth", "8", "--resnet-input-size", "16", "--resnet-epochs", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    assert [r["strategy"] for r in rows] == [
        "from scratch CNN",
        "from scratch ResNet-8",
        "frozen features + logistic regression",
        "frozen features + linear SVM",
        "frozen features + random forest",
        "frozen base + dense head",
        "finetune, dense head from random (from block5_conv1)",
        "logistic-regression probe (LP-FT's start)",
        "LP-FT (from block5_conv1)",
        "LP-FT (from block4_conv1)",
    ]
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and 0.0 <= float(r["macro_f1"]) <= 1.0
        assert float(r["train_seconds"]) > 0 and float(r["images_per_second"]) > 0 and int(r["model_bytes"]) > 0
    # every row says what it was fitted on: the 16 training images, split 80/20 for the networks' early stopping
    counts = {r["strategy"]: (int(r["n_train"]), int(r["n_val"])) for r in rows}
    nets = [s for s in counts if not s.startswith(("frozen features", "logistic"))]
    n_fit, n_val = counts["LP-FT (from block5_conv1)"]
    assert n_val > 0 and n_fit + n_val == 16 and all(counts[s] == (n_fit, n_val) for s in nets)
    assert all(counts[s] == (16, 0) for s in counts if s.startswith("frozen features"))
    assert counts["logistic-regression probe (LP-FT's start)"] == (n_fit, 0)  # the fine-tuning's training rows only
    saved = json.loads((out / "compare.json").read_text())
    assert [(r["n_train"], r["n_val"]) for r in saved] == list(counts.values())
    md = (out / "compare.md").read_text()
    assert "Every row scored on the same 6 test images" in md and f"| LP-FT (from block4_conv1) | " in md
    assert f"| {n_fit} | {n_val} |" in md and "| 16 | 0 |" in md
    assert "| frozen features + linear SVM |" in printed
    assert Image.open(out / "compare.png").size[0] > 100

    # a second run collects what exists instead of training again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "models").rglob("*.metrics.json")}
    assert len(stamps) == 9
    resnet = json.loads((out / "models" / "scratch-resnet" / "scratch.metrics.json").read_text())
    assert (resnet["arch"], resnet["depth"], resnet["input_size"], resnet["epochs_run"]) == ("resnet", 8, 16, 1)
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # ... unless a row's settings changed: only that row trains again
    assert main([*argv[:-1], "--epochs", "2", "--strategies", "lr,finetune-dense", "--quiet"]) == 0
    changed = {p for p in stamps if p.stat().st_mtime_ns != stamps[p]}
    assert changed == {out / "models" / "finetune-dense" / "finetune.metrics.json"}


def _row(name, n_test, acc=0.5, n_train=8, n_val=2):
    return {"strategy": name, "accuracy": acc, "macro_f1": acc, "n_train": n_train, "n_val": n_val, "train_seconds": 1.0,
            "images_per_second": 2.0, "model_bytes": 3, "n_test": n_test}  # fmt: skip


def test_rows_scored_on_different_test_sets_are_refused():
    with pytest.raises(PipelineError, match=r"different test sets .*'a': 10, 'b': 9"):
        assemble_table([_row("a", 10), _row("b", 9)])


def test_a_row_without_its_training_and_validation_rows_is_refused():
    row = _row("old", 5)
    del row["n_val"]
    with pytest.raises(PipelineError, match=r"row 'old' does not say how many training and validation images it used"):
        assemble_table([_row("x", 5), row])


def test_table_formats():
    rows = assemble_table([_row("x", 5, 0.875), _row("y", 5, 0.5, n_train=10, n_val=0)])
    assert to_csv(rows).splitlines() == [
        "strategy,accuracy,macro_f1,n_train,n_val,train_seconds,images_per_second,model_bytes",
        "x,0.8750,0.8750,8,2,1.0000,2.0000,3",
        "y,0.5000,0.5000,10,0,1.0000,2.0000,3",
    ]
    assert "| x | 0.8750 | 0.8750 | 8 | 2 | 1 | 2.0 | 0.0 |" in to_markdown(rows)
    assert chart_label(rows[1]) == "y\n10 train + 0 val, 1 s"


def test_unknown_strategy_and_missing_split_are_clear(tmp_path, capsys):
    make_tree(tmp_path / "d" / "train")
    assert main(["compare", "--data", str(tmp_path / "d"), "--strategies", "lr,magic"]) == 2
    assert "unknown strategy 'magic'" in capsys.readouterr().err
    assert main(["compare", "--data", str(tmp_path / "d")]) == 2
    assert "test: missing" in capsys.readouterr().err
    make_tree(tmp_path / "d" / "test")
    assert main(["compare", "--data", str(tmp_path / "d"), "--unfreeze", "block5_conv1,block9_conv1"]) == 2
    assert "--unfreeze block9_conv1: not a VGG16 layer" in capsys.readouterr().err
    assert main(["compare", "--data", str(tmp_path / "d"), "--resnet-depth", "21"]) == 2
    assert capsys.readouterr().err == "error: --resnet-depth 21: a CIFAR ResNet has 6n+2 layers (8, 14, 20, 32, 44, 56, 110, ...)\n"
