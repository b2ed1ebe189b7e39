"""Feature store: what an existing output holds for the next run (fingerprint, rejections, row index), and the reader that validates a file (the rules of ``verify`` that cost no pass over the features) and guards every read of its features; the writer is ``featurefile.writer``."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from pipeline.core.errors import PipelineError, first_line, printable
from pipeline.core.outputs import refuse_special, special_kind
from pipeline.featurefile import schema as contract
from pipeline.featurefile.checks import source_problem, stale_sources
from pipeline.featurefile.schema import DATASETS, VERSION_COLUMNS, column_problem, is_complete, version_problem
from pipeline.images.listing import Reject

REQUIRED_DATASETS = ("features", "labels", "label_names", "paths")
#: Attributes whose difference makes two feature files incompatible (train vs test, shards).
SPEC_KEYS = ("backbone", "layer", "input_size", "preprocessing", "resize", "weights", "weights_checksum")


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
    """What the file at ``output`` holds for a new run (a missing, incomplete or unreadable file: no fingerprint).

    A complete file of this version that breaks a rule of the contract (``verify``'s, but the
    scan of the features: an update checks the chunks it keeps) has no fingerprint either: it
    was changed by another tool, and nothing in it is reused.
    """
    if special_kind(output):  # never opened: a FIFO blocks
        return Stored(problem=f"it is {special_kind(output)}, not a feature file")
    try:
        with h5py.File(output, "r") as db:
            if not is_complete(db.attrs):
                return Stored()
            problem = version_problem(db)
            if problem:
                return Stored(problem=f"it was written by another version of the pipeline ({problem})")
            unreadable = source_problem(db, Path(output))
            if unreadable:
                return Stored(problem=f"it cannot be read ({unreadable})")
            broken = contract.problems(db, Path(output))
            if broken:
                more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
                return Stored(problem=f"it breaks the feature-file contract ({broken[0]}{more}: `python -m pipeline verify {output}`)")
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


#: Classes named one by one in a summary; beyond, the smallest and the largest.
NAMED_CLASSES = 12
#: A class with under this share of the images is named in a warning (or under half an even share, when there are many classes).
SMALL_CLASS = 0.05


def class_summary(output: Path, warn: bool = True) -> str:
    """The classes of ``output`` with their image counts, for a summary line; with ``warn``, a class with few images is warned about on stderr (not for one shard: a shard's share says nothing of the data)."""
    counts = [(printable(name), k) for name, k in class_counts(output)]  # names not UTF-8: escapes
    total = sum(k for _, k in counts)
    limit = min(SMALL_CLASS, 0.5 / len(counts)) * total
    for name, k in counts:
        if warn and k < limit:
            print(f"warning: class {name!r} has {k} of the {total} images ({100 * k / max(total, 1):.1f}%); "
                  "its scores will rest on very few rows", file=sys.stderr)  # fmt: skip
    if len(counts) <= NAMED_CLASSES:
        return f"{len(counts)} classes: " + ", ".join(f"{name} {k}" for name, k in counts)
    small, large = min(counts, key=lambda c: c[1]), max(counts, key=lambda c: c[1])
    return f"{len(counts)} classes, {small[1]} ({small[0]}) to {large[1]} ({large[0]}) images each"


def _rows(key, n: int) -> str:
    """The rows a dataset read asks for, as ``a..b``."""
    key = key[0] if isinstance(key, tuple) and key else key
    if isinstance(key, slice):
        start, stop, _ = key.indices(n)
        return f"{start}..{stop}"
    try:
        idx = np.asarray(key).reshape(-1)
        return f"{int(idx.min())}..{int(idx.max()) + 1}" if idx.size else "(none)"
    except (TypeError, ValueError):
        return "(some)"


class GuardedFeatures(h5py.Dataset):
    """The ``features`` dataset of an open feature file: a read that meets damaged data (a chunk that does not
    decompress) is one ``PipelineError`` naming the file and the rows, not HDF5's stack of errors."""

    def __init__(self, ds: h5py.Dataset, path: Path):
        super().__init__(ds.id)
        self.file_path = path

    def _damaged(self, key, exc: Exception) -> PipelineError:
        return PipelineError(
            f"{self.file_path}: features of rows {_rows(key, self.shape[0])} cannot be read ({first_line(exc)}); "
            "the file is damaged: extract it again (`python -m pipeline verify` names what else is wrong)"
        )

    def __getitem__(self, key):
        try:
            return super().__getitem__(key)
        except OSError as exc:
            raise self._damaged(key, exc) from None

    def read_direct(self, dest, source_sel=None, dest_sel=None):
        try:
            return super().read_direct(dest, source_sel, dest_sel)
        except OSError as exc:
            raise self._damaged(source_sel if source_sel is not None else slice(None), exc) from None


class FeatureDB(h5py.File):
    """An h5py file whose ``features`` reads are guarded (``GuardedFeatures``)."""

    def __getitem__(self, name):
        obj = super().__getitem__(name)
        if isinstance(name, str) and name.strip("/") == "features" and isinstance(obj, h5py.Dataset):
            return GuardedFeatures(obj, Path(self.filename))
        return obj


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
        db = FeatureDB(path, "r")
    except Exception as exc:
        raise PipelineError(f"{path}: not a readable HDF5 feature file ({first_line(exc)})") from None
    try:
        unreadable = source_problem(db, path)  # before any row is read: a missing shard reads zeros, a FIFO blocks
        if unreadable:
            raise PipelineError(unreadable)
        stale = stale_sources(path) if "merged" in db and contract.merged_record_ok(db) else []
        if stale:  # before any row is read too: a shard of another row count failed the first read ("corrupt feature file")
            more = f" (and {len(stale) - 1} more: `python -m pipeline verify {path}` lists them)" if len(stale) > 1 else ""
            raise PipelineError(f"{stale[0]} (merge again, or run `extract --ray` again){more}; a reader trusts only files verify accepts")
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
        _reader_contract(db, path, require_complete)
    except PipelineError:
        db.close()
        raise
    except Exception as exc:
        db.close()
        raise PipelineError(f"{path}: corrupt feature file ({first_line(exc)})") from None
    return FeatureFile(path, db)


def _reader_contract(db: h5py.File, path: Path, require_complete: bool) -> None:
    """The rest of ``verify``'s rules that cost no pass over the features: attributes, lengths, counts, duplicate
    or both extracted and rejected paths (a merged file's shard files changed since the merge are refused before, by ``open_features``).

    Raises:
        PipelineError: the first broken rule, and how many more ``verify`` would list.
    """
    found = [m for m in contract.problems(db, path, reader=True) if require_complete or not m.startswith("incomplete")]  # shards: checked first
    if found:
        more = f" (and {len(found) - 1} more: `python -m pipeline verify {path}` lists them)" if len(found) > 1 else ""
        first = found[0] if found[0].startswith(str(path)) else f"{path}: {found[0]}"
        raise PipelineError(f"{first}{more}; a reader trusts only files verify accepts")


def computed_by(ff: FeatureFile) -> dict:
    """How ``ff``'s features were computed beyond its spec: the ``precision``, and for int8 the quantized model's key (``int8_model``)."""
    return {"precision": ff.attrs.get("precision"), "int8_model": json.loads(ff.attrs.get("quantization") or "{}").get("key")}


def check_compatible(a: FeatureFile, b: FeatureFile) -> None:
    """Refuse two feature files that cannot be used together (train vs test)."""
    sa, sb = a.spec, b.spec
    for key in (*SPEC_KEYS, "feature_shape"):
        if sa.get(key) != sb.get(key):
            raise PipelineError(f"{b.path}: {key} is {sb.get(key)!r} but {a.path} has {sa.get(key)!r}")
    theirs = computed_by(b)  # the precision too, as evaluate checks it: int8 test features scored a float32 model unsaid
    for key, value in computed_by(a).items():
        if theirs[key] != value:
            raise PipelineError(f"{b.path}: {key} is {theirs[key]!r} but {a.path} has {value!r}; extract both with the same --precision")
    if a.label_names != b.label_names:
        raise PipelineError(f"{b.path}: class names {b.label_names} differ from {a.path}'s {a.label_names}")
