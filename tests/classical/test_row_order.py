"""Row order: every result of train (split, folds, C, fit, scores, saved model) is a function of the set of (path, label, features) rows, never of the order a feature file stores them in (issue 22)."""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
from pathlib import Path

import h5py
import joblib
import numpy as np
import pytest

from conftest import make_tree
from feature_data import make_features
from pipeline.classical import train
from pipeline.classical.train import TrainConfig
from pipeline.cli import main
from pipeline.core.splits import canonical_order, split_indices
from pipeline.featurefile.schema import VERSION_COLUMNS
from pipeline.featurefile.store import open_features
from pipeline.rows.pooling import read_groups

#: Enough noise that the C values score differently and some test rows are misclassified.
HARD = dict(per_class=24, noise=10.0, row_shape=(1, 1, 64))
GRIDS = {"lr": (0.001, 0.01, 0.1, 1.0, 10.0), "svm": (0.0001, 0.001, 0.01, 0.1, 1.0)}
#: What must not depend on the storage order.
SAME = ("accuracy", "macro_f1", "per_class", "confusion", "best_params", "cv_score", "cv_std", "n_train", "n_test", "final_model")


def permuted_copy(src: Path, dst: Path, seed: int = 1) -> Path:
    """A copy of ``src`` with its rows stored in a seeded random order (every row column follows its rows): ``verify`` finds in it what it finds in ``src``."""
    shutil.copy2(src, dst)
    with h5py.File(dst, "r+") as db:
        perm = np.random.default_rng(seed).permutation(len(db["labels"]))
        assert not np.array_equal(perm, np.arange(len(perm)))
        for name in ("features", "labels", "paths", *VERSION_COLUMNS):
            db[name][...] = db[name][:][perm]
    assert verify(dst).replace(str(dst), "F") == verify(src).replace(str(src), "F")
    return dst


def verify(path: Path) -> str:
    """``verify``'s exit code and report on ``path`` (the synthetic files lack the extraction's provenance attributes: the same findings for both)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["verify", str(path)])
    return f"{code}\n{out.getvalue()}"


def run(features: Path, out: Path, model: str = "lr", **kw) -> dict:
    if model in GRIDS and "C" not in kw:
        kw["C"] = GRIDS[model]
    if model == "rf":
        kw.update(n_estimators=(5, 20), max_features=("sqrt", 0.5))
    return train.run(TrainConfig(features=features, model=model, output=out, quiet=True, **kw))


def misclassified(out: Path, model: str) -> list[list[str]]:
    with open(out / f"{model}.misclassified.csv", newline="") as f:
        return list(csv.reader(f))


def predictions(out: Path, model: str, features: Path) -> np.ndarray:
    """The saved model's labels for every row of ``features``, in path order."""
    bundle = joblib.load(out / f"{model}.joblib")
    with open_features(features) as ff:
        rows = canonical_order(ff.db["paths"][:])
        (x,) = read_groups(ff, [np.sort(rows)], bundle["feature_spec"]["pool"])
        return bundle["estimator"].predict(x)[np.argsort(np.argsort(rows))]


def test_canonical_order_sorts_rows_by_path_bytes():
    paths = np.array([b"b/2.png", b"a/10.png", "é/1.png".encode(), b"a/1.png"], dtype=object)
    assert canonical_order(paths).tolist() == [3, 1, 0, 2]


def test_the_split_is_a_function_of_the_keyed_rows():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    keys = np.array([f"{c}/{i:03d}.png".encode() for i, c in enumerate(labels)], dtype=object)
    perm = rng.permutation(60)
    train_a, test_a = split_indices(labels, 0.25, 3, keys=keys)
    train_b, test_b = split_indices(labels[perm], 0.25, 3, keys=keys[perm])
    assert sorted(keys[test_a]) == sorted(keys[perm][test_b]) and sorted(keys[train_a]) == sorted(keys[perm][train_b])
    # Without keys the rows are taken as stored: another order, another split.
    assert sorted(keys[split_indices(labels, 0.25, 3)[1]]) != sorted(keys[perm][split_indices(labels[perm], 0.25, 3)[1]])


@pytest.mark.parametrize("model", ["lr", "svm", "rf"])
@pytest.mark.parametrize("with_test", [False, True])
def test_train_in_memory_does_not_depend_on_the_row_order(model, with_test, tmp_path):
    a = make_features(tmp_path / "a.h5", **HARD)
    b = permuted_copy(a, tmp_path / "b.h5")
    kw = {}
    if with_test:
        test = make_features(tmp_path / "test.h5", seed=7, **HARD)
        kw = {"test": permuted_copy(test, tmp_path / "test_b.h5", seed=2)}
    ma = run(a, tmp_path / "ma", model, **({"test": test} if with_test else {}))
    mb = run(b, tmp_path / "mb", model, **kw)
    assert ma["mode"] == mb["mode"] == "in-memory"
    assert {k: ma[k] for k in SAME} == {k: mb[k] for k in SAME}
    assert ma["search"]["results"] == mb["search"]["results"]
    assert misclassified(tmp_path / "ma", model) == misclassified(tmp_path / "mb", model)
    assert len(misclassified(tmp_path / "ma", model)) > 1  # a header and at least one wrong row: the scores can differ
    assert np.array_equal(predictions(tmp_path / "ma", model, a), predictions(tmp_path / "mb", model, a))


def test_the_search_really_chooses(tmp_path):
    """The data of the tests above separate the C values (an order-dependent fold assignment could change the choice)."""
    m = run(make_features(tmp_path / "a.h5", **HARD), tmp_path / "m")
    means = [r["mean"] for r in m["search"]["results"]]
    assert len(set(means)) > 2


@pytest.mark.parametrize("scaling", ["l2", "standard"])
def test_train_on_the_engine_in_memory_does_not_depend_on_the_row_order(scaling, tmp_path):
    """Above ``fitting.ROW_SPACE_MAX_ROWS`` training rows the in-memory search runs on the engine (shuffled minibatches of the matrix)."""
    a = make_features(tmp_path / "a.h5", **{**HARD, "per_class": 900})
    b = permuted_copy(a, tmp_path / "b.h5")
    ma, mb = run(a, tmp_path / "ma", scaling=scaling, epochs=2), run(b, tmp_path / "mb", scaling=scaling, epochs=2)
    assert ma["search"]["space"]["kind"] == "engine"
    assert {k: ma[k] for k in SAME} == {k: mb[k] for k in SAME}
    assert np.array_equal(predictions(tmp_path / "ma", "lr", a), predictions(tmp_path / "mb", "lr", a))


@pytest.mark.parametrize("kind", ["cv", "holdout"])
def test_out_of_core_holds_out_the_same_rows_and_agrees_in_any_order(kind, monkeypatch, tmp_path):
    """Out of core the SGD batches are whole stored chunks, so the path may differ; the groups held out may not, and the predictions agree."""
    from pipeline.rows import polish, stream

    if kind == "holdout":
        monkeypatch.setattr(polish, "POLISH_VALUES", 0)
    groups = []
    row_groups = stream.row_groups

    def spy(train_rows, labels, size, kind, cv, seed, same=None):
        group = row_groups(train_rows, labels, size, kind, cv, seed, same)
        groups.append((size, labels[train_rows].tolist(), group[train_rows].tolist()))
        return group

    monkeypatch.setattr(stream, "row_groups", spy)
    a = make_features(tmp_path / "a.h5", row_shape=(2, 2, 64), per_class=40, noise=25.0)
    b = permuted_copy(a, tmp_path / "b.h5")
    ma = run(a, tmp_path / "ma", memory_budget_mb=0.01, C=(0.01, 1.0), epochs=3)
    mb = run(b, tmp_path / "mb", memory_budget_mb=0.01, C=(0.01, 1.0), epochs=3)
    assert ma["mode"] == mb["mode"] == "out-of-core" and ma["search"]["kind"] == mb["search"]["kind"] == kind
    # The same groups of the same rows: train_rows come in path order, and both files hold the same paths.
    assert len(groups) == 4 and groups[:2] == groups[2:]  # the split's fit and the refit on every row, of each file
    assert len(set(groups[0][2])) == (3 if kind == "cv" else 2) and set(groups[1][2]) == {1}  # the refit has one C: nothing held out
    assert ma["search"]["space"]["holdout_rows"] == mb["search"]["space"]["holdout_rows"]
    agree = np.mean(predictions(tmp_path / "ma", "lr", a) == predictions(tmp_path / "mb", "lr", a))
    assert agree >= 0.95 and ma["accuracy"] < 0.95, (agree, ma["accuracy"])


# ---------------------------------------------------------------------------
# Files extract writes out of listing order (issue 22's cases)

FAST = ["--weights", "none", "--input-size", "32", "--batch-size", "4", "--quiet"]


def extract(data: Path, out: Path, *extra: str) -> Path:
    assert main(["extract", str(data), "-o", str(out), *FAST, *extra]) == 0
    return out


def stored_paths(path: Path) -> list[bytes]:
    with h5py.File(path, "r") as db:
        return db["paths"][:].tolist()


def same_train(a: Path, b: Path, tmp_path: Path, **kw) -> None:
    """``train`` on ``a`` and on ``b`` (the same rows, stored in another order): the same results."""
    assert stored_paths(a) != stored_paths(b) and sorted(stored_paths(a)) == sorted(stored_paths(b))
    ma, mb = run(a, tmp_path / "ma", **kw), run(b, tmp_path / "mb", **kw)
    assert {k: ma[k] for k in SAME} == {k: mb[k] for k in SAME}
    assert ma["search"]["results"] == mb["search"]["results"]
    assert misclassified(tmp_path / "ma", "lr") == misclassified(tmp_path / "mb", "lr")
    assert np.array_equal(predictions(tmp_path / "ma", "lr", a), predictions(tmp_path / "mb", "lr", a))


def test_train_after_an_incremental_update_is_train_on_a_fresh_file(tmp_path):
    """The adversarial pass's case: two images of different classes swap contents; the update stores their rows after the kept chunks."""
    data = make_tree(tmp_path / "data", classes=("bag", "coat", "shoe"), per_class=8, size=(12, 12))
    a = extract(data, tmp_path / "a.h5")
    x, y = data / "bag" / "002.png", data / "coat" / "005.png"
    x_bytes, y_bytes = x.read_bytes(), y.read_bytes()
    x.write_bytes(y_bytes)
    y.write_bytes(x_bytes)
    extract(data, a)  # an update: 2 rows re-extracted
    b = extract(data, tmp_path / "b.h5")
    same_train(a, b, tmp_path)


def test_train_on_a_merged_file_is_train_on_a_single_extraction(tmp_path):
    """A merged file groups its rows by shard."""
    from pipeline.extract.fingerprints import shard_path

    data = make_tree(tmp_path / "data", classes=("bag", "coat", "shoe"), per_class=8, size=(12, 12))
    single = extract(data, tmp_path / "single.h5")
    shards = [extract(data, shard_path(tmp_path / "x.h5", k, 2), "--shards", "2", "--shard", str(k)) for k in range(2)]
    merged = tmp_path / "merged.h5"
    assert main(["merge", str(merged), *map(str, shards)]) == 0
    same_train(single, merged, tmp_path)
