"""The feature-file writer: an extraction's rows (arrays, or pre-compressed chunks copied as they are) and rejections into one HDF5 file, written through a temporary name and an atomic rename, ``complete`` set last."""

from __future__ import annotations

import os
from typing import Iterator
from pathlib import Path

import h5py
import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.h5output import h5_output
from pipeline.featurefile import chunks
from pipeline.featurefile.schema import FORMAT_VERSION, VERSION_COLUMNS, RowBlock
from pipeline.images.listing import UNKNOWN, Reject

STR = h5py.string_dtype("utf-8")


def _meta(block: RowBlock) -> tuple:
    """A block's row columns (labels, encoded paths, four version columns; unknown versions as -1)."""
    unknown = np.full(len(block.labels), UNKNOWN, np.int64)
    versions = [unknown if v is None else np.asarray(v, np.int64) for v in (block.sizes, block.mtimes_ns, block.inodes, block.ctimes_ns)]
    return (np.asarray(block.labels, np.int32), _encoded(block.paths), *versions)


def _finite(f: np.ndarray, dtype: np.dtype) -> bool:
    with np.errstate(over="ignore"):  # an overflow of the storage dtype becomes inf: refused
        return chunks.all_finite(np.ascontiguousarray(np.asarray(f).astype(dtype, copy=False)))


class _Columns:
    """The row columns of a file being written (labels, paths, versions), appended in large blocks."""

    FLUSH = 1 << 16

    def __init__(self, db: h5py.File):
        self.labels = db.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(4096,))
        self.paths = db.create_dataset("paths", shape=(0,), maxshape=(None,), dtype=STR, chunks=(4096,))
        versions = [db.create_dataset(c, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,)) for c in VERSION_COLUMNS]
        self.datasets = (self.labels, self.paths, *versions)
        self.buffer: list[tuple] = []
        self.buffered = 0
        self.n = 0

    def add(self, meta: tuple) -> None:
        self.buffer.append(meta)
        self.buffered += len(meta[0])
        if self.buffered >= self.FLUSH:
            self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        k = self.buffered
        for ds, parts in zip(self.datasets, zip(*self.buffer)):
            ds.resize(self.n + k, axis=0)
            ds[self.n : self.n + k] = np.concatenate(parts)
        self.n += k
        self.buffer, self.buffered = [], 0

    def close(self) -> int:
        self.flush()
        return self.n


def _encoded(values) -> np.ndarray:
    """File names (str, surrogate-escaped where not UTF-8) as the bytes an HDF5 string dataset stores."""
    return np.asarray([os.fsencode(v) for v in values], dtype=object)


def write_feature_file(
    output: Path,
    *,
    row_shape: tuple[int, ...],
    storage: str,
    class_names: tuple[str, ...],
    rows: Iterator[RowBlock],
    rejected: list[Reject | tuple],
    attrs: dict,
) -> int:
    """Write a complete feature file through a temporary name and an atomic rename.

    ``rows`` yields ``RowBlock``s (or tuples of their fields); they are appended chunk by
    chunk, so memory stays flat. ``features`` is an array, or a ``chunks.Packed`` of
    compressed chunks: those of the file's layout (``chunks.default_layout``) that hold a whole
    chunk of rows are copied into the file as they are; every other row waits for a chunk's
    worth (``chunks.ChunkSink.put``). So rows keep their order, except that rows waiting for a
    chunk are stored after the whole chunks that came meanwhile; every column follows its rows.
    ``rejected`` holds ``Reject`` records (or tuples of their fields). ``complete`` is set
    last. Returns the number of rows written.

    Raises:
        PipelineError: the disk filled up or the output cannot be written; any previous
            file at ``output`` is left untouched.
    """
    dtype = np.dtype(storage)
    rejected = [Reject(*r) for r in rejected]
    with h5_output(output) as (db, check):
        db.attrs["complete"] = False
        layout = chunks.default_layout(row_shape, dtype.name)
        feats = db.create_dataset("features", shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype, **layout.h5_options())
        cols = _Columns(db)
        db.create_dataset("label_names", data=_encoded(class_names), dtype=STR)
        sink = chunks.ChunkSink(feats, layout)
        try:
            for block in rows:
                check()  # a full disk stops the run at the next block, not at the end
                block = RowBlock(*block)
                f = block.features
                k = len(f)
                if k == 0:
                    continue
                seen = sink.taken  # rows taken so far, for messages
                if isinstance(f, chunks.Packed) and not f.finite or not isinstance(f, chunks.Packed) and not _finite(f, dtype):
                    raise PipelineError(f"{output}: non-finite features (overflow of the {storage} storage?) in rows {seen}..{seen + k}")
                for columns in sink.put(f, _meta(block)):  # every column follows its rows
                    cols.add(columns)
            for columns in sink.finish():
                cols.add(columns)
        except BaseException:
            sink.abort()
            raise
        sink.close()
        n = cols.close()
        grp = db.create_group("rejected")
        grp.create_dataset("paths", data=_encoded(r.path for r in rejected), dtype=STR)
        grp.create_dataset("reasons", data=np.asarray([r.reason.encode("utf-8", "backslashreplace") for r in rejected], dtype=object), dtype=STR)
        for name, field in zip(VERSION_COLUMNS, ("size", "mtime_ns", "inode", "ctime_ns")):
            grp.create_dataset(name, data=np.asarray([getattr(r, field) for r in rejected], dtype=np.int64))
        grp.create_dataset("limits", data=np.asarray([r.limit.encode() for r in rejected], dtype=object), dtype=STR)
        for key, value in attrs.items():
            db.attrs[key] = value
        db.attrs["format_version"] = FORMAT_VERSION
        db.attrs["n_images"] = n
        db.attrs["n_rejected"] = len(rejected)
        db.flush()
        db.attrs["complete"] = True
    return n
