"""Pooled rows: pooling arithmetic, unit-RMS and standard scaling, and the chunked and streamed readers of a feature file."""

from __future__ import annotations

import numpy as np
import pytest

from feature_data import make_features
from pipeline.rows.pooling import (
    make_scaler,
    pool_features,
    pooled_dim,
    read_groups,
    scale_batch,
    scale_rows_,
    stream_rows,
    unit_rms_,
)
from pipeline.core.errors import PipelineError
from pipeline.featurefile.store import open_features


def test_pool_features_arithmetic():
    block = np.arange(2 * 2 * 2 * 3, dtype=np.float16).reshape(2, 2, 2, 3)
    flat = pool_features(block, "flatten")
    assert flat.shape == (2, 12) and flat.dtype == np.float32 and flat[1, 0] == 12
    assert pool_features(block, "avg")[0].tolist() == [4.5, 5.5, 6.5]
    assert pool_features(block, "max")[1].tolist() == [21, 22, 23]
    with pytest.raises(PipelineError, match="pool 'sum'"):
        pool_features(block, "sum")


def test_pooled_dim():
    assert pooled_dim((7, 7, 512), "flatten") == 25088
    assert pooled_dim((7, 7, 512), "avg") == pooled_dim((2, 2, 512), "max") == 512
    with pytest.raises(PipelineError, match=r"pool 'sum': choose one of flatten, avg, max"):
        pooled_dim((1, 1, 512), "sum")


def test_unit_rms_scales_in_place_and_keeps_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], np.float32)
    assert unit_rms_(x) is x
    np.testing.assert_allclose(np.sqrt((x**2).mean(axis=1)), [1.0, 0.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(x[0], np.array([3, 4]) * np.sqrt(2) / 5, rtol=1e-6)


def test_standard_scaling_uses_the_fitted_scaler():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(50, 4)).astype(np.float32)
    scaler = make_scaler("standard", 4).fit(x)
    scaled = scale_batch(x[:10].astype(np.float64), "standard", scaler)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, scaler.transform(x[:10]), rtol=1e-4, atol=1e-5)
    y = x.copy()
    scale_rows_(y, "l2", None)
    np.testing.assert_allclose(np.sqrt((y.astype(np.float64) ** 2).mean(axis=1)), 1.0, rtol=1e-5)
    normalizer = make_scaler("l2", 4)  # the stored step: unit norm, i.e. unit RMS / sqrt(d)
    np.testing.assert_allclose(normalizer.transform(x), y / 2.0, rtol=1e-5)


def test_read_groups_and_stream_rows_return_the_pooled_rows(tmp_path):
    f = make_features(tmp_path / "x.h5", row_shape=(2, 2, 8), per_class=30)
    with open_features(f) as ff:
        everything = pool_features(ff.db["features"][:], "avg")
        a, b = np.array([0, 5, 50, 89]), np.array([1, 2, 60])
        scaler = make_scaler("standard", 8)
        got_a, got_b = read_groups(ff, [a, b], "avg", scaler)
        np.testing.assert_array_equal(got_a, everything[a])
        np.testing.assert_array_equal(got_b, everything[b])
        np.testing.assert_allclose(scaler.mean_, everything[a].mean(axis=0), rtol=1e-5)  # fitted on the first group only
        streamed = list(stream_rows(ff, a, "max"))
        assert np.concatenate([r for r, _ in streamed]).tolist() == a.tolist()
        np.testing.assert_array_equal(np.concatenate([x for _, x in streamed]), pool_features(ff.db["features"][:], "max")[a])
