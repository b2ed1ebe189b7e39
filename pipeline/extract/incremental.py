"""Incremental updates: which rows and rejects of a previous complete output still hold for the current listing, and reading those rows back."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from pipeline.featurefile import chunks
from pipeline.images.reader import UNKNOWN, Listing, Reject

#: The version columns of a feature file (rows, and rejected/), in ``Listing.versions`` order.
VERSION_COLUMNS = ("file_sizes", "file_mtimes_ns", "file_inodes", "file_ctimes_ns")


@dataclass
class Base:
    """What an incremental run keeps of the previous complete output."""

    path: Path
    fingerprint: dict
    keep_rows: np.ndarray  # rows of the old file still valid (ascending)
    keep_index: np.ndarray  # their listing indices
    kept_rejected: list[Reject]  # old rejects still valid
    kept_rejected_index: np.ndarray
    old_rows: int

    @property
    def covered(self) -> np.ndarray:
        """Listing indices this base already accounts for (kept rows and kept rejects)."""
        return np.concatenate([self.keep_index, self.kept_rejected_index]).astype(np.int64)


def _versions(group: h5py.Group, n: int) -> np.ndarray:
    """``(n, 4)`` versions of a group's rows; a column an older file lacks is unknown (-1), so its rows never match."""
    return np.stack([group[c][:] if c in group else np.full(n, UNKNOWN, np.int64) for c in VERSION_COLUMNS], axis=1).astype(np.int64)


def _rejects(db: h5py.File) -> list[Reject]:
    """The ``rejected/`` records of an open feature file (an unknown limit is "?")."""
    rej = db["rejected"]
    k = rej["paths"].shape[0]
    versions = _versions(rej, k).tolist()
    limits = [x.decode("utf-8", "replace") for x in rej["limits"][:]] if "limits" in rej else ["?"] * k
    reasons = [x.decode("utf-8", "replace") for x in rej["reasons"][:]]
    return [Reject(os.fsdecode(p), r, *v, lim) for p, r, v, lim in zip(rej["paths"][:], reasons, versions, limits)]


def rejects_to_retry(output: Path, keep_rejected: Callable[[str], bool]) -> int:
    """How many rejections of the complete file ``output`` would not be kept (their limit changed, or a retry was asked for)."""
    try:
        with h5py.File(output, "r") as db:
            return sum(not keep_rejected(r.limit) for r in _rejects(db))
    except Exception:  # not a readable feature file: the caller's fingerprint check decides
        return 0


def plan_incremental(output: Path, old: dict, listing: Listing, keep_rejected: Callable[[str], bool] = lambda limit: True) -> Base:
    """Match the old file's rows to the listing by path, version (size, mtime, inode, ctime) and class.

    A rejection is kept only if its file is unchanged and ``keep_rejected(limit)``: a
    rejection caused by a limit that has changed since is decoded again.
    """
    pos = {p: i for i, p in enumerate(listing.paths)}
    with h5py.File(output, "r") as db:
        names = [os.fsdecode(x) for x in db["label_names"][:]]
        old_paths = [os.fsdecode(x) for x in db["paths"][:]]
        versions, labels = _versions(db, len(old_paths)), db["labels"][:]
        rejects = _rejects(db)

    def unchanged(paths: list[str], old_versions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray([pos.get(p, -1) for p in paths], np.int64)
        ok = idx >= 0
        if ok.any():
            ok[ok] = (listing.versions(idx[ok]) == old_versions[ok]).all(axis=1)
        return idx, ok

    idx, ok = unchanged(old_paths, versions)
    keep_rows, keep_index = [], []
    for r in np.flatnonzero(ok).tolist():
        i = int(idx[r])
        if listing.class_names[listing.labels[i]] == names[labels[r]]:
            keep_rows.append(r)
            keep_index.append(i)
    ridx, rok = unchanged([rec.path for rec in rejects], np.asarray([rec[2:6] for rec in rejects], np.int64).reshape(-1, 4))
    kept_rejected, kept_rejected_index = [], []
    for rec, i, good in zip(rejects, ridx.tolist(), rok.tolist()):
        if good and keep_rejected(rec.limit):
            kept_rejected.append(rec)
            kept_rejected_index.append(i)
    return Base(
        output, old, np.asarray(keep_rows, np.int64), np.asarray(keep_index, np.int64),
        kept_rejected, np.asarray(kept_rejected_index, np.int64), len(old_paths),
    )  # fmt: skip


def base_rows(base: Base, listing: Listing, block: int = 1024):
    """The kept rows of the previous output, in their old order, a block at a time.

    Where every row of one of the old file's chunks is kept, the chunk comes as it is stored
    (``chunks.Packed``, read with ``read_direct_chunk``), so a file of the same layout copies
    it without recompressing; the other kept rows come as values.
    """
    with h5py.File(base.path, "r") as db:
        feats = db["features"]
        rows, index = base.keep_rows, base.keep_index
        layout = chunks.layout_of(feats)
        whole = np.zeros(0, bool)
        if layout is not None and len(rows):
            per_chunk = np.bincount(rows // layout.rows, minlength=(len(feats) + layout.rows - 1) // layout.rows)
            whole = per_chunk == layout.rows  # a short last chunk never counts: its padding is not rows
        start = 0
        while start < len(rows):
            c = int(rows[start]) // layout.rows if layout is not None else -1
            if 0 <= c < len(whole) and whole[c]:
                stop = start
                data = []
                while stop < len(rows) and len(data) < block // layout.rows + 1 and whole[int(rows[stop]) // layout.rows]:
                    mask, raw = feats.id.read_direct_chunk((int(rows[stop]),) + (0,) * (feats.ndim - 1))
                    if mask:  # a filter was skipped for this chunk: read it as values
                        break
                    data.append(raw)
                    stop += layout.rows
                if data:
                    f = chunks.Packed(layout, data, [layout.rows] * len(data))
                    yield _meta_block(f, listing, index[start:stop])
                    start = stop
                    continue
            stop = start + 1
            while stop < len(rows) and stop - start < block and not (layout is not None and whole[int(rows[stop]) // layout.rows]):
                stop += 1
            r = rows[start:stop]
            lo, hi = int(r[0]), int(r[-1]) + 1
            # Kept rows are mostly dense: one contiguous read, then pick; sparse ones one by one.
            f = feats[lo:hi][r - lo] if hi - lo <= 2 * len(r) else feats[r]
            yield _meta_block(f, listing, index[start:stop])
            start = stop


def _meta_block(f, listing: Listing, i: np.ndarray) -> tuple:
    return f, listing.labels[i], [listing.paths[k] for k in i.tolist()], listing.sizes[i], listing.mtimes_ns[i], listing.inodes[i], listing.ctimes_ns[i]
