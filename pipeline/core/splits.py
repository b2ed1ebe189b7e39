"""The canonical row order (rows ranked by path), the one seeded, stratified train/test split and the one set of search folds that every stage calls, so that compare scores every strategy on the same rows whatever order a file stores them in, and no group of identical images straddles a split or a fold."""

from __future__ import annotations

import os

import numpy as np

from pipeline.core.errors import PipelineError


#: Why a class can be left without training rows by a split that keeps identical images together (said by every stage that refuses it).
NO_TRAINING_IMAGES = "every image of it was rejected, or is byte-identical to an image of another class, which the split keeps on that image's side"


def canonical_order(paths) -> np.ndarray:
    """Row indices ranking the rows by path, compared as bytes: the order every result of a set of rows is computed in.

    A feature file may store its rows out of listing order (an incremental update writes the
    re-extracted rows after the kept chunks, a merged file groups them by shard), so whatever
    picks or visits rows (a split, folds, a fit) goes through this order: the result is then a
    function of the set of (path, label, features) rows, not of the order they are stored in.

    Args:
        paths: one path per row (``bytes`` as an HDF5 paths column holds them, or ``str``,
            compared as their file-system encoding).

    Returns:
        int64 indices ``order`` with ``paths[order]`` ascending (ties, which a valid file
        cannot have, keep their stored order).
    """
    keys = np.asarray([p if isinstance(p, bytes) else os.fsencode(p) for p in paths], dtype=object)
    return np.argsort(keys, kind="stable").astype(np.int64) if len(keys) else np.zeros(0, np.int64)


def split_indices(labels, test_size: float = 0.2, seed: int = 0, keys=None, groups=None) -> tuple[np.ndarray, np.ndarray]:
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
        keys: one path per row (see ``canonical_order``): the rows are ranked by it before
            the shuffle, so the split is a function of the set of (key, label) pairs, not of
            the rows' order. None: the rows are taken in the order given (a listing, already
            in path order).
        groups: one group id per row (any integers; rows with equal ids are one group, e.g.
            byte-identical images: ``images.overlap.duplicate_groups``), or None (every row its
            own group). Whole groups are split: each group stands as its first row in the
            ranked order, with that row's label, and its other rows follow it to its side. The
            shares above then count groups, not rows; when every group is a single row the
            split is exactly the split without ``groups``.

    Returns:
        ``(train_rows, test_rows)``: sorted int64 row indices, disjoint, covering every row.

    Raises:
        PipelineError: ``test_size`` outside (0, 1), a negative seed, labels that are
            not a 1-D array of non-negative integers, or keys or groups of another length.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0)):
        raise PipelineError("split_indices: labels must be a 1-D array of non-negative integers")
    if not 0.0 < test_size < 1.0:
        raise PipelineError(f"test size {test_size}: must be between 0 and 1 (exclusive)")
    if seed < 0:
        raise PipelineError(f"seed {seed}: must be 0 or more")
    order = np.arange(len(labels), dtype=np.int64) if keys is None else canonical_order(keys)
    if len(order) != len(labels):
        raise PipelineError(f"split_indices: {len(order)} keys for {len(labels)} labels")
    head = np.arange(len(labels), dtype=np.int64)  # each row's group, named by the group's first ranked row
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise PipelineError(f"split_indices: {groups.size} group ids for {len(labels)} labels")
        _, first, inverse = np.unique(groups[order], return_index=True, return_inverse=True)
        head[order] = order[first][inverse.reshape(-1)]
        order = order[head[order] == order]  # the groups' first rows, still ranked
    ranked = labels[order]
    test = [np.zeros(0, np.int64)]
    for c in np.unique(ranked):
        rows = order[ranked == c]
        perm = np.random.default_rng([int(seed), int(c)]).permutation(rows)
        n = len(rows)
        k = int(np.floor(test_size * n + 0.5)) if n >= 2 else 0
        if n >= 2:
            k = min(max(k, 1), n - 1)
        test.append(perm[:k])
    held = np.isin(head, np.concatenate(test))
    return np.flatnonzero(~held).astype(np.int64), np.flatnonzero(held).astype(np.int64)


def fold_ids(labels, cv: int, seed: int, groups=None) -> np.ndarray:
    """The fold (0 to ``cv - 1``) of each row: the stratified folds every search uses, whole ``groups`` in one fold.

    ``StratifiedKFold(cv, shuffle=True, random_state=seed)`` over the rows in the order given
    (the plan's path order). With ``groups`` (as ``split_indices``': byte-identical images),
    each group stands as its first row, with that row's label, and its other rows follow it
    into its fold: a search never scores a candidate on a copy of one of its training rows.
    When every group is a single row the folds are exactly the folds without ``groups``.

    Raises:
        PipelineError: no class has ``cv`` groups (``StratifiedKFold`` cannot fill the folds).
    """
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    head = np.arange(len(labels), dtype=np.int64)
    if groups is not None:
        _, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
        head = first[inverse.reshape(-1)].astype(np.int64)
    lead = np.flatnonzero(head == np.arange(len(labels)))  # each group's first row, in the order given
    _, counts = np.unique(labels[lead], return_counts=True)
    if not len(counts) or counts.max() < cv:
        raise PipelineError(f"{len(lead)} distinct training images ({len(labels)} rows): no class has the {cv} needed to fill --cv {cv} folds; lower --cv or add images")
    fold = np.empty(len(labels), np.int64)
    for f, (_, test) in enumerate(StratifiedKFold(cv, shuffle=True, random_state=seed).split(np.zeros(len(lead)), labels[lead])):
        fold[lead[test]] = f
    return fold[head]
