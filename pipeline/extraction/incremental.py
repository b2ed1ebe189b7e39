"""Incremental updates: which rows and rejects of a previous complete output still hold for the current listing, and reading those rows back."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.extraction.reader import Listing


@dataclass
class Base:
    """What an incremental run keeps of the previous complete output."""

    path: Path
    fingerprint: dict
    keep_rows: np.ndarray  # rows of the old file still valid (ascending)
    keep_index: np.ndarray  # their listing indices
    kept_rejected: list  # (path, reason, size, mtime) of old rejects still valid
    kept_rejected_index: np.ndarray
    old_rows: int

    @property
    def covered(self) -> np.ndarray:
        """Listing indices this base already accounts for (kept rows and kept rejects)."""
        return np.concatenate([self.keep_index, self.kept_rejected_index]).astype(np.int64)


def plan_incremental(output: Path, old: dict, listing: Listing) -> Base:
    """Match the old file's rows to the listing by path, size, modification time and class."""
    pos = {p: i for i, p in enumerate(listing.paths)}
    with h5py.File(output, "r") as db:
        names = [os.fsdecode(x) for x in db["label_names"][:]]
        old_paths = [os.fsdecode(x) for x in db["paths"][:]]
        sizes, mtimes, labels = db["file_sizes"][:], db["file_mtimes_ns"][:], db["labels"][:]
        rej = db["rejected"]
        rej_rows = list(zip(
            [os.fsdecode(x) for x in rej["paths"][:]],
            [x.decode("utf-8", "replace") for x in rej["reasons"][:]],
            rej["file_sizes"][:].tolist() if "file_sizes" in rej else [-1] * rej["paths"].shape[0],
            rej["file_mtimes_ns"][:].tolist() if "file_mtimes_ns" in rej else [-1] * rej["paths"].shape[0],
        ))  # fmt: skip

    def same(i: int, size: int, mtime: int) -> bool:
        return int(listing.sizes[i]) == size and int(listing.mtimes_ns[i]) == mtime

    keep_rows, keep_index = [], []
    for r, p in enumerate(old_paths):
        i = pos.get(p)
        if i is not None and same(i, int(sizes[r]), int(mtimes[r])) and listing.class_names[listing.labels[i]] == names[labels[r]]:
            keep_rows.append(r)
            keep_index.append(i)
    kept_rejected, kept_rejected_index = [], []
    for p, reason, size, mtime in rej_rows:
        i = pos.get(p)
        if i is not None and same(i, size, mtime):
            kept_rejected.append((p, reason, size, mtime))
            kept_rejected_index.append(i)
    return Base(
        output, old, np.asarray(keep_rows, np.int64), np.asarray(keep_index, np.int64),
        kept_rejected, np.asarray(kept_rejected_index, np.int64), len(old_paths),
    )  # fmt: skip


def base_rows(base: Base, listing: Listing, block: int = 1024):
    """The kept rows of the previous output, in their old order, a block at a time."""
    with h5py.File(base.path, "r") as db:
        feats = db["features"]
        rows, index = base.keep_rows, base.keep_index
        for start in range(0, len(rows), block):
            r, i = rows[start : start + block], index[start : start + block]
            lo, hi = int(r[0]), int(r[-1]) + 1
            # Kept rows are mostly dense: one contiguous read, then pick; sparse ones one by one.
            f = feats[lo:hi][r - lo] if hi - lo <= 2 * len(r) else feats[r]
            yield f, listing.labels[i], [listing.paths[k] for k in i.tolist()], listing.sizes[i], listing.mtimes_ns[i]
