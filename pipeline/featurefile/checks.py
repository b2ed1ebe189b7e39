"""The feature-file checker: every broken rule of a file (single or merged), one line each, never a traceback; whether a merged file's shard files can be read at all (none missing, none a FIFO) and still are the ones it was merged from."""

from __future__ import annotations


import os
from pathlib import Path

import h5py
import numpy as np

from pipeline.featurefile import schema as contract
from pipeline.core.errors import PipelineError, first_line
from pipeline.core.outputs import refuse_special, special_kind
from pipeline.featurefile.schema import is_complete


def verify(path: Path | str) -> list[str]:
    """Every broken rule of the feature-file contract (``pipeline.featurefile.schema``), one line each (empty list: the file is sound).

    Checks every dataset's and attribute's type, rank and length, the counts, label range,
    duplicate paths, paths both extracted and rejected, finite features, ``complete``, and
    for a merged file its record and shard files. Never raises for a bad file: whatever
    cannot be read is a reason too.
    """
    path = Path(path)
    if not path.exists():
        return [f"{path}: feature file does not exist (run `python -m pipeline extract` first)"]
    if path.is_dir():
        return [f"{path}: is a folder, not a feature file"]
    if special_kind(path):  # never opened: reading a FIFO blocks until a writer comes
        return [f"{path}: is {special_kind(path)}, not a feature file"]
    try:
        db = h5py.File(path, "r")
    except Exception as exc:
        return [f"{path}: not a readable HDF5 feature file ({first_line(exc)})"]
    try:
        with db:
            return [first_line(msg) for msg in _problems(db, path)]
    except Exception as exc:  # damage below what the checks read (a corrupt B-tree, a torn chunk)
        return [f"{path}: corrupt feature file ({first_line(exc)})"]


def _problems(db: h5py.File, path: Path) -> list[str]:
    feats = db.get("features")
    unreadable = source_problem(db, path)
    if unreadable:  # everything else would read fill values, or block: this is the one reason
        return [unreadable]
    problems: list[str] = []
    checks = (
        ("layout", lambda: [f"{path}: {m}" for m in contract.problems(db, path)]),
        ("shard files", lambda: stale_sources(path) if "merged" in db and contract.merged_record_ok(db) else []),  # named by their own paths
        ("features", lambda: [f"{path}: {m}" for m in _non_finite(feats)] if isinstance(feats, h5py.Dataset) and contract.column_problem(db, contract.DATASETS[0]) is None else []),
    )
    for what, check in checks:
        try:
            problems += check()
        except Exception as exc:  # a check that cannot read what it checks is a reason, not a crash
            problems.append(f"{path}: {what} unreadable ({first_line(exc)})")
    return problems


def source_problem(db: h5py.File, path: Path) -> str | None:
    """Why the virtual datasets of the open file ``db`` at ``path`` must not be read (None: a single file, or every source can be).

    A missing shard file would read as fill values; one that is a FIFO, a device or a socket
    would block the reader (a FIFO's open waits for a writer, even through SIGTERM); one that is
    itself a merged file (a link to or a copy of one: HDF5 recursed until it crashed) is
    refused, as is ``HDF5_VDS_PREFIX`` in the environment (HDF5 would read the shards from that
    folder instead of beside the file, and every check here would look at others). Shard files
    are looked at (``stat``, their datasets' layout), never read: this is checked before any row is read.
    """
    elsewhere = _stored_elsewhere(db, path)
    if elsewhere:
        return elsewhere
    names = sorted({vs.file_name for ds in db.values() if isinstance(ds, h5py.Dataset) and ds.is_virtual for vs in ds.virtual_sources()})
    if names and "merged" not in db:  # rows another file holds, which can change while this one does not
        return f"{path}: its rows are virtual datasets of {', '.join(names)} but it is not a merged file (no merged record); extract it again"
    listed = {os.fsdecode(x) for x in db["merged/files"][:]} if names and isinstance(db.get("merged/files"), h5py.Dataset) else set(names)
    if set(names) - listed:  # the shard checks look at the listed files: rows must come from those
        return f"{path}: merged file reading {sorted(set(names) - listed)[0]}, which its merged record does not list; merge again"
    if names and os.environ.get("HDF5_VDS_PREFIX"):
        return (f"{path}: merged file, and HDF5_VDS_PREFIX is set ({os.environ['HDF5_VDS_PREFIX']}): HDF5 would read its shards from there "
                "instead of beside it; unset HDF5_VDS_PREFIX")  # fmt: skip
    gone = [name for name in names if not (path.parent / name).exists()]
    if gone:  # never looked for elsewhere: HDF5 would next read a file of that name in the current folder
        hint = f"; it is a link to {os.path.realpath(path)}: name that file, or link its folder" if path.is_symlink() else ""
        return f"{path}: merged file whose shard file(s) {', '.join(gone)} are missing; keep them next to it (move the folder as a whole){hint}"
    try:
        for name in names:
            refuse_special(path.parent / name, f"a shard file of the merged file {path}")
    except PipelineError as exc:
        return str(exc)
    for name in names:
        if _is_merged(path.parent / name):
            return f"{path}: its shard file {path.parent / name} is itself a merged file (a link to or a copy of one); put back the shard extract wrote"
    return None


def _stored_elsewhere(db: h5py.File, path: Path) -> str | None:
    """Why a dataset of ``db`` is not stored in the file itself (None: every one is): an external or soft link, or external storage
    (raw data in another file). verify and train read a link to another file's reversed rows as this file's, and extract said "up to date"."""
    groups = [("", db)] + [(f"{name}/", db[name]) for name in db if isinstance(db.get(name, getlink=True), h5py.HardLink) and isinstance(db[name], h5py.Group)]
    for prefix, group in groups:
        for name in group:
            link = group.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                target = f"{link.filename}:{link.path}" if isinstance(link, h5py.ExternalLink) else link.path
                return f"{path}: '{prefix}{name}' is a link ({type(link).__name__}) to {target}, not stored in the file; a feature file holds its own rows: extract it again"
            obj = group[name]
            if isinstance(obj, h5py.Dataset) and obj.external:
                return f"{path}: '{prefix}{name}' keeps its data in another file ({obj.external[0][0]}); a feature file holds its own rows: extract it again"
    return None


def _is_merged(path: Path) -> bool:
    """Whether the HDF5 file at ``path`` holds a virtual dataset (a merged file), its layout looked at, no row read; False when it cannot be opened."""
    try:
        with h5py.File(path, "r") as db:
            return any(isinstance(ds, h5py.Dataset) and ds.is_virtual for ds in db.values())
    except Exception:  # an unreadable shard is the other checks' to name
        return False


def _non_finite(feats: h5py.Dataset) -> list[str]:
    """The first row with a NaN or an infinity, read a block at a time."""
    step = max(1, int(feats.chunks[0]) if feats.chunks else 256)
    for start in range(0, feats.shape[0], step):
        block = feats[start : start + step]
        bad = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        if bad.any():
            return [f"non-finite feature values (first in row {start + int(np.flatnonzero(bad)[0])})"]
    return []


def stale_sources(path: Path | str) -> list[str]:
    """Why a merged file no longer reads what was merged (empty list: every shard is as merged).

    A shard file that was removed, replaced or re-extracted after the merge makes the
    virtual datasets read fill values or other rows; this compares each shard's stored
    fingerprint and row count with the file now on disk.
    """
    path = Path(path)
    problems = []
    with h5py.File(path, "r") as db:
        if "merged" not in db:
            return [f"{path}: not a merged file"]
        files = [os.fsdecode(x) for x in db["merged/files"][:]]
        fps = [x.decode("utf-8", "replace") for x in db["merged/fingerprints"][:]]
        rows = db["merged/rows"][:].tolist()
    for name, fp, k in zip(files, fps, rows):
        src = path.parent / name
        if special_kind(src):
            problems.append(f"{src}: shard file is {special_kind(src)}, not a feature file")
            continue
        try:
            with h5py.File(src, "r") as s:
                same = is_complete(s.attrs) and str(s.attrs.get("fingerprint")) == fp and s["features"].shape[0] == k
        except Exception:
            problems.append(f"{src}: shard file missing or unreadable")
            continue
        if not same:
            problems.append(f"{src}: shard file changed since the merge")
    return problems


def shard_files(path: Path | str) -> list[Path]:
    """The shard files a merged feature file reads through its virtual datasets ([] for a single file, or one that cannot be read).

    A stage that replaces a folder must count them as inputs: deleting them breaks the merged file.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as db:
            if "merged/files" not in db:
                return []
            return [path.parent / os.fsdecode(x) for x in db["merged/files"][:]]
    except (OSError, ValueError, TypeError):
        return []
