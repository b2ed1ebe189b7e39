"""The engine's full-batch polish: it reaches the exact fit's optimum (the same objective as scikit-learn's, binary and svm intercepts included), each stacked head as if alone, within its pass budget."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.classical.models import MODELS
from pipeline.rows import polish
from pipeline.rows.engine import Engine, Heads, Preconditioner


def _problem(seed=0, n=300, d=40, k=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = (rng.normal(size=(n, d)) + 0.8 * rng.normal(size=(k, d))[y] + 2.0).astype(np.float32)  # overlapping classes, off-centre rows
    return x, y, rng.integers(0, 3, n)


def _fitted(x, y, groups, heads, loss, k, epochs=2, batch=50):
    n_rows = np.array([np.sum(groups != g) if g >= 0 else len(x) for g in heads.held_out])
    eng = Engine(x.shape[1], k, heads, n_rows, loss, Preconditioner.from_sample(x, rank=4))
    steps = epochs * -(-len(x) // batch)
    eng.plan(steps, steps // epochs)
    for _ in range(epochs):
        for s in range(0, len(x), batch):
            eng.step(x[s : s + batch], y[s : s + batch], groups[s : s + batch])
    return eng


def _passes(x, y, groups, batch=128):
    return lambda: ((x[s : s + batch], y[s : s + batch], groups[s : s + batch]) for s in range(0, len(x), batch))


def _exact(loss, C, x, y):
    family = MODELS[loss]
    x = x.astype(np.float64)  # lbfgs on float32 rows stops short of the optimum along the intercepts
    return family.build({"C": C, **family.data_params(x)}, 0, 1).set_params(max_iter=20000, tol=1e-10).fit(x, y)


@pytest.mark.parametrize("loss, C, k", [("lr", 0.05, 3), ("svm", 0.01, 3), ("lr", 0.05, 2), ("svm", 0.01, 2)])
def test_the_polish_reaches_the_exact_fit(loss, C, k):
    """From two epochs of SGD to scikit-learn's optimum: same objective (lbfgs, and LinearSVC with its intercept in effect free; one binary model for two classes)."""
    x, y, _ = _problem(k=k)
    groups = np.ones(len(x), np.int64)
    eng = _fitted(x, y, groups, Heads.grid([C], 0), loss, k)
    ref = _exact(loss, C, x, y)
    before = eng.weights()
    stats = polish.polish(eng, _passes(x, y, groups), 100)
    coef, icpt = eng.weights()
    if k == 2:  # the engine's container: one binary model (see engine.classifier)
        half = 1.0 if loss == "lr" else 0.5
        coef, icpt = half * (coef[:, 1:] - coef[:, :1]), half * (icpt[:, 1:] - icpt[:, :1])
        before = half * (before[0][:, 1:] - before[0][:, :1]), None
    scale = np.abs(ref.coef_).max()
    assert np.abs(before[0][0] - ref.coef_).max() > 0.02 * scale  # SGD alone was not there
    assert stats["converged"] == 1 and stats["passes"] < 100
    np.testing.assert_allclose(coef[0], ref.coef_, atol=0.01 * scale)
    np.testing.assert_allclose(icpt[0], ref.intercept_, atol=0.01 * max(1.0, np.abs(ref.intercept_).max()))


@pytest.mark.parametrize("loss", ["lr", "svm"])
def test_every_stacked_head_is_polished_as_if_alone_and_so_is_one_taken_out(loss):
    x, y, groups = _problem(1)
    heads = Heads.grid([0.01, 1.0], 2)
    eng = _fitted(x, y, groups, heads, loss, 3)
    polish.polish(eng, _passes(x, y, groups), 60)
    coef, icpt = eng.weights()
    unpolished = _fitted(x, y, groups, heads, loss, 3)
    for h, (C, g) in enumerate(zip(heads.C, heads.held_out)):
        alone = _fitted(x, y, groups, Heads(np.array([C]), np.array([g])), loss, 3)
        polish.polish(alone, _passes(x, y, groups), 60)
        picked = polish.Subset(unpolished, [h])  # one head taken out of the stack (the model out of core keeps)
        polish.polish(picked, _passes(x, y, groups), 60)
        c1, i1 = alone.weights()
        scale = np.abs(c1).max()
        for c2, i2 in ((coef[h], icpt[h]), (picked.weights()[0][0], picked.weights()[1][0])):
            np.testing.assert_allclose(c2, c1[0], atol=1e-3 * scale)
            np.testing.assert_allclose(i2, i1[0], atol=1e-3 * max(1.0, np.abs(i1).max()))


def test_a_polished_head_never_sees_its_held_out_rows():
    x, y, groups = _problem(2)
    heads = Heads(np.array([1.0]), np.array([0]))
    a = _fitted(x, y, groups, heads, "lr", 3)
    polish.polish(a, _passes(x, y, groups), 30)
    x2 = x.copy()
    x2[groups == 0] = 1e3
    b = _fitted(x, y, groups, heads, "lr", 3)  # the same start; only the polish sees the changed rows
    polish.polish(b, _passes(x2, y, groups), 30)
    np.testing.assert_allclose(a.weights()[0], b.weights()[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n, d, passes", [(600, 512, 100), (1000, 25088, 60), (5000, 25088, 12), (10_000, 25088, 0), (50_000, 25088, 0)])
def test_the_pass_budget_is_in_values_read(n, d, passes):
    """Tiny rows get the most passes; large files none (their SGD takes enough steps, and each pass is a read of the file)."""
    assert polish.passes_for(n, d) == passes


@pytest.mark.parametrize("loss, C", [("lr", 10.0), ("svm", 0.1)])
def test_the_row_space_polish_reaches_the_exact_fit_with_fewer_rows_than_features(loss, C):
    """Rows in memory, n < d: the polish on their span's coordinates, lifted back, is scikit-learn's fit on the features (weakly penalised: the hard case)."""
    from pipeline.rows.span import RowSpaceHeads

    x, y, _ = _problem(3, n=60, d=200)
    groups = np.ones(len(x), np.int64)
    eng = _fitted(x, y, groups, Heads.grid([C], 0), loss, 3, batch=20)
    ref = _exact(loss, C, x, y)
    span = RowSpaceHeads(polish.Subset(eng, [0]), x)
    assert span.Z.shape == (60, 60) and span.W.shape == (60, 3)
    stats = polish.polish(span, lambda: [(span.Z, y, groups)], polish.ROW_SPACE_PASSES)
    eng.set_averages(*span.lift())
    coef, icpt = eng.weights()
    scale = np.abs(ref.coef_).max()
    assert stats["converged"] == 1
    np.testing.assert_allclose(coef[0], ref.coef_, atol=0.01 * scale)
    np.testing.assert_allclose(icpt[0], ref.intercept_, atol=0.01 * max(1.0, np.abs(ref.intercept_).max()))
