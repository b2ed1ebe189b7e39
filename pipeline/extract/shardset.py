"""Shard sets: read and check one extraction's shard files, and write the merged file of HDF5 virtual datasets over them.

The merged file's ``features``, ``labels``, ``paths`` and file versions (``file_sizes``,
``file_mtimes_ns``, ``file_inodes``, ``file_ctimes_ns``) are virtual datasets (VDS) over the shards: no feature is copied, and h5py,
``open_features``, ``train`` and ``predict`` read it exactly like a file written by one
extraction. ``label_names``, ``rejected/`` and the attributes are real copies. Rows: shard
0's, then shard 1's, and so on; inside a shard, its own file order. Shard file names are
stored relative to the merged file's folder, so the folder can be moved as a whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.h5output import h5_output
from pipeline.core.outputs import OutputLock, refuse_special, same_file
from pipeline.core.signals import sigterm_as_interrupt
from pipeline.extract.preflight import check_names_fit, check_not_a_link
from pipeline.extract.fingerprints import SHARD_LOCAL_KEYS, merged_fingerprint
from pipeline.featurefile.schema import VERSION_COLUMNS
from pipeline.featurefile.store import open_features
from pipeline.featurefile.writer import STR

#: Row datasets, one value per extracted image: merged as virtual datasets.
ROW_DATASETS = ("features", "labels", "paths", *VERSION_COLUMNS)
#: ``rejected/`` columns: copied.
REJECTED = ("paths", "reasons", *VERSION_COLUMNS, "limits")
#: What a virtual dataset reads where a source file is missing: values every reader rejects
#: (NaN features fail ``verify``, label -1 fails ``open_features``), never plausible zeros.
_FILL = {"features": np.nan, "labels": -1, **{c: -1 for c in VERSION_COLUMNS}}
#: Fingerprint keys that say which images a shard belongs to, named as such when they differ.
_LISTING = {"whole_listing_sha256": "the listing of the whole data folder", "whole_n_files": "the number of files in the data folder"}
#: Attributes of shard 0 that describe one shard's run, not the merged file: recomputed.
_PER_RUN_ATTRS = (
    "complete", "fingerprint", "shard", "n_images", "n_rejected", "created", "command_line",
    "extract_seconds", "images_processed_last_run", "incremental", "rows_kept", "rate_images", "rate_seconds",
)  # fmt: skip


@dataclass
class _Shard:
    path: Path
    index: int
    fingerprint: dict
    fingerprint_json: str
    attrs: dict
    rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    label_names: list[str]


def _read_shard(path: Path) -> _Shard:
    with open_features(path) as ff:  # refuses a missing, corrupt or incomplete file
        a = ff.attrs
        if "merged_from" in a:
            raise PipelineError(f"{path}: is itself a merged file; merge its shard files ({', '.join(a['merged_from'])}) instead")
        try:
            fp_json = str(a["fingerprint"])
            fp = json.loads(fp_json)
            index, total = int(fp["shard"]), int(fp["shards"])
        except (KeyError, TypeError, ValueError):
            raise PipelineError(f"{path}: no shard fingerprint (not written by `python -m pipeline extract --shards N --shard K`)") from None
        missing = [name for name in (*ROW_DATASETS, *(f"rejected/{c}" for c in REJECTED)) if name not in ff.db]
        if missing:
            raise PipelineError(f"{path}: missing dataset(s) {', '.join(missing)}")
        if not 0 <= index < total:
            raise PipelineError(f"{path}: shard index {index} outside 0..{total - 1}")
        return _Shard(path, index, fp, fp_json, a, len(ff), ff.row_shape, ff.db["features"].dtype, ff.label_names)


def _check_shards(shards: list[_Shard]) -> list[_Shard]:
    """Refuse shards that do not form exactly one run's complete set; return them in shard order."""
    first = min(shards, key=lambda s: s.index)
    ref = {k: v for k, v in first.fingerprint.items() if k not in SHARD_LOCAL_KEYS}
    for s in shards:
        here = {k: v for k, v in s.fingerprint.items() if k not in SHARD_LOCAL_KEYS}
        for key in sorted(set(ref) | set(here)):
            if key == "data_dir" and ref.get(key) and here.get(key) and same_file(Path(ref[key]), Path(here[key])):
                continue  # one folder, spelled two ways (a bind mount)
            if key in _LISTING and ref.get(key) != here.get(key):
                raise PipelineError(
                    f"{s.path}: made from another state of the data folder than {first.path} ({key} {here.get(key)!r} vs "
                    f"{ref.get(key)!r}: {_LISTING[key]} changed between their runs); re-extract the shards made before the change"
                )
            if ref.get(key) != here.get(key):
                raise PipelineError(
                    f"{s.path}: made with {key} {here.get(key)!r} but {first.path} with {ref.get(key)!r}; "
                    "all shards must come from one extraction's data folder, settings and weights"
                )
        if s.label_names != first.label_names:
            raise PipelineError(f"{s.path}: label_names {s.label_names} differ from {first.path}'s {first.label_names}")
        if (s.row_shape, s.dtype) != (first.row_shape, first.dtype):
            raise PipelineError(
                f"{s.path}: features are {s.dtype} {s.row_shape} but {first.path}'s are {first.dtype} {first.row_shape}"
            )
    total = int(ref["shards"])
    by_index: dict[int, _Shard] = {}
    for s in shards:
        if s.index in by_index:
            raise PipelineError(f"{s.path}: shard {s.index} of {total} given twice (also {by_index[s.index].path})")
        by_index[s.index] = s
    missing = [k for k in range(total) if k not in by_index]
    if missing:
        listed = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise PipelineError(
            f"missing shard{'s' if len(missing) > 1 else ''} {listed} of {total}: the shards were made with "
            f"--shards {total} but {len(shards)} shard file{'s' if len(shards) > 1 else ''} given"
        )
    return [by_index[k] for k in range(total)]


def _source_name(source: Path, output: Path) -> str:
    """The name the virtual dataset stores for ``source``: relative to the merged file's folder."""
    return os.path.relpath(os.path.abspath(source), os.path.abspath(output.parent or Path(".")))


def _layout(name: str, shards: list[_Shard], names: list[str], n: int, dtype, row_shape) -> h5py.VirtualLayout:
    layout = h5py.VirtualLayout(shape=(n, *row_shape), dtype=dtype)
    start = 0
    for s, src in zip(shards, names):
        if s.rows:
            layout[start : start + s.rows] = h5py.VirtualSource(src, name, shape=(s.rows, *row_shape), dtype=dtype)
        start += s.rows
    return layout


def _row_specs(first: _Shard) -> dict:
    return {
        "features": (first.dtype, first.row_shape),
        "labels": (np.dtype(np.int32), ()),
        "paths": (STR, ()),
        **{c: (np.dtype(np.int64), ()) for c in VERSION_COLUMNS},
    }


def _check_disjoint(shards: list[_Shard]) -> None:
    """No path may appear twice across the shards, extracted or rejected."""
    seen: dict[str, Path] = {}
    for s in shards:
        with h5py.File(s.path, "r") as db:
            paths = [os.fsdecode(x) for x in db["paths"][:]]
            rejected = [os.fsdecode(x) for x in db["rejected/paths"][:]]
        for p in paths + rejected:
            other = seen.setdefault(p, s.path)
            if other != s.path:
                raise PipelineError(f"{s.path}: image {p} is also in {other}; the shards overlap (made from different listings?)")


def _write(output: Path, shards: list[_Shard], command_line: str, ran: set[int] | None) -> tuple[int, int]:
    first = shards[0]
    n = sum(s.rows for s in shards)
    # The per-run attributes count the shards extracted by this run; the others were kept whole.
    fresh = [s for s in shards if ran is None or s.index in ran]
    kept = [s for s in shards if ran is not None and s.index not in ran]
    names = [_source_name(s.path, output) for s in shards]
    attrs = {k: v for k, v in first.attrs.items() if k not in _PER_RUN_ATTRS}
    attrs.update(
        fingerprint=json.dumps(merged_fingerprint([s.fingerprint for s in shards]), sort_keys=True),
        merged_from=names,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command_line=command_line or str(first.attrs.get("command_line", "")),
        # Shards run side by side: the longest one is the wall time of the extraction.
        extract_seconds=max((float(s.attrs.get("extract_seconds", 0.0)) for s in fresh), default=0.0),
        images_processed_last_run=sum(int(s.attrs.get("images_processed_last_run", 0)) for s in fresh),
        incremental=bool(kept) or any(bool(s.attrs.get("incremental", False)) for s in fresh),
        rows_kept=sum(int(s.attrs.get("rows_kept", 0)) for s in fresh) + sum(s.rows for s in kept),
    )
    def read_back(tmp: Path) -> None:  # a source HDF5 cannot find reads as the fill value: a wrong name shows here, not in training
        with h5py.File(tmp, "r") as db:  # the closed file, beside the output: the shards' relative names resolve as they will
            labels = db["labels"][:]
        if not np.array_equal(labels, np.concatenate([np.zeros(0, np.int32)] + [_labels(s.path) for s in shards])):
            raise PipelineError(f"{output}: the virtual datasets do not read back the shards' rows (shard files unreadable?)")

    # libver v110: the format virtual datasets need; also lifts the 64 KiB limit on
    # attributes (merged_from of thousands of shards).
    with h5_output(output, verify=read_back, libver=("v110", "latest")) as (db, _):
        db.attrs["complete"] = False
        for name, (dtype, row_shape) in _row_specs(first).items():
            if n == 0:  # a VDS needs at least one mapping: an empty real dataset instead
                db.create_dataset(name, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype)
            else:
                db.create_virtual_dataset(name, _layout(name, shards, names, n, dtype, row_shape), fillvalue=_FILL.get(name))
        db.create_dataset("label_names", data=np.asarray([os.fsencode(c) for c in first.label_names], dtype=object), dtype=STR)
        rejected = _rejected(shards, REJECTED)
        grp = db.create_group("rejected")
        for name, data in rejected.items():
            grp.create_dataset(name, data=data, dtype=STR if data.dtype == object else data.dtype)
        n_rejected = len(rejected["paths"])
        # Per-shard record: lets a later run tell whether every source is still the one merged.
        rec = db.create_group("merged")
        rec.create_dataset("files", data=np.asarray([os.fsencode(x) for x in names], dtype=object), dtype=STR)
        rec.create_dataset("fingerprints", data=np.asarray([s.fingerprint_json.encode() for s in shards], dtype=object), dtype=STR)
        rec.create_dataset("rows", data=np.asarray([s.rows for s in shards], np.int64))
        for key, value in attrs.items():
            db.attrs[key] = value
        db.attrs["n_images"] = n
        db.attrs["n_rejected"] = n_rejected
        db.attrs["complete"] = True  # published only once read_back has passed
    return n, n_rejected


def _rejected(shards: list[_Shard], columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Every shard's ``rejected/`` columns, concatenated in shard order."""
    texts = ("paths", "reasons", "limits")
    cols: dict[str, list] = {name: [] for name in columns}
    for s in shards:
        with h5py.File(s.path, "r") as db:
            g = db["rejected"]
            for name in cols:
                cols[name].append(g[name][:])
    return {
        name: np.asarray(np.concatenate(parts), dtype=object if name in texts else np.int64)
        for name, parts in cols.items()
    }


def _labels(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as db:
        return db["labels"][:].astype(np.int32)


def merge_locked(
    output: Path, shards: list[Path], *, overwrite: bool = False, command_line: str = "", ran: set[int] | None = None
) -> tuple[int, int]:
    """``merge`` for a caller that already holds ``OutputLock(output)``: the paths checked, then ``write_merged``."""
    output = Path(output)
    if not shards:
        raise PipelineError("merge: no shard files given")
    if output.suffix.lower() not in (".h5", ".hdf5"):
        raise PipelineError(f"{output}: the output must be an HDF5 file ending in .h5 or .hdf5")
    check_not_a_link(output)
    check_names_fit(output)
    refuse_special(output, "the merged output")
    for p in shards:
        refuse_special(Path(p), "a shard file")  # before any work: reading a FIFO blocks
    for p in shards:
        if same_file(Path(p), output):  # by identity: `//x`, `a/../x` or a linked folder name the same file
            raise PipelineError(f"{p}: is both the output ({output}) and a shard; write the merged file elsewhere")
    if output.exists() and not overwrite:
        raise PipelineError(f"{output}: exists; pass --overwrite to replace it")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise PipelineError(f"{parent}: output folder does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PipelineError(f"{parent}: output folder is not writable")
    return write_merged(output, [Path(p) for p in shards], command_line=command_line, ran=ran)


def write_merged(output: Path, shards: list[Path], *, command_line: str = "", ran: set[int] | None = None) -> tuple[int, int]:
    """Check that the shard files form one extraction's complete set, write their merged file; returns (rows, rejected).

    For a caller holding ``OutputLock(output)`` whose paths are checked: ``merge_locked``, or ``extract --ray``
    (its output passed ``preflight.check_paths``; its own tasks wrote the shards). ``ran``: the shards the
    caller's run extracted (None: all); the merged file's per-run attributes count the others as kept whole.
    """
    ordered = _check_shards([_read_shard(Path(p)) for p in shards])
    _check_disjoint(ordered)
    return _write(Path(output), ordered, command_line, ran)


def merge(output: Path | str, shards: list[Path | str], *, overwrite: bool = False, command_line: str = "") -> int:
    """Write ``output`` as a virtual-dataset merge of shard feature files.

    Args:
        output: the merged HDF5 file to write (through a temporary name and a rename).
        shards: every shard file of one extraction (``extract --shards N --shard K`` for
            K in 0..N-1), in any order; rows are merged in shard order.
        overwrite: replace an existing ``output``.
        command_line: recorded in the merged file (default: shard 0's).

    Returns:
        The number of rows of the merged file.

    Raises:
        PipelineError: a shard is missing, given twice, incomplete or unreadable, made
            with other settings or weights than the others, or overlapping another; the
            output exists (without ``overwrite``), is locked or cannot be written.
    """
    output = Path(output)
    with sigterm_as_interrupt(), OutputLock(output):
        n, _ = merge_locked(output, [Path(p) for p in shards], overwrite=overwrite, command_line=command_line)
    return n
