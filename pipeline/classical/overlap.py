"""The overlap rule for feature files: a test file that is the training file, or holds one of its images (``images/overlap.py``: same resolved path or same content), is refused.

Feature files record each row's path relative to the data folder they were extracted from
(``data_dir``) and the file's size, which is all ``images.overlap.shared_files`` needs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.outputs import same_file
from pipeline.images.overlap import refuse_shared, shared_files


def row_files(ff) -> list[tuple[str | None, int]]:
    """(absolute path, size) of every row of an open feature file; the path is None when the file does not name its data folder.

    A row whose image changed since it was extracted (another size or modification time) gets size -1: today's bytes are not the
    ones its features come from, so they are never compared by content (``stale_rows`` counts them).
    """
    root = str(ff.attrs.get("data_dir") or "")
    sizes = ff.db["file_sizes"][:].tolist() if "file_sizes" in ff.db else [-1] * len(ff)
    mtimes = ff.db["file_mtimes_ns"][:].tolist() if "file_mtimes_ns" in ff.db else [None] * len(ff)
    out = []
    for p, s, m in zip(ff.paths, sizes, mtimes):
        path = os.path.realpath(Path(root) / p) if root else None
        try:
            now = os.stat(path) if path is not None else None
        except OSError:
            now = None
        out.append((path, -1 if now is not None and m is not None and (now.st_size, now.st_mtime_ns) != (s, m) else int(s)))
    return out


def grouping_files(files: list[tuple[str | None, int]]) -> list[tuple[str | None, int]]:
    """``row_files`` for keeping identical images together (``images.overlap.split_groups``): a row whose image changed since it was
    extracted (size -1: another modification time, e.g. after ``touch``) is grouped by its bytes today, never left ungrouped.

    Grouping too much is harmless (rows kept on one side); missing twins is not (a ``touch`` on twins split them, with no word).
    """
    out, regrouped = [], 0
    for p, s in files:
        if s < 0 and p is not None:
            try:
                s = os.stat(p).st_size
                regrouped += 1
            except OSError:
                pass
        out.append((p, s))
    if regrouped:
        print(f"note: {regrouped} images changed since they were extracted: kept with identical images by their bytes today (one that was "
              "identical when extracted and changed since cannot be known: extract again)", file=sys.stderr)  # fmt: skip
    return out


def stale_rows(ff, files: list[tuple[str | None, int]]) -> int:
    """How many rows' images changed since they were extracted (size -1 in ``files``, ``ff``'s ``row_files``, where the file records one)."""
    recorded = ff.db["file_sizes"][:] if "file_sizes" in ff.db else None
    return 0 if recorded is None else sum(s < 0 <= r for (_, s), r in zip(files, recorded.tolist()))


def training_record(ff, rows, files: list[tuple[str | None, int]]) -> dict:
    """What a bundle keeps of the images its model was fitted on (``rows`` of ``ff``, whose ``row_files`` are ``files``): their data
    folder, relative paths and sizes, so ``evaluate`` can refuse data holding one of them (``images.overlap.recorded_files``)."""
    rows = np.asarray(rows, np.int64)
    return {"data_dir": str(ff.attrs.get("data_dir") or ""), "files": [files[int(r)][0] for r in rows],
            "sizes": np.asarray([files[int(r)][1] for r in rows], np.int64)}


def check_no_overlap(ff, test_ff, allowed: bool, files: list[tuple[str | None, int]] | None = None) -> None:
    """Refuse a test file that is the training file or shares images with it (same resolved path or same content).

    ``files`` is ``row_files(ff)`` when the caller already has it (every row's image is stat-ed once per run).

    Raises:
        PipelineError: naming the count and the first shared image, unless ``allowed``.
    """
    if same_file(Path(ff.path), Path(test_ff.path)):
        raise PipelineError(f"{test_ff.path}: is the training file {ff.path}; a test set must hold other images (extract a separate test folder)")
    if not allowed:
        test_files, files = row_files(test_ff), row_files(ff) if files is None else files
        refuse_shared(shared_files(files, test_files), test_ff.path, len(test_ff), ff.path)
        say_stale(test_ff, test_files)
        say_stale(ff, files, "training images", "the test images")


def say_stale(ff, files: list[tuple[str | None, int]], what: str = "images", against: str = "the training images") -> None:
    """Say on stderr how many of a feature file's images changed since they were extracted (``files``: its ``row_files``): their
    features come from bytes that are gone, so an image copied or touched since cannot be told by content (on either side)."""
    stale = stale_rows(ff, files)
    if stale:
        print(f"note: {stale} {what} of {ff.path} changed since they were extracted: not compared with {against} by content "
              "(extract that file again)", file=sys.stderr)  # fmt: skip
