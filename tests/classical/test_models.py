"""The model registry: every family builds a fresh estimator, default grids, overrides and the checks of grid values."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.classical.models import MODELS, check_grid_value, search_grid
from pipeline.core.errors import PipelineError


@pytest.mark.parametrize("model", list(MODELS))
def test_every_family_builds_a_seeded_estimator_from_its_grid(model):
    family = MODELS[model]
    params = {k: v[0] for k, v in family.grid.items()}
    est = family.build(params, 7, 1)
    assert est.get_params()["random_state"] == 7
    assert {k: est.get_params()[k] for k in params} == params
    assert family.score in ("probability", "decision") and (family.stream_loss is not None) == family.linear
    assert family.path_param is None or family.path_param in family.grid


def test_default_grids_and_overrides():
    assert search_grid("lr") == {"C": [1e-3, 1e-2, 1e-1, 1.0, 10.0]}
    assert search_grid("rf", {"n_estimators": [5, 5, 9]}) == {"n_estimators": [5, 9], "max_features": ["sqrt", "log2"]}
    assert search_grid("svm", {"C": 2}) == {"C": [2.0]}


@pytest.mark.parametrize(
    "model,overrides,message",
    [
        ("rf", {"C": [1.0]}, r"^--C: --model rf has no parameter 'C' \(it searches n_estimators, max_features\)$"),
        ("lr", {"C": []}, r"^--C: needs at least one value$"),
        ("lr", {"C": [float("inf")]}, r"^--C inf: C must be a number from 1e-08 to 1e\+08 \(rows are scaled to unit RMS, so the useful range is about 1e-5 to 10\)$"),
        ("lr", {"C": [True]}, r"^--C True: C must be a number from 1e-08 to 1e\+08 \(rows are scaled to unit RMS, so the useful range is about 1e-5 to 10\)$"),
        ("rf", {"n_estimators": [2.5]}, r"^--n-estimators 2.5: must be a whole number in \[1, 4294967295\]$"),
        ("rf", {"n_estimators": [2**32]}, r"^--n-estimators 4294967296: must be a whole number in \[1, 4294967295\]$"),
        ("rf", {"max_features": [np.int64(2**62)]}, r"^--max-features 4611686018427387904: use sqrt, log2, a fraction in \(0, 1\] or a whole number of features in \[1, 4294967295\]$"),
        ("rf", {"max_features": [1.5]}, r"^--max-features 1.5: use sqrt, log2, a fraction in \(0, 1\] or a whole number of features in \[1, 4294967295\]$"),
    ],
)
def test_bad_grid_values_are_refused(model, overrides, message):
    with pytest.raises(PipelineError, match=message):
        search_grid(model, overrides)


def test_grid_values_are_normalised():
    assert check_grid_value("C", 1) == 1.0 and isinstance(check_grid_value("C", 1), float)
    assert check_grid_value("n_estimators", np.int64(4)) == 4 and type(check_grid_value("n_estimators", np.int64(4))) is int
    assert [check_grid_value("max_features", v) for v in ("log2", 0.5, 40)] == ["log2", 0.5, 40]
