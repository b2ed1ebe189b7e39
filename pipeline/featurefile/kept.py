"""What an update keeps of a previous complete feature file: which rows and rejections still hold for the current listing (same path, file version and class), and reading those rows back as blocks, whole compressed chunks as they are stored."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np

from pipeline.featurefile import chunks
from pipeline.featurefile.schema import RowBlock
from pipeline.featurefile.store import stored_rows
from pipeline.images.listing import Listing, Reject


@dataclass(frozen=True)
class Kept:
    """What an update keeps of the previous complete output at ``path``."""

    path: Path
    rows: np.ndarray  # rows of the old file still valid (ascending)
    index: np.ndarray  # their listing indices
    rejected: list[Reject]  # old rejections still valid
    rejected_index: np.ndarray
    old_rows: int
    damaged: tuple[tuple[int, int, str], ...] = ()  # row ranges of the old file whose chunk cannot be trusted: extracted again

    def whole(self, listed: int) -> bool:
        """Whether the old file holds exactly the ``listed`` files, every row still valid: nothing to extract, nothing to drop."""
        return len(self.rows) == self.old_rows and len(self.covered) == listed
    @property
    def covered(self) -> np.ndarray:
        """Listing indices this update already accounts for (kept rows and kept rejections)."""
        return np.concatenate([self.index, self.rejected_index]).astype(np.int64)


def find_kept(output: Path, listing: Listing, keep_rejected: Callable[[str], bool] = lambda limit: True) -> Kept:
    """Match the old file's rows to the listing by path, version (size, mtime, inode, ctime) and class.

    A rejection is kept only if its file is unchanged and ``keep_rejected(limit)``: a
    rejection caused by a limit that has changed since is decoded again. A row is kept only
    if its chunk of the old file decompresses to finite values (``chunks.damaged_rows``):
    bytes copied into the new file are checked first, and the rows of a damaged chunk are
    extracted again.
    """
    paths, versions, classes, rejects = stored_rows(output)
    with h5py.File(output, "r") as db:
        damaged = tuple(chunks.damaged_rows(db["features"]))
    bad = np.zeros(len(paths), bool)
    for start, stop, _ in damaged:
        bad[start:stop] = True
    idx, same = listing.match(paths, versions)
    rows = [r for r in np.flatnonzero(same & ~bad).tolist() if listing.class_names[listing.labels[idx[r]]] == classes[r]]
    ridx, rsame = listing.match([r.path for r in rejects], np.asarray([r[2:6] for r in rejects], np.int64).reshape(-1, 4))
    kept = [k for k, (rec, good) in enumerate(zip(rejects, rsame.tolist())) if good and keep_rejected(rec.limit)]
    return Kept(
        output, np.asarray(rows, np.int64), idx[rows].astype(np.int64),
        [rejects[k] for k in kept], ridx[kept].astype(np.int64), len(paths), damaged,
    )  # fmt: skip


def kept_blocks(kept: Kept, listing: Listing, block: int = 1024) -> Iterator[RowBlock]:
    """The kept rows of the previous output, in their old order, a block at a time.

    Where every row of one of the old file's chunks is kept, the chunk comes as it is stored
    (``chunks.Packed``, read with ``read_direct_chunk``), so the new file copies it without
    recompressing; the other kept rows come as values.
    """
    with h5py.File(kept.path, "r") as db:
        feats = db["features"]
        rows, index = kept.rows, kept.index
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
                    yield RowBlock.of(chunks.Packed(layout, data, [layout.rows] * len(data)), listing, index[start:stop])
                    start = stop
                    continue
            stop = start + 1
            while stop < len(rows) and stop - start < block and not (layout is not None and whole[int(rows[stop]) // layout.rows]):
                stop += 1
            r = rows[start:stop]
            lo, hi = int(r[0]), int(r[-1]) + 1
            # Kept rows are mostly dense: one contiguous read, then pick; sparse ones one by one.
            yield RowBlock.of(feats[lo:hi][r - lo] if hi - lo <= 2 * len(r) else feats[r], listing, index[start:stop])
            start = stop
