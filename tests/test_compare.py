"""Compare: the table from real (tiny) runs of every strategy, collection of existing results, and the same-test-set check."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from conftest import make_tree
from pipeline.cli import main
from pipeline.compare import COLUMNS, assemble_table, to_csv, to_markdown
from pipeline.core.errors import PipelineError


@pytest.mark.slow
def test_compare_runs_every_strategy_and_writes_table_chart(tmp_path, capsys):
    root = tmp_path / "data"
    make_tree(root / "train", classes=("a", "b"), per_class=8, size=(24, 24))
    make_tree(root / "test", classes=("a", "b"), per_class=3, size=(24, 24))
    out = tmp_path / "out"
    argv = ["compare", "--data", str(root), "-o", str(out), "--weights", "none", "--input-size", "32",
            "--scratch-input-size", "32", "--epochs", "1", "--head-epochs", "1", "--scratch-epochs", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    assert [r["strategy"] for r in rows] == [
        "from scratch CNN",
        "frozen features + logistic regression",
        "frozen features + linear SVM",
        "frozen features + random forest",
        "frozen base + dense head",
        "finetune (from block5_conv1)",
    ]
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and 0.0 <= float(r["macro_f1"]) <= 1.0
        assert float(r["train_seconds"]) > 0 and float(r["images_per_second"]) > 0 and int(r["model_bytes"]) > 0
    assert "Every row scored on the same 6 test images" in (out / "compare.md").read_text()
    assert "| frozen features + linear SVM |" in printed
    assert Image.open(out / "compare.png").size[0] > 100

    # a second run collects what exists instead of training again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "models").rglob("*.metrics.json")}
    assert len(stamps) == 6
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def _row(name, n_test, acc=0.5):
    return {"strategy": name, "accuracy": acc, "macro_f1": acc, "train_seconds": 1.0, "images_per_second": 2.0,
            "model_bytes": 3, "n_test": n_test}  # fmt: skip


def test_rows_scored_on_different_test_sets_are_refused():
    with pytest.raises(PipelineError, match=r"different test sets .*'a': 10, 'b': 9"):
        assemble_table([_row("a", 10), _row("b", 9)])


def test_table_formats():
    rows = assemble_table([_row("x", 5, 0.875), _row("y", 5, 0.5)])
    assert to_csv(rows).splitlines() == [
        "strategy,accuracy,macro_f1,train_seconds,images_per_second,model_bytes",
        "x,0.8750,0.8750,1.0000,2.0000,3",
        "y,0.5000,0.5000,1.0000,2.0000,3",
    ]
    assert "| x | 0.8750 | 0.8750 | 1 | 2.0 | 0.0 |" in to_markdown(rows)


def test_unknown_strategy_and_missing_split_are_clear(tmp_path, capsys):
    make_tree(tmp_path / "d" / "train")
    assert main(["compare", "--data", str(tmp_path / "d"), "--strategies", "lr,magic"]) == 2
    assert "unknown strategy 'magic'" in capsys.readouterr().err
    assert main(["compare", "--data", str(tmp_path / "d")]) == 2
    assert "test: missing" in capsys.readouterr().err
