"""Test images that are also training images: the same file (resolved path) or the same content (sha256 of the bytes), found between two lists of files, and the one-line refusal every stage with a training and a test set gives; within one list, the groups of identical images that an internal split keeps on one side.

Files of equal size are the only candidates for equal content, so only those are read and
hashed. When an image cannot be read any more (its data folder moved), its content cannot be
compared: ``Overlap.unchecked`` counts such images and the caller says so, rather than
pretending the check was done. ``classical/overlap.py`` applies it to feature files (train),
``list_inputs`` to a training and a test tree (finetune, scratch, compare). ``split_groups``
gives ``core.splits.split_indices`` the groups of one list (train's held-out split of a
feature file, the nets' test and validation splits of a tree).
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.digests import file_digest
from pipeline.core.errors import PipelineError
from pipeline.images.listing import Listing, list_images

#: What a user passes to score on shared images all the same.
ALLOW_FLAG = "--allow-overlap"


@dataclass
class Overlap:
    """What two sets of files share: ``pairs`` of (training image, test image) paths, and how many candidates could not be read."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    unchecked: int = 0


def _digest(path: str) -> str | None:
    try:
        return file_digest(Path(path))
    except OSError:
        return None


def shared_files(train: list[tuple[str | None, int]], test: list[tuple[str | None, int]]) -> Overlap:
    """The test files that are one of the training files, by resolved path or by content.

    Args:
        train, test: (resolved absolute path or None when unknown, size in bytes or -1) of every image.

    Returns:
        ``Overlap``: the shared (training path, test path) pairs, in test order, and the
        number of same-size candidates whose bytes could not be read.
    """
    out = Overlap()
    by_path = {p for p, _ in train if p is not None}
    by_size: dict[int, list[str | None]] = defaultdict(list)
    for p, s in train:
        by_size[s].append(p)
    digests: dict[str, str | None] = {}

    def digest(p: str | None) -> str | None:
        if p is None:
            return None
        if p not in digests:
            digests[p] = _digest(p)
        return digests[p]

    by_digest: dict[int, tuple[dict[str, str | None], bool]] = {}  # size -> (digest -> first training file, some unreadable)
    for p, s in test:
        if p is not None and p in by_path:
            out.pairs.append((p, p))
            continue
        candidates = by_size.get(s, []) if s >= 0 else []
        if not candidates:
            continue
        mine = digest(p)
        if mine is None:
            out.unchecked += 1
            continue
        if s not in by_digest:  # one table per size: linear in the files, never training x test comparisons
            table: dict[str, str | None] = {}
            for c in candidates:
                if digest(c) is not None:
                    table.setdefault(digest(c), c)
            by_digest[s] = table, any(digest(c) is None for c in candidates)
        table, unreadable = by_digest[s]
        if mine in table:
            out.pairs.append((table[mine], p))
        elif unreadable:
            out.unchecked += 1
    return out


def refuse_shared(found: Overlap, test_what: Path, n_test: int, train_what: Path) -> None:
    """Raise when ``found`` holds a shared image; note on stderr the images that could not be compared.

    Raises:
        PipelineError: ``TEST: K of its N images are also training images of TRAIN (first: P, the same file); ...``.
    """
    if found.pairs:
        train_path, test_path = found.pairs[0]
        same = "the same file" if train_path == test_path else f"the same content as {train_path}"
        raise PipelineError(f"{test_what}: {len(found.pairs)} of its {n_test} images are also training images of {train_what} "
                            f"(first: {test_path}, {same}); test on other images, or pass {ALLOW_FLAG} if you mean it")  # fmt: skip
    if found.unchecked:
        print(f"note: {found.unchecked} test images could not be compared with the training images by content (their files are gone)", file=sys.stderr)


def record_of(listing, exclude=()) -> dict:
    """What a bundle keeps of the images its model may have been fitted on: every image of ``listing`` but ``exclude`` (relative paths,
    e.g. the held-out test images), as (resolved path, size), read back by ``recorded_files``."""
    skip = set(exclude)
    kept = [f for p, f in zip(listing.paths, listing_files(listing)) if p not in skip]
    return {"data_dir": str(listing.root), "files": [p for p, _ in kept], "sizes": np.asarray([s for _, s in kept], np.int64)}


def recorded_files(record) -> list[tuple[str | None, int]] | None:
    """(resolved path, size) of each training image a bundle records; None for a bundle without a usable record (an older version's,
    or an empty one: a model is fitted on some images, and an empty list let evaluate score its training rows unsaid)."""
    try:
        files, sizes = record["files"], np.asarray(record["sizes"], np.int64)
        if not len(files) or len(files) != len(sizes) or not all(f is None or isinstance(f, str) for f in files):
            return None
        return list(zip(files, sizes.tolist()))
    except (TypeError, KeyError, ValueError, IndexError):
        return None


def say_unknown_bytes(trained_on: list[tuple[str | None, int]], model_what: str, against) -> None:
    """Say on stderr how many recorded training images had changed since their extraction when the model was fitted (size -1):
    their bytes then are not known, so they are not compared by content."""
    changed = sum(p is not None and size < 0 for p, size in trained_on)
    if changed:
        print(f"note: {changed} of the images {model_what} was fitted on had changed since their extraction when it was fitted: "
              f"not compared with {against} by content", file=sys.stderr)  # fmt: skip


def refuse_trained_on(record, listing, paths, allowed: bool, model_what: str) -> None:
    """Refuse test images (``paths``, relative to ``listing``'s root) that a bundle's model was fitted on (its ``record``), unless ``allowed``.

    Raises:
        PipelineError: one line naming the count and the first such image; a bundle without a record is said on stderr.
    """
    if allowed:
        return
    trained_on = recorded_files(record)
    if trained_on is None:
        print(f"note: {model_what} does not record the images it was fitted on (an earlier version's bundle, or an edited one): not checked against the test images", file=sys.stderr)
        return
    size = dict(zip(listing.paths, listing.sizes.tolist()))
    test = [(os.path.realpath(listing.root / p), int(size.get(p, -1))) for p in paths]
    say_unknown_bytes(trained_on, model_what, listing.root)
    refuse_shared(shared_files(trained_on, test), listing.root, len(test), model_what)


def listing_files(listing, paths=None) -> list[tuple[str, int]]:
    """(resolved path, size) of every image of a ``Listing``, or of its images at the relative ``paths`` (e.g. the decoded ones), in that order."""
    files = [(os.path.realpath(listing.root / p), int(s)) for p, s in zip(listing.paths, listing.sizes)]
    if paths is None:
        return files
    index = {p: i for i, p in enumerate(listing.paths)}
    return [files[index[p]] for p in paths]


def _identical(files: list[tuple[str | None, int]]) -> tuple[np.ndarray, int]:
    """``duplicate_groups``, and how many same-size candidates could not be read."""
    sizes: dict[int, set[str]] = defaultdict(set)
    for p, s in files:
        if p is not None and s >= 0:
            sizes[s].add(p)
    digests = {p: _digest(p) for paths in sizes.values() if len(paths) > 1 for p in sorted(paths)}
    first: dict[tuple, int] = {}
    groups = np.empty(len(files), np.int64)
    for i, (p, s) in enumerate(files):
        d = digests.get(p) if p is not None else None
        key = ("bytes", s, d) if d is not None else ("file", p) if p is not None else ("row", i)
        groups[i] = first.setdefault(key, i)
    return groups, sum(d is None for d in digests.values())


def duplicate_groups(files: list[tuple[str | None, int]]) -> np.ndarray:
    """The group of each file: files that are the same file (resolved path) or hold the same bytes share one.

    Only files whose size another file shares are read and hashed; a file that cannot be
    read (or whose path is None) is a group of its own, as far as its path goes.

    Args:
        files: (resolved absolute path or None when unknown, size in bytes or -1) of every image.

    Returns:
        int64 group ids, one per file: the index of the group's first file.
    """
    return _identical(files)[0]


def split_groups(files: list[tuple[str | None, int]], split: str) -> np.ndarray:
    """``duplicate_groups`` for ``core.splits.split_indices(groups=...)``, with a one-line stderr note when some group holds
    more than one image (how many were kept on one side of ``split``) and when some candidates could not be compared."""
    groups, unchecked = _identical(files)
    sizes = np.bincount(groups, minlength=len(groups))
    if (sizes > 1).any():
        print(f"note: {int((sizes > 1).sum())} groups of identical images ({int(sizes[sizes > 1].sum())} images: the same file or "
              f"the same bytes) are each kept on one side of {split}", file=sys.stderr)  # fmt: skip
    if unchecked:
        print(f"note: {unchecked} images could not be compared by content for {split} (their files are gone); "
              "identical copies among them may fall on both sides", file=sys.stderr)  # fmt: skip
    return groups


def refuse_shared_listings(listing, test_listing, allowed: bool) -> None:
    """Refuse a test tree holding an image of the training tree (the same file, or the same bytes under another name), unless ``allowed``.

    Raises:
        PipelineError: one line naming the count and the first shared image.
    """
    if test_listing is None or allowed:
        return
    refuse_shared(shared_files(listing_files(listing), listing_files(test_listing)), test_listing.root, len(test_listing), listing.root)


def list_inputs(data_dir: Path, test_dir: Path | None, allow_overlap: bool = False) -> tuple[Listing, Listing | None]:
    """The listings of the training tree and of the test tree (None without ``--test``).

    Raises:
        PipelineError: a folder ``list_images`` refuses, a test tree whose classes differ, or one that
            shares images with the training tree (unless ``allow_overlap``: ``images.overlap``).
    """
    listing = list_images(data_dir)
    test_listing = None
    if test_dir is not None:
        test_listing = list_images(test_dir)
        if test_listing.class_names != listing.class_names:
            raise PipelineError(
                f"--test {test_dir}: its classes {list(test_listing.class_names)} differ from "
                f"{list(listing.class_names)} in {data_dir}; the test folder needs the same class sub-folders"
            )
    refuse_shared_listings(listing, test_listing, allow_overlap)
    return listing, test_listing
