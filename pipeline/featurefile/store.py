"""Feature store: the output path check, what an existing output holds for the next run (fingerprint, rejections, row index), the HDF5 feature file an extraction becomes (written atomically, pre-compressed chunks copied as they are), and the reader that validates one."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from pipeline.core.errors import PipelineError, first_line
from pipeline.core.outputs import atomic_output, refuse_special, special_kind
from pipeline.featurefile import chunks
from pipeline.featurefile.schema import DATASETS, FORMAT_VERSION, VERSION_COLUMNS, RowBlock, column_problem, is_complete, version_problem
from pipeline.images.listing import UNKNOWN, Reject

REQUIRED_DATASETS = ("features", "labels", "label_names", "paths")
STR = h5py.string_dtype("utf-8")
#: Attributes whose difference makes two feature files incompatible (train vs test, shards).
SPEC_KEYS = ("backbone", "layer", "input_size", "preprocessing", "resize", "weights", "weights_checksum")


def check_output_writable(output: Path) -> None:
    """Make sure ``output`` (a file path) can be written: its folder exists (it is created) and is writable.

    Raises:
        PipelineError: ``output`` is a folder, its parent is not a folder or cannot be
            created, or the folder or an existing file is not writable.
    """
    output = Path(output)
    parent = output.parent if str(output.parent) else Path(".")
    if output.exists() and output.is_dir():
        raise PipelineError(f"{output}: is a folder; the output must be a file path ending in .h5")
    refuse_special(output, "the output")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PipelineError(f"{parent}: cannot create the output folder: {exc.strerror}") from None
    if not parent.is_dir():
        raise PipelineError(f"{parent}: the output's parent is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PipelineError(f"{parent}: output folder is not writable")
    if output.exists() and not os.access(output, os.W_OK):
        raise PipelineError(f"{output}: output file is not writable")


@dataclass(frozen=True)
class Stored:
    """What a new run must know of an existing output before it decides: the fingerprint of a
    complete feature file of this version, whether it is a merged file, and its rejections;
    without a fingerprint, ``problem`` says why there is none."""

    fingerprint: dict | None = None
    merged: bool = False
    rejected: tuple[Reject, ...] = ()
    problem: str = "it is not a complete feature file"


def stored_output(output: Path) -> Stored:
    """What the file at ``output`` holds for a new run (a missing, incomplete or unreadable file: no fingerprint)."""
    if special_kind(output):  # never opened: a FIFO blocks
        return Stored(problem=f"it is {special_kind(output)}, not a feature file")
    try:
        with h5py.File(output, "r") as db:
            if not is_complete(db.attrs):
                return Stored()
            problem = version_problem(db)
            if problem:
                return Stored(problem=f"it was written by another version of the pipeline ({problem})")
            return Stored(json.loads(db.attrs["fingerprint"]), "merged_from" in db.attrs, tuple(_rejects(db)), "")
    except Exception:
        return Stored()


def _versions(group: h5py.Group) -> np.ndarray:
    """``(n, 4)`` file versions of a group's rows, in ``VERSION_COLUMNS`` order."""
    return np.stack([group[c][:] for c in VERSION_COLUMNS], axis=1).astype(np.int64)


def _rejects(db: h5py.File) -> list[Reject]:
    """The ``rejected/`` records of an open feature file."""
    rej = db["rejected"]
    texts = [[x.decode("utf-8", "replace") for x in rej[c][:]] for c in ("reasons", "limits")]
    return [Reject(os.fsdecode(p), r, *v, lim) for p, r, v, lim in zip(rej["paths"][:], texts[0], _versions(rej).tolist(), texts[1])]


def stored_rows(output: Path) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """The row index of a complete feature file: each row's path, file version ``(n, 4)`` and class name, and the file's rejections."""
    with h5py.File(output, "r") as db:
        names = [os.fsdecode(x) for x in db["label_names"][:]]
        paths = [os.fsdecode(x) for x in db["paths"][:]]
        return paths, _versions(db), [names[k] for k in db["labels"][:].tolist()], _rejects(db)


def class_counts(path: Path) -> list[tuple[str, int]]:
    """Each class of a feature file with its number of rows, in ``label_names`` order (reads the labels only)."""
    with h5py.File(path, "r") as db:
        names = [os.fsdecode(x) for x in db["label_names"][:]]
        counts = np.bincount(db["labels"][:].astype(np.int64), minlength=len(names))
    return list(zip(names, counts.tolist()))


def _meta(block: RowBlock) -> tuple:
    """A block's row columns (labels, encoded paths, four version columns; unknown versions as -1)."""
    unknown = np.full(len(block.labels), UNKNOWN, np.int64)
    versions = [unknown if v is None else np.asarray(v, np.int64) for v in (block.sizes, block.mtimes_ns, block.inodes, block.ctimes_ns)]
    return (np.asarray(block.labels, np.int32), _encoded(block.paths), *versions)


def _take(meta: tuple, start: int, count: int) -> tuple:
    return tuple(c[start : start + count] for c in meta)


def _finite(f: np.ndarray, dtype: np.dtype) -> bool:
    with np.errstate(over="ignore"):  # an overflow of the storage dtype becomes inf: refused
        return chunks.all_finite(np.ascontiguousarray(np.asarray(f).astype(dtype, copy=False)))


class _Pending:
    """Rows waiting to fill a chunk (features with their columns), first in, first out."""

    def __init__(self, layout: chunks.Layout):
        self.layout = layout
        self.blocks: list[tuple] = []
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def add(self, features: np.ndarray, meta: tuple) -> None:
        self.blocks.append((features, meta))
        self.n += len(features)

    def take(self, k: int) -> tuple[np.ndarray, tuple]:
        feats = np.concatenate([f for f, _ in self.blocks]) if len(self.blocks) > 1 else self.blocks[0][0]
        meta = tuple(np.concatenate(c) for c in zip(*(m for _, m in self.blocks)))
        rest = len(feats) - k
        self.blocks = [(feats[k:], _take(meta, k, rest))] if rest else []
        self.n = rest
        return feats[:k], _take(meta, 0, k)


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
    chunk, so memory stays flat. ``features`` is an array, or a
    ``chunks.Packed`` of compressed chunks: those of the file's layout (``chunks.default_layout``)
    that hold a whole chunk of rows are copied into the file as they are
    (``write_direct_chunk``); every other row waits until a chunk's worth has gathered and is
    compressed on a thread pool. So rows keep their order, except that rows waiting for a chunk
    are stored after the whole chunks that came meanwhile; every column follows its rows.
    ``rejected`` holds ``Reject`` records (or tuples of their fields). ``complete`` is set
    last. Returns the number of rows written.

    Raises:
        PipelineError: the disk filled up or the output cannot be written; any previous
            file at ``output`` is left untouched.
    """
    dtype = np.dtype(storage)
    layout = chunks.default_layout(row_shape, dtype.name)
    rejected = [Reject(*r) for r in rejected]
    with atomic_output(output) as tmp, h5py.File(tmp, "w") as db:
        db.attrs["complete"] = False
        feats = db.create_dataset("features", shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype, **layout.h5_options())
        cols = _Columns(db)
        db.create_dataset("label_names", data=_encoded(class_names), dtype=STR)
        sink = chunks.ChunkSink(feats, layout)
        pending = _Pending(layout)
        try:
            for block in rows:
                block = RowBlock(*block)
                f, meta = block.features, _meta(block)
                k = len(f)
                if k == 0:
                    continue
                seen = sink.rows + len(pending)  # rows taken so far, for messages
                if isinstance(f, chunks.Packed) and not f.finite or not isinstance(f, chunks.Packed) and not _finite(f, dtype):
                    raise PipelineError(f"{output}: non-finite features (overflow of the {storage} storage?) in rows {seen}..{seen + k}")
                if isinstance(f, chunks.Packed) and f.layout == layout:
                    # Whole chunks go in as they are; a short one joins the rows waiting for a chunk.
                    start = 0
                    for data, count in zip(f.chunks, f.counts):
                        if count == layout.rows:
                            sink.put_compressed(data, count)
                            cols.add(_take(meta, start, count))
                        else:
                            pending.add(chunks.decompress(data, layout, count), _take(meta, start, count))
                        start += count
                else:
                    values = f.array() if isinstance(f, chunks.Packed) else f
                    with np.errstate(over="ignore"):
                        pending.add(np.asarray(values).astype(dtype, copy=False), meta)
                while len(pending) >= layout.rows:
                    block_rows, block_meta = pending.take(layout.rows)
                    sink.put_rows(block_rows)
                    cols.add(block_meta)
            if len(pending):
                block_rows, block_meta = pending.take(len(pending))
                sink.put_rows(block_rows)
                cols.add(block_meta)
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


@dataclass
class FeatureFile:
    """An open, validated feature file. Use as a context manager; ``db`` is the h5py handle."""

    path: Path
    db: h5py.File

    def __enter__(self) -> "FeatureFile":
        return self

    def __exit__(self, *exc) -> None:
        self.db.close()

    @property
    def attrs(self) -> dict:
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self.db.attrs.items()}

    @property
    def label_names(self) -> list[str]:
        return [os.fsdecode(x) if isinstance(x, bytes) else str(x) for x in self.db["label_names"][:]]

    @property
    def labels(self) -> np.ndarray:
        return self.db["labels"][:].astype(np.int64)

    @property
    def paths(self) -> list[str]:
        return [os.fsdecode(x) for x in self.db["paths"][:]]

    def __len__(self) -> int:
        return int(self.db["features"].shape[0])

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.db["features"].shape[1:])

    @property
    def spec(self) -> dict:
        """What a model trained on this file expects of new features."""
        a = self.attrs
        return {k: a.get(k) for k in SPEC_KEYS} | {"feature_shape": list(self.row_shape)}

    def chunk_rows(self) -> int:
        chunks = self.db["features"].chunks
        return int(chunks[0]) if chunks else 256

    def iter_chunks(self, rows: int | None = None, indices: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, float32 block)``; with ``indices`` (sorted), only those rows, in blocks."""
        ds = self.db["features"]
        step = rows or max(self.chunk_rows(), 64)
        if indices is None:
            for start in range(0, len(self), step):
                yield start, ds[start : start + step].astype(np.float32)
        else:
            for start in range(0, len(indices), step):
                sel = np.asarray(indices[start : start + step])
                yield start, ds[sel].astype(np.float32) if len(sel) else np.zeros((0, *self.row_shape), np.float32)


def open_features(path: Path | str, *, require_complete: bool = True) -> FeatureFile:
    """Open a feature file and check its layout.

    Raises:
        PipelineError: the file is missing, not HDF5 (or corrupt), incomplete, lacks a
            dataset, was written by another version of the pipeline, has rows of different
            lengths, labels outside ``label_names``, or a single class.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: feature file does not exist (run `python -m pipeline extract` first)")
    if path.is_dir():
        raise PipelineError(f"{path}: is a folder, not a feature file")
    refuse_special(path, "a feature file")
    try:
        db = h5py.File(path, "r")
    except Exception as exc:
        raise PipelineError(f"{path}: not a readable HDF5 feature file ({first_line(exc)})") from None
    try:
        if require_complete and not is_complete(db.attrs):
            raise PipelineError(f"{path}: incomplete feature file (attribute 'complete' is not set; the extraction did not finish)")
        for name in REQUIRED_DATASETS:
            if name not in db:
                raise PipelineError(f"{path}: missing dataset '{name}'")
        for col in DATASETS:
            problem = column_problem(db, col) if col.name in REQUIRED_DATASETS else None
            if problem:
                raise PipelineError(f"{path}: {problem}")
        problem = version_problem(db)
        if problem:
            raise PipelineError(f"{path}: written by another version of the pipeline ({problem}); extract it again")
        feats = db["features"]
        if feats.is_virtual:
            gone = sorted({vs.file_name for vs in feats.virtual_sources() if not (path.parent / vs.file_name).exists()})
            if gone:
                raise PipelineError(
                    f"{path}: merged file whose shard file(s) {', '.join(gone)} are missing; keep them next to it (move the folder as a whole)"
                )
        n = feats.shape[0]
        lengths = {name: db[name].shape[0] for name in ("features", "labels", "paths")}
        if len(set(lengths.values())) != 1:
            raise PipelineError(f"{path}: datasets have different lengths: {lengths}")
        n_classes = db["label_names"].shape[0]
        if n_classes < 2:
            raise PipelineError(f"{path}: only {n_classes} class in label_names; classification needs at least two")
        if n:
            labels = db["labels"][:]
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= n_classes:
                raise PipelineError(f"{path}: labels range {lo}..{hi} falls outside label_names (0..{n_classes - 1})")
    except PipelineError:
        db.close()
        raise
    except Exception as exc:
        db.close()
        raise PipelineError(f"{path}: corrupt feature file ({first_line(exc)})") from None
    return FeatureFile(path, db)


def check_compatible(a: FeatureFile, b: FeatureFile) -> None:
    """Refuse two feature files that cannot be used together (train vs test)."""
    sa, sb = a.spec, b.spec
    for key in (*SPEC_KEYS, "feature_shape"):
        if sa.get(key) != sb.get(key):
            raise PipelineError(f"{b.path}: {key} is {sb.get(key)!r} but {a.path} has {sa.get(key)!r}")
    if a.label_names != b.label_names:
        raise PipelineError(f"{b.path}: class names {b.label_names} differ from {a.path}'s {a.label_names}")
