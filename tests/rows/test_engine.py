"""The linear-model engine: stacked candidates equal lone fits, the preconditioner, the sklearn container, and the TensorFlow engine equal to the numpy one."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.rows import device, engine
from pipeline.rows.engine import Engine, Heads, Preconditioner


def _problem(seed=0, n=240, d=64, k=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = (rng.normal(size=(n, d)) + 1.5 * rng.normal(size=(k, d))[y]).astype(np.float32)
    return x, y, rng.integers(0, 3, n)


def _train(eng, x, y, groups, batch=40, epochs=3):
    steps = epochs * len(x) // batch
    eng.plan(steps, steps // epochs)
    for _ in range(epochs):
        for s in range(0, len(x), batch):
            eng.step(x[s : s + batch].copy(), y[s : s + batch], groups[s : s + batch])
    return eng.weights()


@pytest.mark.parametrize("loss", ["lr", "svm"])
def test_every_stacked_candidate_learns_what_it_would_learn_alone(loss):
    """One pass for all (C, held-out group) heads gives each head the weights of fitting it alone on its own rows."""
    x, y, groups = _problem()
    pre = Preconditioner.from_sample(x[:100], rank=8)
    heads = Heads.grid([0.01, 1.0], 2)  # held-out groups 0 and 1, and every row: 6 heads
    n_rows = np.array([np.sum(groups != g) if g >= 0 else len(x) for g in heads.held_out])
    coef, icpt = _train(Engine(x.shape[1], 3, heads, n_rows, loss, pre), x, y, groups)
    assert coef.shape == (6, 3, 64) and icpt.shape == (6, 3)
    for h, (C, g) in enumerate(zip(heads.C, heads.held_out)):
        alone = Engine(x.shape[1], 3, Heads(np.array([C]), np.array([g])), n_rows[h : h + 1], loss, pre)
        c1, i1 = _train(alone, x, y, groups)
        np.testing.assert_allclose(coef[h], c1[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(icpt[h], i1[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(coef[0], coef[1], atol=1e-3)  # the C values do differ


def test_a_held_out_group_is_never_seen_by_its_head():
    x, y, groups = _problem(1)
    pre = Preconditioner.from_sample(x, rank=4)
    heads = Heads(np.array([1.0]), np.array([0]))
    a = _train(Engine(64, 3, heads, np.array([np.sum(groups != 0)]), "lr", pre), x, y, groups)
    x2 = x.copy()
    x2[groups == 0] = 1e3  # anything at all in the held-out rows
    b = _train(Engine(64, 3, heads, np.array([np.sum(groups != 0)]), "lr", pre), x2, y, groups)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)


def test_the_preconditioner_damps_the_top_directions_of_the_sample():
    rng = np.random.default_rng(2)
    basis = np.linalg.qr(rng.normal(size=(50, 50)))[0]
    x = (rng.normal(size=(400, 50)) * np.r_[[30.0, 10.0], np.ones(48)]) @ basis.T + 5.0
    pre = Preconditioner.from_sample(x.astype(np.float32), rank=2)
    np.testing.assert_allclose(pre.mu, x.mean(0), atol=1e-3)
    assert pre.V.shape == (50, 2) and np.allclose(np.abs(pre.V.T @ basis[:, :2]), np.eye(2), atol=0.05)  # the two loud directions
    assert 0.99 < pre.shrink[0] < 1 and 0.9 < pre.shrink[1] < pre.shrink[0] and 0.5 < pre.delta < 2  # noise level 1 left


@pytest.mark.parametrize("loss, k", [("lr", 3), ("svm", 3), ("lr", 2), ("svm", 2)])
def test_the_container_is_an_sgd_classifier_with_the_engine_decisions(loss, k):
    rng = np.random.default_rng(3)
    coef, icpt, x = rng.normal(size=(k, 10)), rng.normal(size=k), rng.normal(size=(20, 10)).astype(np.float32)
    clf = engine.classifier(loss, coef, icpt, np.arange(k) + 5, C=1.0, n=100)
    assert type(clf).__name__ == "SGDClassifier" and clf.n_features_in_ == 10
    logits = x @ coef.T + icpt
    np.testing.assert_array_equal(clf.predict(x), logits.argmax(1) + 5)
    if loss == "lr":
        p = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(clf.predict_proba(x), p / p.sum(1, keepdims=True), rtol=1e-5)  # the softmax that was fitted


@pytest.mark.parametrize("loss", ["lr", "svm"])
def test_the_tensorflow_engine_computes_what_the_numpy_engine_does(loss):
    x, y, groups = _problem(4)
    pre = Preconditioner.from_sample(x[:100], rank=8)
    heads = Heads.grid([0.1, 10.0], 1)
    n_rows = np.array([np.sum(groups != 0), np.sum(groups != 0), len(x), len(x)])
    tf_engine, kind = device.make_engine("tensorflow", (64,), "flatten", 3, heads, n_rows, loss, pre)
    assert type(tf_engine).__name__ == "TFEngine" and kind == "cpu"  # no GPU on the test machines: TensorFlow's CPU
    a = _train(tf_engine, x, y, groups)
    b = _train(Engine(64, 3, heads, n_rows, loss, pre), x, y, groups)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-3, atol=1e-4)


def test_numpy_is_the_engine_without_a_gpu_and_a_bad_backend_is_refused(monkeypatch):
    from pipeline.core.errors import PipelineError

    monkeypatch.setattr(device, "_gpu_possible", lambda: False)
    x, *_ = _problem()
    pre = Preconditioner.from_sample(x[:50], rank=2)
    eng, kind = device.make_engine("auto", (64,), "flatten", 3, Heads.grid([1.0], 0), np.array([240]), "lr", pre)
    assert type(eng) is Engine and kind == "cpu"
    with pytest.raises(PipelineError, match=r"engine backend 'cuda': choose one of auto, numpy, tensorflow"):
        device.make_engine("cuda", (64,), "flatten", 3, Heads.grid([1.0], 0), np.array([240]), "lr", pre)
