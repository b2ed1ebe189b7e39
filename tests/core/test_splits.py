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


def test_rows_of_one_group_stay_on_one_side():
    """#22: byte-identical twins fell on both sides of the split (every held-out image had its twin in training)."""
    labels = np.repeat([0, 1, 2], 12)
    groups = np.arange(len(labels)) // 2  # pairs of twins
    for seed in range(5):
        tr, te = split_indices(labels, 0.25, seed, groups=groups)
        assert not set(groups[tr]) & set(groups[te])
        assert sorted(np.concatenate([tr, te]).tolist()) == list(range(len(labels)))
        assert np.bincount(labels[te], minlength=3).tolist() == [4, 4, 4]  # round(0.25 * 6 groups) = 2 groups of 2 per class
    # a group stands as its first row in path order, with that row's label, and takes its other rows along
    keys = [f"{c}/{i:03d}.png" for c, i in zip("bbaab", range(5))]
    tr, te = split_indices(np.array([1, 1, 0, 0, 0]), 0.5, 0, keys=keys, groups=[7, 7, 3, 9, 7])
    assert {0, 1, 4} <= set(tr.tolist()) and len(te) == 1 and te[0] in (2, 3)  # group 7 counts as class 1's only group: it stays in training
    with pytest.raises(PipelineError, match=r"^split_indices: 3 group ids for 4 labels$"):
        split_indices(np.array([0, 0, 1, 1]), 0.5, groups=[0, 1, 2])


@pytest.mark.parametrize("with_keys", [False, True])
def test_distinct_groups_give_the_split_without_groups(with_keys):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 57)
    keys = [f"{rng.integers(1 << 30):010d}.png" for _ in labels] if with_keys else None
    for seed in range(4):
        plain = split_indices(labels, 0.2, seed, keys=keys)
        grouped = split_indices(labels, 0.2, seed, keys=keys, groups=rng.permutation(1000)[: len(labels)])
        assert all(np.array_equal(a, b) for a, b in zip(plain, grouped))


def test_search_folds_are_stratified_k_fold_and_keep_each_group_in_one_fold():
    """The search's folds (ninth review of #22: a candidate was scored on byte-identical twins of rows it was fitted on)."""
    from sklearn.model_selection import StratifiedKFold

    from pipeline.core.splits import fold_ids

    labels = np.array([0] * 9 + [1] * 7 + [2] * 5)
    plain = np.empty(len(labels), np.int64)
    for f, (_, test) in enumerate(StratifiedKFold(3, shuffle=True, random_state=4).split(np.zeros(len(labels)), labels)):
        plain[test] = f
    assert np.array_equal(fold_ids(labels, 3, 4), plain)
    assert np.array_equal(fold_ids(labels, 3, 4, groups=np.arange(len(labels))[::-1]), plain)  # every group one row: unchanged
    groups = np.arange(len(labels)) // 2  # pairs: (0, 1), (2, 3), ... across a class boundary once (8, 9)
    fold = fold_ids(labels, 3, 4, groups=groups)
    assert all(len(set(fold[groups == g].tolist())) == 1 for g in np.unique(groups))
    assert sorted(set(fold.tolist())) == [0, 1, 2] and np.array_equal(fold_ids(labels, 3, 4, groups=groups), fold)
    with pytest.raises(PipelineError, match=r"^3 distinct training images \(6 rows\): no class has the 2 needed to fill --cv 2 folds"):
        fold_ids(np.array([0, 0, 1, 1, 2, 2]), 2, 0, groups=np.array([0, 0, 1, 1, 2, 2]))
