"""Feature store: the output path check, the crash-safe work area of a running extraction, the HDF5 file it becomes, and the reader that validates one."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.outputs import atomic_output, disk_error

FORMAT_VERSION = 1
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


def stored_fingerprint(output: Path) -> tuple[dict | None, bool]:
    """The fingerprint of a complete feature file at ``output`` and whether it is a merged file.

    ``(None, False)`` when there is no file, or it is incomplete or unreadable.
    """
    try:
        with h5py.File(output, "r") as db:
            if not bool(db.attrs.get("complete", False)):
                return None, False
            return json.loads(db.attrs["fingerprint"]), "merged_from" in db.attrs
    except Exception:
        return None, False


class WorkArea:
    """``OUT.h5.partial/``: one small file per finished batch, written atomically.

    A run killed at any moment leaves only whole parts behind (a part is written to a
    temporary name and renamed), so the next run knows exactly which listing rows are
    done. ``manifest.json`` holds the fingerprint of the images and settings; a resume
    with a different fingerprint is refused.
    """

    def __init__(self, output: Path):
        self.path = output.with_name(output.name + ".partial")

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def exists(self) -> bool:
        return self.path.exists()

    def manifest(self) -> dict | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None

    def start(self, fingerprint: dict) -> None:
        """Create an empty work area for ``fingerprint`` (the caller removed any old one)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            tmp = self.manifest_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
            os.replace(tmp, self.manifest_path)
        except OSError as exc:
            raise disk_error(self.path, exc) from None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.npz"))

    def done_indices(self) -> np.ndarray:
        """Listing indices covered by finished parts (extracted or rejected)."""
        done = [np.zeros(0, np.int64)]
        for part in self.parts():
            try:
                with np.load(part) as z:
                    done.append(z["indices"])
                    done.append(z["rejected_indices"])
            except Exception:
                # Only whole parts are ever renamed into place; an unreadable one is damage
                # from outside (disk fault). Drop it so its rows are extracted again.
                part.unlink(missing_ok=True)
        return np.unique(np.concatenate(done))

    def write_part(self, seq: int, indices: np.ndarray, features: np.ndarray, rejected_indices: np.ndarray, reasons: list[str]) -> None:
        """Atomically store one batch: ``features[k]`` belongs to listing row ``indices[k]``."""
        name = self.path / f"part-{seq:09d}.npz"
        tmp = self.path / f".part-{seq:09d}.tmp.npz"
        try:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    indices=np.asarray(indices, np.int64),
                    features=features,
                    rejected_indices=np.asarray(rejected_indices, np.int64),
                    reasons=np.asarray(reasons, dtype=object).astype("U") if reasons else np.zeros(0, "U1"),
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise disk_error(name, exc) from None

    def next_seq(self) -> int:
        parts = self.parts()
        return int(parts[-1].stem.split("-")[1]) + 1 if parts else 0

    def index(self) -> list["PartInfo"]:
        """The finished parts in listing order, without their features (those are read one part at a time)."""
        infos = []
        for part in self.parts():
            with np.load(part) as z:
                infos.append(PartInfo(part, z["indices"], z["rejected_indices"], [str(r) for r in z["reasons"].tolist()]))
        infos.sort(key=lambda p: p.first)
        return infos

    @staticmethod
    def features(part: "PartInfo") -> np.ndarray:
        with np.load(part.path) as z:
            return z["features"]


@dataclass(frozen=True)
class PartInfo:
    """One finished batch in the work area: which listing rows it extracted and which it rejected, and why."""

    path: Path
    indices: np.ndarray
    rejected_indices: np.ndarray
    reasons: list[str]

    @property
    def first(self) -> int:
        return int(min(self.indices.min(initial=1 << 62), self.rejected_indices.min(initial=1 << 62)))


def _chunk_rows(row_shape: tuple[int, ...], itemsize: int) -> int:
    """Rows per HDF5 chunk: about 1 MiB per chunk, whatever the feature size."""
    row_bytes = int(np.prod(row_shape)) * itemsize
    return int(max(1, min(4096, (1 << 20) // max(1, row_bytes))))


def write_feature_file(
    output: Path,
    *,
    row_shape: tuple[int, ...],
    storage: str,
    class_names: tuple[str, ...],
    rows: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    rejected: list[tuple[str, str, int, int]],
    attrs: dict,
) -> int:
    """Write a complete feature file through a temporary name and an atomic rename.

    ``rows`` yields ``(features, labels, paths, sizes, mtimes_ns)`` blocks in file order;
    they are appended chunk by chunk, so memory stays flat. ``rejected`` holds
    ``(path, reason, size, mtime_ns)``. ``complete`` is set last.
    Returns the number of rows written.

    Raises:
        PipelineError: the disk filled up or the output cannot be written; any previous
            file at ``output`` is left untouched.
    """
    dtype = np.dtype(storage)
    chunk = _chunk_rows(row_shape, dtype.itemsize)
    n = 0
    with atomic_output(output) as tmp, h5py.File(tmp, "w") as db:
        db.attrs["complete"] = False
        feats = db.create_dataset(
            "features",
            shape=(0, *row_shape),
            maxshape=(None, *row_shape),
            dtype=dtype,
            chunks=(chunk, *row_shape),
            compression="gzip",
            compression_opts=4,
            shuffle=True,
        )
        labels = db.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(4096,))
        paths = db.create_dataset("paths", shape=(0,), maxshape=(None,), dtype=STR, chunks=(4096,))
        sizes = db.create_dataset("file_sizes", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
        mtimes = db.create_dataset("file_mtimes_ns", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
        db.create_dataset("label_names", data=np.asarray([os.fsencode(c) for c in class_names], dtype=object), dtype=STR)
        for f, lab, p, s, m in rows:
            k = len(f)
            if k == 0:
                continue
            with np.errstate(over="ignore"):  # an overflow is caught just below, as inf
                f = f.astype(dtype, copy=False)
            if not np.all(np.isfinite(f)):
                raise PipelineError(f"{output}: non-finite features (overflow of the {storage} storage?) in rows {n}..{n + k}")
            for ds in (feats, labels, paths, sizes, mtimes):
                ds.resize(n + k, axis=0)
            feats[n : n + k] = f
            labels[n : n + k] = lab
            paths[n : n + k] = [os.fsencode(x) for x in p]
            sizes[n : n + k] = s
            mtimes[n : n + k] = m
            n += k
        grp = db.create_group("rejected")
        grp.create_dataset("paths", data=np.asarray([os.fsencode(r[0]) for r in rejected], dtype=object), dtype=STR)
        grp.create_dataset("reasons", data=np.asarray([r[1].encode("utf-8", "backslashreplace") for r in rejected], dtype=object), dtype=STR)
        grp.create_dataset("file_sizes", data=np.asarray([r[2] for r in rejected], dtype=np.int64))
        grp.create_dataset("file_mtimes_ns", data=np.asarray([r[3] for r in rejected], dtype=np.int64))
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
            dataset, has rows of different lengths, labels outside ``label_names``, or a
            single class.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: feature file does not exist (run `python -m pipeline extract` first)")
    try:
        db = h5py.File(path, "r")
    except Exception as exc:
        raise PipelineError(f"{path}: not a readable HDF5 feature file ({exc})") from None
    try:
        if require_complete and not bool(db.attrs.get("complete", False)):
            raise PipelineError(f"{path}: incomplete feature file (attribute 'complete' is not set; the extraction did not finish)")
        for name in REQUIRED_DATASETS:
            if name not in db:
                raise PipelineError(f"{path}: missing dataset '{name}'")
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
        raise PipelineError(f"{path}: corrupt feature file ({exc})") from None
    return FeatureFile(path, db)


def check_compatible(a: FeatureFile, b: FeatureFile) -> None:
    """Refuse two feature files that cannot be used together (train vs test)."""
    sa, sb = a.spec, b.spec
    for key in (*SPEC_KEYS, "feature_shape"):
        if sa.get(key) != sb.get(key):
            raise PipelineError(f"{b.path}: {key} is {sb.get(key)!r} but {a.path} has {sa.get(key)!r}")
    if a.label_names != b.label_names:
        raise PipelineError(f"{b.path}: class names {b.label_names} differ from {a.path}'s {a.label_names}")
