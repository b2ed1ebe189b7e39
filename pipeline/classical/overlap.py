"""Test images that are also training images: the same file (resolved path) or the same content (sha256 of the bytes), found between two feature files, and the rule that refuses such a test file.

Feature files record each row's path relative to the data folder they were extracted from
(``data_dir``) and the file's size. Files of equal size are the only candidates for equal
content, so only those are read and hashed. When an image cannot be read any more (the data
folder moved), its content cannot be compared: ``Overlap.unchecked`` counts such images and
the caller says so, rather than pretending the check was done.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.digests import file_digest
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import same_file


@dataclass
class Overlap:
    """What two feature files share: ``pairs`` of (training image, test image) paths, and how many candidates could not be read."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    unchecked: int = 0


def _files(ff) -> list[tuple[str | None, int]]:
    """(absolute path, size) of every row of an open feature file; the path is None when the file does not name its data folder."""
    root = str(ff.attrs.get("data_dir") or "")
    sizes = ff.db["file_sizes"][:].tolist() if "file_sizes" in ff.db else [-1] * len(ff)
    return [(os.path.realpath(Path(root) / p) if root else None, int(s)) for p, s in zip(ff.paths, sizes)]


def _digest(path: str) -> str | None:
    try:
        return file_digest(Path(path))
    except OSError:
        return None

def shared_images(train_ff, test_ff) -> Overlap:
    """The test rows whose image is one of the training rows' images, by resolved path or by content.

    Args:
        train_ff, test_ff: open feature files (``featurefile.store.FeatureFile``).

    Returns:
        ``Overlap``: the shared (training path, test path) pairs, in test-row order, and the
        number of same-size candidates whose bytes could not be read.
    """
    train, test = _files(train_ff), _files(test_ff)
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
        match = next((c for c in candidates if digest(c) == mine), None)
        if match is not None:
            out.pairs.append((match, p))
        elif any(digest(c) is None for c in candidates):
            out.unchecked += 1
    return out


def check_no_overlap(ff, test_ff, allowed: bool) -> None:
    """Refuse a test file that is the training file or shares images with it (same resolved path or same content).

    Raises:
        PipelineError: naming the count and the first shared image, unless ``allowed``.
    """
    if same_file(Path(ff.path), Path(test_ff.path)):
        raise PipelineError(f"{test_ff.path}: is the training file {ff.path}; a test set must hold other images (extract a separate test folder)")
    if allowed:
        return
    found = shared_images(ff, test_ff)
    if found.pairs:
        train_path, test_path = found.pairs[0]
        same = "the same file" if train_path == test_path else f"the same content as {train_path}"
        raise PipelineError(
            f"{test_ff.path}: {len(found.pairs)} of its {len(test_ff)} images are also training images of {ff.path} "
            f"(first: {test_path}, {same}); test on other images, or pass --allow-overlap if you mean it"
        )
    if found.unchecked:
        print(f"note: {found.unchecked} test images could not be compared with the training images by content (their files are gone)", file=sys.stderr)
