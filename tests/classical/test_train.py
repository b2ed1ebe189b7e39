"""Train stage: every model family end to end, the search through the stage, pooling, out-of-core streaming, the flags and their validation table, and clear errors."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import h5py
import joblib
import numpy as np
import pytest

from feature_data import CLASSES, FAST_GRID, PNG, make_features
from pipeline.classical import train
from pipeline.rows.pooling import pool_features
from pipeline.classical.models import MODELS
from pipeline.inference.predict import PredictConfig
from pipeline.classical.train import TrainConfig
from pipeline.cli import main
from pipeline.core import config as settings
from pipeline.core.errors import PipelineError
from pipeline.core.splits import split_indices


def config(features: Path, out: Path, model: str = "lr", **kw) -> TrainConfig:
    if not set(kw) & set(train.GRID_FLAGS):
        kw.update(FAST_GRID[model])
    return TrainConfig(features=features, model=model, output=out, quiet=True, **kw)


@pytest.fixture
def feats(tmp_path) -> Path:
    return make_features(tmp_path / "train.h5")


# ---------------------------------------------------------------------------
# Every model family end to end


@pytest.mark.parametrize("model", list(MODELS))
def test_model_fits_and_writes_all_outputs(model, feats, tmp_path, capsys):
    out = tmp_path / "models"
    metrics = train.run(config(feats, out, model, refit=False))  # the saved model is the scored one
    files = train.output_paths(out, model)
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in files.values()), f".{model}.set.receipt"])  # no temp files left

    bundle = joblib.load(files["bundle"])  # plain joblib, nothing of ours needed to open it
    assert bundle["format"] == "transfer-pipeline-model" and bundle["version"] == 1 and bundle["model"] == model
    assert bundle["label_names"] == list(CLASSES)
    spec = bundle["feature_spec"]
    assert spec["pool"] == "flatten" and spec["feature_shape"] == [1, 1, 512] and spec["weights_checksum"] == "none"
    assert bundle["precision"] == "float32" and bundle["metrics"]["accuracy"] == metrics["accuracy"]

    saved = json.loads(files["metrics"].read_text())
    assert saved["accuracy"] == metrics["accuracy"] > 0.9  # chance is 1/3
    assert 0.9 < saved["macro_f1"] <= 1.0
    assert set(saved["per_class"]) == set(CLASSES)
    assert saved["per_class"]["ant"]["support"] == 4  # round(0.2 * 20) of each class
    assert saved["n_train"] == 48 and saved["n_test"] == 12 and saved["mode"] == "in-memory"
    assert saved["test_source"] == {"kind": "split", "file": str(feats), "test_size": 0.2, "seed": 0}
    assert saved["best_params"] and saved["cv_score"] > 0.9 and saved["fit_seconds"] >= 0 and saved["predict_seconds"] >= 0
    assert files["confusion"].read_bytes().startswith(PNG)
    report = files["report"].read_text()
    assert all(c in report for c in CLASSES) and "macro avg" in report

    # The stored estimator takes pooled features and reproduces the reported accuracy.
    with h5py.File(feats) as db:
        x, y = db["features"][:].astype(np.float32), db["labels"][:]
    _, test = split_indices(y, 0.2, 0)
    pred = bundle["estimator"].predict(pool_features(x[test], "flatten"))
    assert np.mean(pred == y[test]) == pytest.approx(metrics["accuracy"])
    summary = capsys.readouterr().out
    assert f"{model}: test accuracy" in summary and str(files["report"]) in summary and str(files["confusion"]) in summary


def test_separate_test_file(tmp_path):
    tr = make_features(tmp_path / "train.h5", seed=1)
    te = make_features(tmp_path / "test.h5", per_class=5, seed=2)
    m = train.run(config(tr, tmp_path / "m", "svm", test=te))
    assert m["n_train"] == 60 and m["n_test"] == 15
    assert m["test_source"] == {"kind": "file", "file": str(te)} and m["accuracy"] > 0.9


def test_metrics_hold_the_confusion_matrix_versions_and_config(feats, tmp_path):
    m = train.run(config(feats, tmp_path / "m", "lr", seed=3))
    saved = json.loads((tmp_path / "m" / "lr.metrics.json").read_text())
    assert saved["confusion"] == m["confusion"] and np.array(saved["confusion"]).shape == (3, 3)
    assert np.trace(saved["confusion"]) / saved["n_test"] == pytest.approx(saved["accuracy"]) and np.sum(saved["confusion"]) == saved["n_test"]
    assert {"scikit-learn", "numpy", "joblib", "h5py"} <= set(saved["versions"])
    assert saved["config"]["seed"] == 3 and saved["config"]["features"] == str(feats) and saved["config"]["C"] == [0.01, 1.0]


# ---------------------------------------------------------------------------
# Search and pooling


def test_grid_override_sets_the_best_params(feats, tmp_path):
    m = train.run(config(feats, tmp_path / "a", "lr", C=(0.37,)))
    assert m["best_params"] == {"C": 0.37} and len(m["search"]["results"]) == 1
    m = train.run(config(feats, tmp_path / "b", "rf", n_estimators=(7,), max_features=(0.5,)))
    assert m["best_params"] == {"n_estimators": 7, "max_features": 0.5}
    m = train.run(config(feats, tmp_path / "c", "rf", n_estimators=(3, 9), max_features=("sqrt", "log2")))
    assert len(m["search"]["results"]) == 4 and all(len(r["scores"]) == 3 for r in m["search"]["results"])


@pytest.mark.parametrize("model", ["lr", "svm", "rf"])
def test_features_that_are_all_zero_fit_the_most_frequent_class_and_say_so(model, tmp_path, capsys):
    """Sixteenth pass: a random mobilenetv2 at 32 px gives all-zero features; their row space is empty and lr/svm ended in a scikit-learn
    traceback ("0 feature(s)"). They fit (the intercepts: the most frequent class) with a warning."""
    import h5py

    f = make_features(tmp_path / "z.h5", per_class=[12, 6, 6])
    with h5py.File(f, "r+") as db:
        db["features"][...] = 0
    m = train.run(config(f, tmp_path / "m", model))
    majority = m["per_class"][m["label_names"][0]]["support"]  # 12 of 24 rows: every test image labelled as the first class
    assert m["n_test"] > 0 and m["accuracy"] == majority / m["n_test"]
    if model != "rf":
        assert "warning: every feature value of the training rows is 0: the model can only predict its most frequent class" in capsys.readouterr().err


def test_class_and_file_names_that_are_not_utf8_reach_every_output(tmp_path):
    """Sixteenth pass: a class folder or test image named by bytes that are not UTF-8 (extract keeps them) ended train and evaluate in a
    UnicodeEncodeError (the report, the misclassified list) or a matplotlib traceback (the confusion matrix). They are written as their bytes."""
    from pipeline.backbones.registry import PREPROCESSING
    from pipeline.inference import evaluate

    names = ("c\udcffbag", "coat\udcfe")
    tr = make_features(tmp_path / "tr.h5", per_class=9, classes=names, noise=100.0, preprocessing=PREPROCESSING)
    te = make_features(tmp_path / "te.h5", per_class=6, classes=names, noise=100.0, seed=3, preprocessing=PREPROCESSING)
    m = train.run(config(tr, tmp_path / "m", "lr", test=te, C=(1.0,), cv=2, allow_overlap=True))
    assert 0 < m["accuracy"] < 1  # some test images misclassified: their names are in the list
    report = (tmp_path / "m" / "lr.report.txt").read_bytes()
    assert b"c\xffbag" in report and b"coat\xfe" in report
    wrong = (tmp_path / "m" / "lr.misclassified.csv").read_bytes()
    assert wrong.count(b"\n") == 1 + round((1 - m["accuracy"]) * m["n_test"]) and (b"c\xffbag/" in wrong or b"coat\xfe/" in wrong)
    assert (tmp_path / "m" / "lr.confusion.png").stat().st_size > 0
    ev = evaluate.run(evaluate.EvaluateConfig(model=tmp_path / "m" / "lr.joblib", data=te, output=tmp_path / "ev", quiet=True, allow_overlap=True))
    assert ev["accuracy"] == m["accuracy"] and b"c\xffbag" in (tmp_path / "ev" / "report.txt").read_bytes()


def test_files_rejected_at_extraction_are_said_in_the_summary(tmp_path, capsys):
    """A test accuracy on 30 images when 2 more could not be read: the summary says so, naming each file's count (a review finding)."""
    tr = make_features(tmp_path / "tr.h5", per_class=10, rejected=[("a/bad.png", "not an image")])
    te = make_features(tmp_path / "te.h5", per_class=5, seed=1, rejected=[("a/x.png", "empty file (0 bytes)"), ("b/y.png", "empty file (0 bytes)")])
    m = train.run(config(tr, tmp_path / "m", "lr", test=te, C=(1.0,)))
    assert m["rejected"] == {str(tr): 1, str(te): 2}
    out = capsys.readouterr().out
    assert f"note: 1 file of {tr} could not be read at extraction: in no row, neither trained on nor scored (listed in its rejected/)" in out
    assert f"note: 2 files of {te} could not be read at extraction" in out


def test_search_picks_the_c_that_works(tmp_path):
    """Unbalanced classes: a vanishing C leaves only the intercepts, which predict the big class everywhere."""
    f = make_features(tmp_path / "x.h5", per_class=[40, 10, 10])
    m = train.run(config(f, tmp_path / "m", "lr", C=(1e-8, 1.0)))
    scores = {r["params"]["C"]: r["mean"] for r in m["search"]["results"]}
    assert scores[1.0] > scores[1e-8] and m["best_params"] == {"C": 1.0}


def test_default_grids_and_cli_flags_reach_the_config(feats, tmp_path):
    cfg = train.COMMAND.parse([str(feats), "--model", "rf", "--n-estimators", "5,9", "--max-features", "sqrt,0.1,40", "-o", str(tmp_path)])
    assert cfg.search_grid() == {"n_estimators": [5, 9], "max_features": ["sqrt", 0.1, 40]}
    cfg = train.COMMAND.parse([str(feats)])
    assert cfg.model == "lr" and cfg.pool == "flatten" and cfg.cv == 3 and cfg.memory_budget_mb == 2048 and cfg.output == Path("features/models")
    assert cfg.search_grid() == {"C": [1e-3, 1e-2, 1e-1, 1.0, 10.0]}
    with pytest.raises(SystemExit) as exc:
        train.COMMAND.parse([str(feats), "--model", "xgboost"])
    assert exc.value.code == 2


def test_cli_runs_the_stage(feats, tmp_path, capsys):
    argv = ["train", str(feats), "--model", "svm", "--C", "0.001,0.01", "-o", str(tmp_path / "m"), "--quiet"]
    assert main(argv) == 0
    m = json.loads((tmp_path / "m" / "svm.metrics.json").read_text())
    assert m["search"]["grid"] == {"C": [0.001, 0.01]} and "--C 0.001,0.01" in m["config"]["command_line"]
    assert "svm: test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("pool,dim", [("flatten", 2048), ("avg", 512), ("max", 512)])
def test_pooling_sets_the_estimator_input(pool, dim, tmp_path):
    f = make_features(tmp_path / "x.h5", row_shape=(2, 2, 512))
    m = train.run(config(f, tmp_path / "m", "lr", pool=pool))
    bundle = joblib.load(tmp_path / "m" / "lr.joblib")
    assert bundle["estimator"].n_features_in_ == dim and m["n_features"] == dim
    assert bundle["feature_spec"]["pool"] == pool and m["pool"] == pool and m["accuracy"] > 0.9


# ---------------------------------------------------------------------------
# Out of core


@pytest.mark.parametrize("model", ["lr", "svm"])
def test_out_of_core_streams_through_sgd(model, tmp_path):
    f = make_features(tmp_path / "x.h5", row_shape=(2, 2, 512), per_class=40)
    m = train.run(config(f, tmp_path / "m", model, memory_budget_mb=0.05, epochs=3))
    assert m["mode"] == "out-of-core" and m["memory_estimate_mb"] > 0.05
    # A small file, where the polish runs: C is chosen on the in-memory search's 3 folds.
    assert m["search"]["kind"] == "cv" and len(m["search"]["results"]) == 2 and all(len(r["scores"]) == 3 for r in m["search"]["results"])
    assert m["accuracy"] > 0.8  # chance is 1/3
    bundle = joblib.load(tmp_path / "m" / f"{model}.joblib")
    assert type(bundle["estimator"].steps[-1][1]).__name__ == "SGDClassifier"
    assert bundle["estimator"].n_features_in_ == 2048


def test_out_of_core_on_a_file_past_the_polish_holds_out_one_share_of_chunks(monkeypatch, tmp_path):
    """Large files (no polish pass affordable, as at 50,000 rows): C chosen on one hold-out share of the chunks, unpolished SGD heads."""
    from pipeline.rows import polish

    monkeypatch.setattr(polish, "POLISH_VALUES", 0)
    f = make_features(tmp_path / "x.h5", row_shape=(2, 2, 512), per_class=40)
    m = train.run(config(f, tmp_path / "m", "lr", memory_budget_mb=0.05, epochs=3))
    assert m["mode"] == "out-of-core" and m["search"]["kind"] == "holdout" and all(len(r["scores"]) == 1 for r in m["search"]["results"])
    space = m["search"]["space"]
    assert space["polish_passes"] == 0 and space["fold_polish_passes"] == 0 and space["holdout_rows"] > 0
    assert m["accuracy"] > 0.8


def test_out_of_core_is_deterministic(tmp_path):
    f = make_features(tmp_path / "x.h5", per_class=30)
    a = train.run(config(f, tmp_path / "a", "lr", memory_budget_mb=0.01, C=(1.0,), scaling="standard"))
    b = train.run(config(f, tmp_path / "b", "lr", memory_budget_mb=0.01, C=(1.0,), scaling="standard"))
    assert a["mode"] == "out-of-core" and a["search"]["kind"] == "none"
    assert a["per_class"] == b["per_class"] and a["accuracy"] > 0.8


def test_rf_over_the_budget_is_refused(feats, tmp_path):
    with pytest.raises(PipelineError, match=r"train\.h5: the flatten-pooled training matrix needs .* cannot be trained out of core; use --pool avg"):
        train.run(config(feats, tmp_path / "m", "rf", memory_budget_mb=0.01))
    assert not (tmp_path / "m").exists()
    with pytest.raises(PipelineError, match=r"the avg-pooled training matrix needs .* cannot be trained out of core; raise --memory-budget$"):
        train.run(config(feats, tmp_path / "m", "rf", pool="avg", memory_budget_mb=1e-6))  # its advice named --pool avg (eighteenth pass)


# ---------------------------------------------------------------------------
# Bad inputs


def _break(path: Path, how: str) -> None:
    with h5py.File(path, "r+") as db:
        if how == "incomplete":
            db.attrs["complete"] = False
        elif how == "no-labels":
            del db["labels"]
        elif how == "lengths":
            del db["paths"]
            db.create_dataset("paths", data=np.array([b"x"] * 3, dtype=object), dtype=h5py.string_dtype())
        elif how == "label-range":
            db["labels"][0] = 7
        elif how == "one-class":
            del db["label_names"]
            db.create_dataset("label_names", data=np.array([b"ant"], dtype=object), dtype=h5py.string_dtype())


@pytest.mark.parametrize(
    "how,message",
    [
        ("incomplete", r"incomplete feature file"),
        ("no-labels", r"missing dataset 'labels'"),
        ("lengths", r"datasets have different lengths"),
        ("label-range", r"labels range 0\.\.7 falls outside label_names"),
        ("one-class", r"only 1 class in label_names"),
    ],
)
def test_broken_feature_files_are_one_line_errors(how, message, feats, tmp_path):
    _break(feats, how)
    with pytest.raises(PipelineError, match=message) as exc:
        train.run(config(feats, tmp_path / "m"))
    assert str(feats) in str(exc.value) and "\n" not in str(exc.value)


def test_missing_feature_file(tmp_path):
    with pytest.raises(PipelineError, match=r"nope\.h5: feature file does not exist"):
        train.run(config(tmp_path / "nope.h5", tmp_path / "m"))


@pytest.mark.parametrize(
    "kind,message",
    [
        ("shape", r"test\.h5: feature_shape is \[2, 2, 512\] but .*train\.h5 has \[1, 1, 512\]"),
        ("classes", r"test\.h5: class names \['ant', 'bee', 'cow'\] differ"),
        ("weights", r"test\.h5: weights_checksum is 'abc' but .*train\.h5 has 'none'"),
    ],
)
def test_incompatible_test_file_is_refused(kind, message, feats, tmp_path):
    te = tmp_path / "test.h5"
    if kind == "shape":
        make_features(te, row_shape=(2, 2, 512), input_size=32)
    elif kind == "classes":
        make_features(te, classes=("ant", "bee", "cow"))
    else:
        make_features(te, weights_checksum="abc")
    with pytest.raises(PipelineError, match=message):
        train.run(config(feats, tmp_path / "m", test=te))


def test_empty_test_split_and_empty_test_file(tmp_path):
    f = make_features(tmp_path / "tiny.h5", per_class=1, classes=("a", "b"))
    with pytest.raises(PipelineError, match=r"tiny\.h5: the test split is empty \(2 rows"):
        train.run(config(f, tmp_path / "m"))
    empty = make_features(tmp_path / "empty.h5", per_class=0)
    with pytest.raises(PipelineError, match=r"empty\.h5: test feature file has no rows"):
        train.run(config(make_features(tmp_path / "t.h5"), tmp_path / "m", test=empty))


def test_too_few_rows_per_class_for_the_folds(tmp_path):
    f = make_features(tmp_path / "x.h5", per_class=[20, 20, 3])
    with pytest.raises(PipelineError, match=r"class 'cat' has 2 training rows but --cv 3 needs at least 3"):
        train.run(config(f, tmp_path / "m"))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"model": "xgb"}, r"--model xgb: unknown model; choose one of lr, svm, rf"),
        ({"pool": "sum"}, r"--pool sum: choose one of flatten, avg, max"),
        ({"cv": 1}, r"--cv 1: cross-validation needs at least 2 folds"),
        ({"test_size": 0.0}, r"--test-size 0.0"),
        ({"memory_budget_mb": 0}, r"--memory-budget 0"),
        ({"model": "rf", "C": (1.0,)}, r"--C: --model rf has no parameter 'C'"),
        ({"C": (-1.0,)}, r"--C -1.0: C must be a number from 1e-08 to 1e\+08"),
        ({"model": "rf", "max_features": ("most",)}, r"--max-features 'most'"),
    ],
)
def test_bad_settings_are_refused_before_reading(changes, message, tmp_path):
    cfg = TrainConfig(features=tmp_path / "never-read.h5", output=tmp_path / "m", quiet=True, **changes)
    with pytest.raises(PipelineError, match=message):
        train.run(cfg)


def test_output_that_is_a_file_is_refused(feats, tmp_path):
    (tmp_path / "m").write_text("x")
    with pytest.raises(PipelineError, match=r"m: exists and is not a folder"):
        train.run(config(feats, tmp_path / "m"))


# ---------------------------------------------------------------------------
# The validation table: one line and exit 2 through the CLI, before anything is read


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--seed", "4294967296"], r"--seed 4294967296: must be a whole number in [0, 4294967295]"),
        (["--seed", "-1"], r"--seed -1: must be a whole number in [0, 4294967295]"),
        (["--cv", "1"], r"--cv 1: cross-validation needs at least 2 folds (a whole number in [2, 4294967295])"),
        (["--cv", "4294967296"], r"--cv 4294967296: cross-validation needs at least 2 folds"),
        (["--test-size", "1.5"], r"--test-size 1.5: must be between 0 and 1 (exclusive)"),
        (["--test-size", "nan"], r"--test-size nan: must be between 0 and 1 (exclusive)"),
        (["--memory-budget", "inf"], r"--memory-budget inf: must be a positive, finite number of MB"),
        (["--memory-budget", "0"], r"--memory-budget 0.0: must be a positive, finite number of MB"),
        (["--epochs", "0"], r"--epochs 0: must be a whole number in [1, 4294967295]"),
        (["--n-jobs", "0"], r"--n-jobs 0: must be -1 (all cores) or a whole number in [1, 4294967295]"),
        (["--n-jobs", "-2"], r"--n-jobs -2: must be -1 (all cores)"),
        (["--n-jobs", "4294967296"], r"--n-jobs 4294967296: must be -1 (all cores)"),
        (["--model", "rf", "--C", "1"], r"--C: --model rf has no parameter 'C'"),
        (["--C", "0"], r"--C 0.0: C must be a number from 1e-08 to 1e+08"),
        (["--C", "1e-300"], r"--C 1e-300: C must be a number from 1e-08 to 1e+08"),
        (["--C", "1,1e9"], r"--C 1000000000.0: C must be a number from 1e-08 to 1e+08"),
        (["--n-estimators", "0", "--model", "rf"], r"--n-estimators 0: must be a whole number in [1, 4294967295]"),
        (["--n-estimators", "4294967296", "--model", "rf"], r"--n-estimators 4294967296: must be a whole number in [1, 4294967295]"),
        (["--max-features", "9223372036854775808", "--model", "rf"], r"--max-features 9223372036854775808: use sqrt, log2, a fraction in (0, 1] or a whole number of features in [1, 4294967295]"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(flags, message, tmp_path, capsys):
    assert main(["train", str(tmp_path / "never-read.h5"), "-o", str(tmp_path / "m"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message) and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def _whole_number_flags(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [settings.flag_of(f) for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and int in (hints[f.name], *typing.get_args(hints[f.name]))]


@pytest.mark.parametrize("command", ["train", "predict"])
def test_every_whole_number_flag_has_a_bounded_range(command, tmp_path, capsys):
    """Each int field of the config, and train's whole-number grid flags, refuses 2**32 in one line (exit 2) before anything is read."""
    if command == "train":
        flags = _whole_number_flags(TrainConfig) + ["--n-estimators", "--max-features"]
        head = ["train", str(tmp_path / "never-read.h5"), "--model", "rf", "-o", str(tmp_path / "m")]
        assert set(_whole_number_flags(TrainConfig)) == {"--seed", "--cv", "--epochs", "--n-jobs"}
    else:
        flags = _whole_number_flags(PredictConfig)
        head = ["predict", str(tmp_path / "never-read.joblib"), str(tmp_path), "-o", str(tmp_path / "m" / "out.csv")]
        assert flags == ["--batch-size", "--top-k"]
    for flag in flags:
        assert main([*head, flag, "4294967296"]) == 2, flag
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} 4294967296: ") and "4294967295" in err and err.count("\n") == 1, err
    assert not (tmp_path / "m").exists()


def test_n_jobs_all_cores_and_the_config_defaults_pass():
    assert TrainConfig(features=Path("x.h5"), n_jobs=-1).validate().n_jobs == -1
    cfg = TrainConfig(features=Path("x.h5"))
    assert cfg.validate() is cfg and cfg.grid is None and cfg.command_line == ""
    with pytest.raises(PipelineError, match=r"^--n-jobs -1\.0: "):
        TrainConfig(features=Path("x.h5"), n_jobs=-1.0).validate()


def test_the_flags_record_the_command_line_and_only_the_grid_flags_given(tmp_path):
    cfg = train.COMMAND.parse(["f.h5", "--model", "svm", "--C", "0.5, 2", "--seed", "7"])
    assert cfg.grid == {"C": [0.5, 2.0]} and cfg.seed == 7 and cfg.features == Path("f.h5")
    assert cfg.command_line == "python -m pipeline train f.h5 --model svm --C '0.5, 2' --seed 7"
    with pytest.raises(SystemExit):
        train.COMMAND.parse(["f.h5", "--C", "a,b"])
