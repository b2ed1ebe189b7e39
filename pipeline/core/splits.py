"""The one seeded, stratified train/test split that every stage calls, so that compare scores every strategy on the same rows."""

from __future__ import annotations

import numpy as np

from pipeline.core.errors import PipelineError


def split_indices(labels, test_size: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The one train/test split of labelled rows that every stage uses.

    Stratified: each class is shuffled with its own generator (seeded by ``seed`` and
    the class id, so one class's split does not depend on the others) and
    ``round(test_size * n_class)`` of its rows go to the test side, at least one and at
    most ``n_class - 1`` when the class has two rows or more (a class with a single row
    stays in training).

    Args:
        labels: 1-D integer labels (non-negative), one per row.
        test_size: share of each class to hold out, in (0, 1).
        seed: non-negative seed; the same labels and seed always give the same split.

    Returns:
        ``(train_rows, test_rows)``: sorted int64 row indices, disjoint, covering every row.

    Raises:
        PipelineError: ``test_size`` outside (0, 1), a negative seed, or labels that are
            not a 1-D array of non-negative integers.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0)):
        raise PipelineError("split_indices: labels must be a 1-D array of non-negative integers")
    if not 0.0 < test_size < 1.0:
        raise PipelineError(f"test size {test_size}: must be between 0 and 1 (exclusive)")
    if seed < 0:
        raise PipelineError(f"seed {seed}: must be 0 or more")
    train, test = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        perm = np.random.default_rng([int(seed), int(c)]).permutation(rows)
        n = len(rows)
        k = int(np.floor(test_size * n + 0.5)) if n >= 2 else 0
        if n >= 2:
            k = min(max(k, 1), n - 1)
        test.append(perm[:k])
        train.append(perm[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
