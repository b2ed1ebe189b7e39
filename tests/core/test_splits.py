"""The one seeded, stratified split every stage calls."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.splits import split_indices


def test_split_indices_is_stratified_and_deterministic():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 7 + [3])
    tr, te = split_indices(labels, 0.2, seed=0)
    assert np.bincount(labels[te], minlength=4).tolist() == [2, 1, 1, 0]  # round(0.2 n), at least 1, the singleton stays in training
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(len(labels)))
    assert tr.dtype == np.int64 and (np.diff(tr) > 0).all() and (np.diff(te) > 0).all()
    again = split_indices(labels, 0.2, seed=0)
    assert np.array_equal(again[0], tr) and np.array_equal(again[1], te)
    other = {tuple(split_indices(labels, 0.2, seed=s)[1]) for s in range(5)}
    assert len(other) > 1
    # Adding a class leaves the other classes' split unchanged.
    more = np.concatenate([labels, [4] * 6])
    assert np.array_equal(split_indices(more, 0.2, seed=0)[1][:-1], te)
    with pytest.raises(PipelineError, match="test size 1.0"):
        split_indices(labels, 1.0)


def test_split_refuses_bad_arguments():
    with pytest.raises(PipelineError, match=r"^seed -1: must be 0 or more$"):
        split_indices(np.array([0, 1]), 0.5, seed=-1)
    with pytest.raises(PipelineError, match=r"labels must be a 1-D array of non-negative integers"):
        split_indices(np.array([0.5, 1.0]))
