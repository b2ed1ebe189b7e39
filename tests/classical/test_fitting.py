"""Fitting: the row-space trick is exact, the scale folding gives an estimator on unscaled pooled rows."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.classical import fitting
from pipeline.classical.models import MODELS


@pytest.mark.parametrize("scaling", ["l2", "standard"])
def test_row_space_fit_equals_the_full_feature_fit(scaling, monkeypatch):
    """The row-space search is a speed-up, not an approximation: same model as fitting on all features."""
    import dataclasses

    from sklearn.linear_model import LogisticRegression

    # A tight tolerance on both sides, so that only the mathematics is compared.
    tight = dataclasses.replace(MODELS["lr"], build=lambda params, seed, n_jobs: LogisticRegression(C=params["C"], tol=1e-10, max_iter=10000))
    monkeypatch.setitem(MODELS, "lr", tight)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(40, 600)) + np.repeat(rng.normal(size=(2, 600)), 20, axis=0)).astype(np.float32)
    y = np.repeat([0, 1], 20)
    est, result, space = fitting.fit_matrix(x.copy(), y, model="lr", grid={"C": [0.05]}, scaling=scaling, cv=2)
    assert space == {"kind": "row-space", "dims": 40 if scaling == "l2" else 39}  # centring removes one direction
    xs = x.astype(np.float64)  # the reference in float64: float32 standardisation alone is off by 2e-4 on some CPUs
    if scaling == "l2":
        xs *= np.sqrt(600) / np.linalg.norm(xs, axis=1, keepdims=True)
    else:
        xs = (xs - x.astype(np.float64).mean(0)) / x.astype(np.float64).std(0)
    xs_mean, xs_std = x.astype(np.float64).mean(0), x.astype(np.float64).std(0)
    direct = LogisticRegression(C=0.05, tol=1e-10, max_iter=10000).fit(xs, y)
    x_new = rng.normal(size=(10, 600)).astype(np.float32)
    xs_new = x_new * np.sqrt(600) / np.linalg.norm(x_new, axis=1, keepdims=True) if scaling == "l2" else (x_new - xs_mean) / xs_std
    np.testing.assert_allclose(est.decision_function(x_new), direct.decision_function(xs_new), rtol=1e-5, atol=1e-5)


def test_row_space_reproduces_the_gram_matrix_and_lifts_weights_back():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 50)).astype(np.float32)
    z, u, s = fitting.row_space(x)
    assert z.shape == (6, 6)
    np.testing.assert_allclose(z @ z.T, x.astype(np.float64) @ x.T.astype(np.float64), rtol=1e-6, atol=1e-6)
    a = rng.normal(size=(2, 6))
    w = fitting.lift_coef(a, u, s, x)
    np.testing.assert_allclose(x.astype(np.float64) @ w.T, z @ a.T, rtol=1e-6, atol=1e-6)  # same decision values on the rows


@pytest.mark.parametrize("model", ["svm", "rf"])
def test_fit_matrix_gives_a_pipeline_on_pooled_rows(model):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(60, 20)) + np.repeat(np.eye(3, 20) * 5, 20, axis=0)).astype(np.float32)
    y = np.repeat([0, 1, 2], 20)
    grid = {"C": [0.1]} if model == "svm" else {"n_estimators": [10], "max_features": ["sqrt"]}
    est, result, space = fitting.fit_matrix(x.copy(), y, model=model, grid=grid, cv=3)
    assert space == {"kind": "features", "dims": 20} and result.best_params == {k: v[0] for k, v in grid.items()}
    assert [name for name, _ in est.steps] == (["scale", "clf"] if model == "svm" else ["clf"])
    assert np.mean(fitting.predict_matrix(est, x, rows=7) == y) > 0.9
