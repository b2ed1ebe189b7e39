"""Train stage, nothing destroyed or silently wrong: outputs that are inputs, non-finite features, SIGTERM mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import ROOT, spell
from feature_data import FAST_GRID, make_features
from pipeline.classical import train
from pipeline.rows import pooling as features
from pipeline.classical.train import TrainConfig
from pipeline.core.errors import PipelineError
from pipeline.featurefile.store import open_features


def config(features: Path, out: Path, model: str = "lr", **kw) -> TrainConfig:
    kw = {**FAST_GRID[model], **kw}
    return TrainConfig(features=features, model=model, output=out, quiet=True, **kw)


# ---------------------------------------------------------------------------
# Outputs that are inputs


@pytest.mark.parametrize("how", ["plain", "double-slash", "symlink", "dotdot"])
@pytest.mark.parametrize(
    "role,name,message",
    [
        ("features", "lr.metrics.json", "is the feature file"),
        ("features", "lr.joblib.lock", "is the feature file"),
        ("test", "lr.joblib", "is the test feature file"),
        ("test", "lr.confusion.png", "is the test feature file"),
    ],
)
def test_an_output_path_that_is_an_input_is_refused(role, name, message, how, tmp_path):
    """A feature file sitting where an output (or the lock) goes is refused, however the folder is spelled, and left as it was."""
    out = tmp_path / "m"
    victim = make_features(out / name, seed=3)
    before = victim.read_bytes()
    if role == "features":
        cfg = config(victim, spell(out, how, tmp_path, of_folder=True))
    else:
        cfg = config(make_features(tmp_path / "train.h5"), spell(out, how, tmp_path, of_folder=True), test=victim)
    with pytest.raises(PipelineError, match=rf"{name}: {message} .*{name} \(the same file\); .*choose another -o folder") as exc:
        train.run(cfg)
    assert "\n" not in str(exc.value)
    assert victim.read_bytes() == before and sorted(p.name for p in out.iterdir()) == [name]


def test_the_output_folder_cannot_be_the_feature_file(tmp_path):
    f = make_features(tmp_path / "train.h5")
    before = f.read_bytes()
    with pytest.raises(PipelineError, match=r"^//.*train\.h5: is the feature file /.*train\.h5 \(the same file\)"):
        train.run(config(f, Path("//" + str(f).lstrip("/"))))
    assert f.read_bytes() == before


# ---------------------------------------------------------------------------
# Non-finite features


def _spoil(path: Path, rows: list[int], value: float) -> None:
    with h5py.File(path, "r+") as db:
        for r in rows:
            db["features"][r, 1, 2, 7] = value


#: Bad values in row 10 (first chunk) and row 100 (second chunk of 64 rows): every
#: reader names row 10, whichever chunk it reads first.
BAD_ROWS = [10, 100]
CASES = {
    "lr in memory": dict(model="lr"),
    "rf in memory": dict(model="rf"),
    "max pooling hides -inf": dict(model="lr", pool="max"),
    "lr out of core, shuffled first": dict(model="lr", memory_budget_mb=0.05, epochs=1),
    "svm out of core, scaler pass first": dict(model="svm", memory_budget_mb=0.05, epochs=1, scaling="standard"),
}


@pytest.mark.parametrize("where", ["train", "test"])
@pytest.mark.parametrize("case", list(CASES))
def test_non_finite_features_are_refused_naming_the_file_and_first_bad_row(case, where, tmp_path):
    kw = dict(CASES[case])
    value = {"max pooling hides -inf": -np.inf, "rf in memory": np.inf}.get(case, np.nan)
    tr = make_features(tmp_path / "train.h5", row_shape=(4, 4, 512), per_class=40)
    te = make_features(tmp_path / "test.h5", row_shape=(4, 4, 512), per_class=40, seed=5)
    _spoil(tr if where == "train" else te, BAD_ROWS, value)
    bad = "train.h5" if where == "train" else "test.h5"
    with pytest.raises(PipelineError, match=rf"{bad}: row 10 \(image 'ant/010\.png'\) holds a non-finite feature value \(NaN or infinity\)") as exc:
        train.run(config(tr, tmp_path / "m", test=te, **kw))
    assert "\n" not in str(exc.value)
    assert not any((tmp_path / "m").iterdir())  # nothing written, no lock left


def test_check_finite_names_the_first_bad_row_of_the_file_not_of_the_chunk(tmp_path):
    f = make_features(tmp_path / "x.h5", row_shape=(4, 4, 512), per_class=40)
    _spoil(f, BAD_ROWS, np.nan)
    with open_features(f) as ff:
        block = ff.db["features"][64:128]
        with pytest.raises(PipelineError, match=r"x\.h5: row 10 "):
            features.check_finite(ff, block, np.arange(64, 128))
        features.check_finite(ff, block[:30], np.arange(64, 94))  # rows 64..93 are finite
        assert features.first_non_finite_row(ff, 100) == 10


# ---------------------------------------------------------------------------
# SIGTERM


@pytest.mark.slow
def test_sigterm_during_train_says_so_removes_the_lock_and_keeps_the_previous_outputs(tmp_path):
    f = make_features(tmp_path / "train.h5", per_class=20)
    out = tmp_path / "m"
    train.run(config(f, out, "lr"))
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(previous) == 6  # bundle, metrics, report, confusion plot, misclassified rows, and the set's receipt
    # Out of core for a million epochs: hours of work, so SIGTERM surely lands mid-fit;
    # the lock file appears once the run is inside the locked section.
    argv = [sys.executable, "-m", "pipeline", "train", str(f), "-o", str(out), "--quiet", "--C", "1", "--memory-budget", "0.001", "--epochs", "1000000"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        lock = out / "lr.joblib.lock"
        deadline = time.monotonic() + 60
        while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None and lock.exists(), "the run never reached its locked section"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # a failed test leaves no run behind
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and err.splitlines()[-1] == "error: interrupted", err  # the CLI's interrupt branch, not a crash
    assert not lock.exists()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous  # no temporary file either
