"""Compare: the table from real (tiny) runs of every strategy, every final model fitted on the same training images, intervals and paired tests, collection of existing results keyed on their inputs, --repeats, --backbones, and the same-test-set check."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from conftest import make_tree, write_image
from pipeline.cli import main
from pipeline.compare.stage import COLUMNS, assemble_table, chart_label, to_csv, to_markdown
from pipeline.compare.verdicts import judged, summary_line
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
    # every final model saw the same 16 training images; the networks chose their epochs on validation rows held out of them first
    counts = {r["strategy"]: (int(r["n_train"]), int(r["n_val"])) for r in rows}
    nets = [s for s in counts if not s.startswith(("frozen features", "logistic"))]
    n_val = counts["LP-FT (from block5_conv1)"][1]
    assert n_val > 0 and all(counts[s] == (16, n_val) for s in nets)
    assert all(counts[s] == (16, 0) for s in counts if not s in nets)  # frozen features and the probe: cross-validated within the 16
    for r in rows:  # each row: its interval around its accuracy, its paired p-value against the best, its status
        assert float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"]) and 0 <= float(r["p_value"]) <= 1
        assert r["status"] in ("best", "tied", "different")
    assert [r["status"] for r in rows].count("best") == 1
    saved = json.loads((out / "compare.json").read_text())
    assert [(r["n_train"], r["n_val"]) for r in saved] == list(counts.values())
    md = (out / "compare.md").read_text()
    assert "Every row scored on the same 6 test images" in md and "| LP-FT (from block4_conv1) | " in md and "Nothing is chosen on the test images" in md
    assert f"| 16 | {n_val} | {n_val} val rows, then refit |" in md and "| 16 | 0 | 3-fold CV on the train rows |" in md
    best = next(r["strategy"] for r in rows if r["status"] == "best")
    assert f"best: {best}; tied: " in md and f"best: {best}; tied: " in printed
    assert "| frozen features + linear SVM |" in printed
    assert Image.open(out / "compare.png").size[0] > 100

    # a second run collects what exists instead of training again
    stamps = {p: p.stat().st_mtime_ns for p in [*(out / "models").rglob("*.metrics.json"), *(out / "models").glob("*.row.json")]}
    assert len(stamps) == 9  # 6 networks, 3 frozen-feature rows
    resnet = json.loads((out / "models" / "scratch-resnet" / "scratch.metrics.json").read_text())
    assert (resnet["arch"], resnet["depth"], resnet["input_size"], resnet["epochs_run"]) == ("resnet", 8, 16, 1)
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # ... unless a row's settings changed: only that row trains again
    assert main([*argv[:-1], "--epochs", "2", "--strategies", "lr,finetune-dense", "--quiet"]) == 0
    changed = {p for p in stamps if p.stat().st_mtime_ns != stamps[p]}
    assert changed == {out / "models" / "finetune-dense" / "finetune.metrics.json"}
    # ... or its images changed (issue #22): a replaced training image re-extracts and refits the frozen-feature row
    lr = json.loads((out / "models" / "lr.row.json").read_text())
    write_image(root / "train" / "a" / "000.png", size=(24, 24), seed=99)
    assert main([*argv[:-1], "--strategies", "lr,scratch", "--quiet"]) == 0
    again = json.loads((out / "models" / "lr.row.json").read_text())
    assert again["key"]["train"] != lr["key"]["train"] and again["key"]["test"] == lr["key"]["test"]
    scratch_metrics = out / "models" / "scratch" / "scratch.metrics.json"
    assert scratch_metrics.stat().st_mtime_ns != stamps[scratch_metrics]  # the network trains again on the new images


def _row(name, n_test, acc=0.5, n_train=8, n_val=2, correct=None):
    correct = round(acc * n_test) if correct is None else correct
    y_pred = [0] * correct + [1] * (n_test - correct)
    return {"strategy": name, "accuracy": acc, "macro_f1": acc, "n_train": n_train, "n_val": n_val, "chosen_by": "2 val rows, then refit",
            "train_seconds": 1.0, "images_per_second": 2.0, "model_bytes": 3, "n_test": n_test, "seed_accuracies": [acc], "accuracy_sd": None,
            "predictions": {"paths": [f"c/{i}.png" for i in range(n_test)], "y_true": [0] * n_test, "y_pred": y_pred}}  # fmt: skip


def test_rows_scored_on_different_test_sets_are_refused():
    with pytest.raises(PipelineError, match=r"different test sets .*'a': 10, 'b': 9"):
        assemble_table([_row("a", 10), _row("b", 9)])
    other = _row("b", 10)
    other["predictions"]["paths"][3] = "c/elsewhere.png"
    with pytest.raises(PipelineError, match=r"row 'b' was scored on other test images than 'a' \(e.g. c/3.png\)"):
        judged([_row("a", 10), other])


def test_a_row_without_its_training_and_validation_rows_is_refused():
    row = _row("old", 5)
    del row["n_val"]
    with pytest.raises(PipelineError, match=r"row 'old' does not say how many training and validation images it used"):
        assemble_table([_row("x", 5), row])


def test_rows_are_paired_by_test_image_and_judged_against_the_best():
    # 20 images: x right on all, y wrong on 2 (p = 0.5, tied), z wrong on 10 (p = 2/1024, different); z lists its images in reverse
    z = _row("z", 20, 0.5)
    z["predictions"] = {k: v[::-1] for k, v in z["predictions"].items()}
    rows = judged(assemble_table([_row("x", 20, 1.0), _row("y", 20, 0.9), z]))
    assert [(r["status"], round(r["p_value"], 6)) for r in rows] == [("best", 1.0), ("tied", 0.5), ("different", round(2 / 1024, 6))]
    assert rows[2]["discordant"] == [0, 10] and summary_line(rows) == "best: x; tied: y"
    low, high = rows[1]["ci_low"], rows[1]["ci_high"]
    assert (round(low, 4), round(high, 4)) == (0.6990, 0.9721)  # Wilson, 18 of 20


def test_table_formats():
    rows = judged(assemble_table([_row("x", 8, 0.875), _row("y", 8, 0.5, n_train=10, n_val=0)]))
    lines = to_csv(rows).splitlines()
    assert lines[0] == ",".join(COLUMNS)
    assert lines[1].startswith("x,0.8750,") and ",best,0.8750,8,2,\"2 val rows, then refit\",1.0000,2.0000,3,,0.8750" in lines[1]
    assert lines[2].startswith("y,0.5000,") and ",0.25,different," not in lines[2] and ",tied," in lines[2]  # 3 discordant, all one way: p = 0.25
    md = to_markdown(rows)
    assert "| x | 0.8750 | [0.529, 0.978] |  | best | 0.8750 | 8 | 2 | 2 val rows, then refit | 1 | 2.0 | 0.0 |" in md
    assert "| y | 0.5000 | [0.215, 0.785] | 0.25 | yes |" in md
    assert chart_label(rows[1]) == "y\n10 train rows, 0 val rows, 1 s"


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


@pytest.fixture
def tiny(tmp_path):
    root = tmp_path / "data"
    make_tree(root / "train", classes=("a", "b"), per_class=8, size=(24, 24))
    make_tree(root / "test", classes=("a", "b"), per_class=3, size=(24, 24))
    return root, tmp_path / "out"


@pytest.mark.slow
def test_repeats_train_every_network_row_once_per_seed(tiny, capsys):
    root, out = tiny
    argv = ["compare", "--data", str(root), "-o", str(out), "--weights", "none", "--input-size", "32", "--strategies", "scratch,lr",
            "--scratch-input-size", "16", "--scratch-epochs", "1", "--repeats", "2", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    rows = {r["strategy"]: r for r in json.loads((out / "compare.json").read_text())}
    cnn = rows["from scratch CNN"]
    seeds = [json.loads((out / "models" / folder / "scratch.metrics.json").read_text()) for folder in ("scratch", "scratch-seed1")]
    assert [m["seed"] for m in seeds] == [0, 1] and cnn["seeds"] == [0, 1]
    assert cnn["seed_accuracies"] == [m["accuracy"] for m in seeds] and cnn["accuracy"] == pytest.approx(sum(cnn["seed_accuracies"]) / 2)
    assert cnn["accuracy_sd"] == pytest.approx(abs(seeds[0]["accuracy"] - seeds[1]["accuracy"]) / 2**0.5)
    lr = rows["frozen features + logistic regression"]
    assert lr["seeds"] == [0] and lr["accuracy_sd"] is None  # a frozen-feature row is fitted once
    md = (out / "compare.md").read_text()
    assert "2 seeds (0..1) per network row" in md and "each seed" in md
    assert ", ".join(f"{a:.4f}" for a in cnn["seed_accuracies"]) in md
    assert "best: " in capsys.readouterr().out


@pytest.mark.slow
def test_backbones_add_one_frozen_feature_row_each_on_the_same_test_images(tiny):
    root, out = tiny
    argv = ["compare", "--data", str(root), "-o", str(out), "--weights", "none", "--input-size", "32", "--strategies", "svm",
            "--backbones", "vgg16,resnet50", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((out / "compare.json").read_text())
    assert [r["strategy"] for r in rows] == ["frozen features + linear SVM", "frozen features + logistic regression",
                                             "frozen resnet50 features + logistic regression"]  # fmt: skip
    assert {r["n_test"] for r in rows} == {6} and all(r["n_train"] == 16 for r in rows)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.h5")) == ["resnet50/test.h5", "resnet50/train.h5", "test.h5", "train.h5"]
    assert all("p_value" in r and r["ci_low"] <= r["accuracy"] <= r["ci_high"] for r in rows)


def test_a_backbone_without_weights_names_the_file_and_weights_flag(tiny, tmp_path, monkeypatch, capsys):
    from pipeline.backbones import weights

    root, out = tiny
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(weights, "_keras_download", lambda *a, **k: (None, "offline"))
    assert main(["compare", "--data", str(root), "-o", str(out), "--strategies", "lr", "--backbones", "resnet50", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in err and "--weights PATH" in err
    assert not out.exists()  # refused before any work


def test_an_output_that_is_a_file_is_one_line_before_any_work(tmp_path, capsys):
    make_tree(tmp_path / "d" / "train")
    make_tree(tmp_path / "d" / "test")
    (tmp_path / "afile").write_text("mine")
    assert main(["compare", "--data", str(tmp_path / "d"), "-o", str(tmp_path / "afile"), "--weights", "none", "--input-size", "32", "--strategies", "lr"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "afile: exists and is not a folder" in err
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_damaged_stored_row_is_computed_again_not_a_traceback(tmp_path, capsys):
    make_tree(tmp_path / "d" / "train", per_class=4)
    make_tree(tmp_path / "d" / "test", per_class=2)
    argv = ["compare", "--data", str(tmp_path / "d"), "-o", str(tmp_path / "out"), "--weights", "none", "--input-size", "32", "--strategies", "lr", "--quiet"]
    assert main(argv) == 0
    record = tmp_path / "out" / "models" / "lr.row.json"
    first = json.loads(record.read_text())["row"]["accuracy"]
    record.write_bytes(b'{"key": [trunc')
    capsys.readouterr()
    assert main(argv) == 0
    assert "lr.row.json: unreadable" in capsys.readouterr().err
    assert json.loads(record.read_text())["row"]["accuracy"] == first  # the same fit again, stored whole


def _tiny_compare(tmp_path, per_class: int, strategies: str, *flags: str):
    """A first compare run of ``strategies`` on a tiny tree (``per_class`` training images of 24x24); its output folder and argv."""
    make_tree(tmp_path / "d" / "train", per_class=per_class, size=(24, 24))
    make_tree(tmp_path / "d" / "test", per_class=2, size=(24, 24))
    out = tmp_path / "out"
    argv = ["compare", "--data", str(tmp_path / "d"), "-o", str(out), "--weights", "none", "--input-size", "32", "--strategies", strategies, *flags, "--quiet"]
    assert main(argv) == 0
    return out, argv


def test_a_hand_edited_stored_row_or_network_metrics_file_is_never_reused(tmp_path, capsys):
    """Ninth pass (#22): compare reused a network row from a finetune.metrics.json whose accuracy had been edited by hand (its set's
    receipt no longer matched: LP-FT 0.990 in the table, 0.467 by its own predictions), and a classical row.json edited the same way."""
    out, argv = _tiny_compare(tmp_path, 4, "lr,scratch", "--scratch-input-size", "16", "--scratch-epochs", "1")
    first = {r["strategy"]: r["accuracy"] for r in json.loads((out / "compare.json").read_text())}
    record = out / "models" / "lr.row.json"
    stored = json.loads(record.read_text())
    stored["row"]["accuracy"] = 0.99  # the key left as it was
    record.write_text(json.dumps(stored))
    capsys.readouterr()
    assert main(argv) == 0
    assert f"note: {record}: not the row compare wrote (edited since" in capsys.readouterr().err
    assert {r["strategy"]: r["accuracy"] for r in json.loads((out / "compare.json").read_text())} == first
    metrics = out / "models" / "scratch" / "scratch.metrics.json"
    edited = json.loads(metrics.read_text())
    edited["accuracy"] = 0.99
    metrics.write_text(json.dumps(edited))
    assert main(argv) == 2  # trained again, and the edited file is not the set's to replace: one line, the table as it was
    err = capsys.readouterr().err
    assert "scratch.metrics.json: not as its scratch run wrote it (edited since); training this row again" in err
    assert "scratch.metrics.json: is not a file this tool wrote here" in err
    assert {r["strategy"]: r["accuracy"] for r in json.loads((out / "compare.json").read_text())} == first


def test_an_output_folder_that_leads_into_the_data_is_refused_before_any_work(tmp_path, capsys):
    """Ninth pass (#22): with OUT/models a link to a class folder of the data, compare wrote lr.row.json there (the next extract
    rejected it as an image of that class)."""
    make_tree(tmp_path / "d" / "train", per_class=4)
    make_tree(tmp_path / "d" / "test", per_class=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "models").symlink_to(tmp_path / "d" / "train" / "cat")
    before = sorted(p.name for p in (tmp_path / "d" / "train" / "cat").iterdir())
    assert main(["compare", "--data", str(tmp_path / "d"), "-o", str(tmp_path / "out"), "--weights", "none", "--input-size", "32", "--strategies", "lr"]) == 2
    assert "out/models: is inside the data folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "d" / "train" / "cat").iterdir()) == before and not (tmp_path / "out" / "train.h5").exists()


def test_a_probe_or_weights_changed_since_the_lpft_run_are_never_reused(tmp_path, capsys, monkeypatch):
    """Tenth pass (#22): compare scored a probe bundle copied in from another run (its notes said the LP-FT run fitted it), and reused
    a network row after the weights file it was trained from had changed (the metrics named the old checksum)."""
    from pipeline.compare import rows

    out, argv = _tiny_compare(tmp_path, 6, "probe", "--epochs", "1", "--head-epochs", "1")
    table = (out / "compare.md").read_bytes()
    probe = next(out.glob("models/lpft-*/finetune.probe.joblib"))
    good = probe.read_bytes()
    probe.write_bytes(good + b"\0")  # another probe in its place
    capsys.readouterr()
    assert main(argv) == 2
    assert "finetune.probe.joblib: not the probe its LP-FT run wrote (replaced or changed since)" in capsys.readouterr().err
    assert (out / "compare.md").read_bytes() == table
    probe.write_bytes(good)
    monkeypatch.setattr(rows.Inputs, "weights", lambda self, spec, backbone: "0123abcd")  # the same path now holds other weights
    assert main(argv) == 0
    assert "trained from other weights than none holds now; training this row again" in capsys.readouterr().err
