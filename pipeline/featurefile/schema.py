"""The feature file's contract: every dataset and attribute with its type, rank and length, the version columns and the block of rows a writer takes, checked into one-line reasons (never an exception) for ``verify`` and the validating reader.

The tables below are docs/feature-file.md's table in code (a test keeps the two equal).
``problems(db, path)`` returns every broken rule of an open file; a check that cannot even
read what it checks becomes a reason too. A file of another ``format_version`` or chunk
layout was written by another version of the pipeline: it is refused, to be extracted again.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from pipeline.core.config import EXTRACT_PRECISIONS, RESIZE_METHODS, STORAGE_DTYPES
from pipeline.backbones.registry import BACKBONES
from pipeline.featurefile import chunks

#: The layout this version writes and reads (1, before it, had no inodes, change times or limits).
FORMAT_VERSION = 2
#: The version columns of a feature file's rows (and of ``rejected/``), in ``Listing.versions`` order.
VERSION_COLUMNS = ("file_sizes", "file_mtimes_ns", "file_inodes", "file_ctimes_ns")


@dataclass(frozen=True)
class Column:
    """One dataset: its name, element kind (``float``, ``int``, ``str``), length (``N`` rows,
    ``R`` rejected files, ``C`` classes, ``S`` shards) and rank (0: at least 2)."""

    name: str
    kind: str
    length: str
    rank: int = 1
    merged_only: bool = False


DATASETS = (
    Column("features", "float", "N", rank=0),
    Column("labels", "int", "N"),
    Column("label_names", "str", "C"),
    Column("paths", "str", "N"),
    Column("file_sizes", "int", "N"),
    Column("file_mtimes_ns", "int", "N"),
    Column("file_inodes", "int", "N"),
    Column("file_ctimes_ns", "int", "N"),
    Column("rejected/paths", "str", "R"),
    Column("rejected/reasons", "str", "R"),
    Column("rejected/file_sizes", "int", "R"),
    Column("rejected/file_mtimes_ns", "int", "R"),
    Column("rejected/file_inodes", "int", "R"),
    Column("rejected/file_ctimes_ns", "int", "R"),
    Column("rejected/limits", "str", "R"),
    Column("merged/files", "str", "S", merged_only=True),
    Column("merged/fingerprints", "str", "S", merged_only=True),
    Column("merged/rows", "int", "S", merged_only=True),
)


@dataclass(frozen=True)
class Attr:
    """One attribute: its name, kind (``bool``, ``int``, ``float``, ``str``, ``json``, ``ints``,
    ``strs``), the smallest value of a number, the values allowed, and where it appears
    (``all``, ``single``: files written by one extraction, ``merged``, ``int8``: files of
    ``--precision int8``, ``optional``: well formed when present, files of earlier versions lack it)."""

    name: str
    kind: str
    least: float | None = None
    choices: tuple | None = None
    where: str = "all"


ATTRIBUTES = (
    Attr("complete", "bool"),
    Attr("format_version", "int", 1),
    Attr("backbone", "str", choices=tuple(BACKBONES)),
    Attr("layer", "str"),
    Attr("input_size", "int", 32),
    Attr("feature_shape", "ints"),
    Attr("preprocessing", "str"),
    Attr("resize", "str", choices=RESIZE_METHODS),
    Attr("weights", "str"),
    Attr("weights_source", "str"),
    Attr("weights_checksum", "str"),
    Attr("precision", "str", choices=tuple(p for p in EXTRACT_PRECISIONS if p != "auto")),
    Attr("storage_dtype", "str", choices=STORAGE_DTYPES),
    Attr("batch_size", "int", 1),
    Attr("versions", "json"),
    Attr("created", "str"),
    Attr("command_line", "str"),
    Attr("data_dir", "str"),
    Attr("fingerprint", "json"),
    Attr("extract_seconds", "float", 0),
    Attr("images_processed_last_run", "int", 0),
    Attr("incremental", "bool"),
    Attr("rows_kept", "int", 0),
    # the extraction rate's measurement: the run that computed the most images (an update of 2 images timed start-up, not the rate)
    Attr("rate_images", "int", 0, where="optional"),
    Attr("rate_seconds", "float", 0, where="optional"),
    Attr("n_images", "int", 0),
    Attr("n_rejected", "int", 0),
    Attr("shards", "int", 1),
    Attr("shard", "int", 0, where="single"),
    Attr("merged_from", "strs", where="merged"),
    Attr("quantization", "json", where="int8"),
)


#: The attributes a reader (``open_features``) requires: those every writer of this format sets
#: itself. The feature specification and the provenance may be missing from a file written by another
#: tool (``verify`` requires them); a present attribute must still be well formed.
READER_ATTRS = frozenset({"complete", "format_version", "n_images", "n_rejected"})


class RowBlock(NamedTuple):
    """Consecutive rows on their way into a feature file: the features (an array, or
    ``chunks.Packed`` compressed chunks) and each row's label, path and file version."""

    features: "np.ndarray | chunks.Packed"
    labels: np.ndarray
    paths: list[str]
    sizes: np.ndarray
    mtimes_ns: np.ndarray
    inodes: np.ndarray | None = None  # None: not known (synthetic rows), stored as -1
    ctimes_ns: np.ndarray | None = None

    @classmethod
    def of(cls, features, listing, indices: np.ndarray) -> "RowBlock":
        """The block of ``features`` for the rows ``indices`` of ``listing`` (an ``images.listing.Listing``)."""
        idx = np.asarray(indices, np.int64)
        return cls(features, listing.labels[idx], [listing.paths[i] for i in idx.tolist()], *listing.versions(idx).T)


def is_complete(attrs) -> bool:
    """Whether ``complete`` is a true boolean (a string such as ``"yes"`` is not)."""
    value = attrs.get("complete", False)
    return isinstance(value, (bool, np.bool_)) and bool(value)


def _kind_ok(dtype: np.dtype, kind: str) -> bool:
    if kind == "float":
        return dtype.kind == "f"
    if kind == "int":
        return dtype.kind in "iu"
    return h5py.check_string_dtype(dtype) is not None


def version_problem(db: h5py.File) -> str | None:
    """Why a file with sound columns was written by another version of the pipeline (None: it was
    written by this one): another ``format_version``, or ``features`` in another chunk layout."""
    version = db.attrs.get("format_version")
    if version != FORMAT_VERSION:
        return f"format_version {version}, this version reads {FORMAT_VERSION}"
    feats = db["features"]
    if not feats.is_virtual:
        layout, current = chunks.layout_of(feats), chunks.default_layout(feats.shape[1:], feats.dtype.name)
        if layout != current:
            found = f"{layout.rows} rows, gzip {layout.level}{' + shuffle' if layout.shuffle else ''}" if layout else "unchunked or other filters"
            return f"features stored in chunks of {found}, not the {current.rows} rows, gzip {current.level} of this version"
    return None


def column_problem(db: h5py.File, col: Column) -> str | None:
    """What is wrong with one present dataset's type or rank (None: nothing)."""
    ds = db[col.name]
    if not isinstance(ds, h5py.Dataset):
        return f"'{col.name}' is a group, not a dataset"
    rank = len(ds.shape)
    if (rank < 2) if col.rank == 0 else (rank != col.rank):
        want = "at least 2 dimensions (rows, ...)" if col.rank == 0 else f"{col.rank} dimension"
        return f"dataset '{col.name}' has shape {ds.shape}; it must have {want}"
    if not _kind_ok(ds.dtype, col.kind):
        kind = {"float": "floating point", "int": "integer", "str": "UTF-8 string"}[col.kind]
        return f"dataset '{col.name}' is {ds.dtype}; it must be {kind}"
    return None


def _attr_problem(value, a: Attr) -> str | None:
    k = a.kind
    if k == "bool":
        ok = isinstance(value, (bool, np.bool_))
    elif k == "int":
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    elif k == "float":
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
    elif k in ("str", "json"):
        ok = isinstance(value, str)
    elif k == "ints":
        ok = isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu"
    else:  # strs
        ok = isinstance(value, np.ndarray) and value.ndim == 1 and all(isinstance(x, str) for x in value.tolist())
    if not ok:
        what = {"bool": "a boolean", "int": "an integer", "float": "a finite number", "str": "a string", "json": "a JSON string",
                "ints": "a list of integers", "strs": "a list of strings"}[k]  # fmt: skip
        shown = value.item() if isinstance(value, np.generic) else value.tolist() if isinstance(value, np.ndarray) else value
        return f"attribute '{a.name}' is {shown!r} ({type(value).__name__}); it must be {what}"
    if k == "json":
        try:
            if not isinstance(json.loads(value), dict):
                raise ValueError
        except ValueError:
            return f"attribute '{a.name}' is not a JSON object"
    if a.least is not None and value < a.least:
        return f"attribute '{a.name}' is {value}; it must be at least {a.least:g}"
    if a.choices is not None and value not in a.choices:
        return f"attribute '{a.name}' is {value!r}; it must be one of {', '.join(a.choices)}"
    return None


def problems(db: h5py.File, path: Path, *, reader: bool = False) -> list[str]:
    """Every broken rule of the open feature file ``db`` at ``path``, one line each (empty: sound).

    With ``reader``, the rules of the file's own consistency a reader needs: the same, except
    that only the attributes of ``READER_ATTRS`` must be present (any present one must still be
    well formed) and the rows are not compared with the backbone registry (shape for the
    input size, layer, preprocessing).
    """
    out: list[str] = []
    attrs = dict(db.attrs.items())
    merged = "merged" in db or "merged_from" in attrs
    if not is_complete(attrs):
        out.append("incomplete (attribute 'complete' is not true)")
    for a in ATTRIBUTES:
        if a.where == "single" and merged or a.where == "merged" and not merged or a.where == "int8" and attrs.get("precision") != "int8":
            continue
        if a.name not in attrs:
            if a.where != "optional" and (not reader or a.name in READER_ATTRS):
                out.append(f"attribute '{a.name}' missing")
        elif a.name != "complete" or not isinstance(attrs[a.name], (bool, np.bool_)):
            problem = _attr_problem(attrs[a.name], a)
            if problem:
                out.append(problem)
    good: dict[str, Column] = {}
    for col in DATASETS:
        if col.merged_only and not merged:
            continue
        if col.name not in db:
            out.append(f"missing dataset '{col.name}'")
            continue
        problem = column_problem(db, col)
        if problem:
            out.append(problem)
        else:
            good[col.name] = col
    lengths: dict[str, dict[str, int]] = {}
    for name, col in good.items():
        lengths.setdefault(col.length, {})[name] = int(db[name].shape[0])
    for group, sizes in lengths.items():
        if len(set(sizes.values())) > 1:
            out.append(f"datasets have different lengths: {sizes}")
    if "features" in good and isinstance(attrs.get("format_version"), (int, np.integer)):
        problem = version_problem(db)
        if problem:
            out.append(f"written by another version of the pipeline ({problem}); extract it again")
    out += _cross_checks(db, attrs, good, merged, registry=not reader)
    return out


def _count(attrs: dict, name: str):
    value = attrs.get(name)
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) else None


def _cross_checks(db: h5py.File, attrs: dict, good: dict, merged: bool, registry: bool = True) -> list[str]:
    """The rules that relate values: shapes to attributes (and, with ``registry``, to the backbone's), counts to lengths, labels to classes, paths to rejects."""
    out: list[str] = []
    if "features" in good:
        feats = db["features"]
        shape = attrs.get("feature_shape")
        if isinstance(shape, np.ndarray) and tuple(shape.tolist()) != tuple(feats.shape[1:]):
            out.append(f"features have rows of shape {tuple(feats.shape[1:])} but attribute 'feature_shape' is {shape.tolist()}")
        size = _count(attrs, "input_size")
        net = BACKBONES.get(attrs.get("backbone")) if registry and isinstance(attrs.get("backbone"), str) else None
        if size is not None and net is not None and size < net.min_size:
            out.append(f"attribute 'input_size' is {size}; backbone {net.name} needs at least {net.min_size}")
        elif size is not None and net is not None and size >= 32 and tuple(feats.shape[1:]) != net.feature_shape(size):
            out.append(f"features have rows of shape {tuple(feats.shape[1:])}; {net.name} at input_size {size} gives {net.feature_shape(size)}")
        for key, want in (("layer", net.layer if net else None), ("preprocessing", net.preprocessing if net else None)):
            if want is not None and isinstance(attrs.get(key), str) and attrs[key] != want:
                out.append(f"attribute '{key}' is {attrs[key]!r} but backbone {net.name} gives {want!r}")
        if isinstance(attrs.get("storage_dtype"), str) and str(feats.dtype) != attrs["storage_dtype"]:
            out.append(f"features are {feats.dtype} but attribute 'storage_dtype' is {attrs['storage_dtype']!r}")
        if _count(attrs, "n_images") not in (None, feats.shape[0]):
            out.append(f"attribute 'n_images' is {attrs['n_images']} but features has {feats.shape[0]} rows")
    if "rejected/paths" in good and _count(attrs, "n_rejected") not in (None, db["rejected/paths"].shape[0]):
        out.append(f"attribute 'n_rejected' is {attrs['n_rejected']} but rejected/paths has {db['rejected/paths'].shape[0]} entries")
    shards, shard = _count(attrs, "shards"), _count(attrs, "shard")
    if shards is not None and shard is not None and not merged and not 0 <= shard < shards:
        out.append(f"attribute 'shard' is {shard}; it must be below 'shards' ({shards})")
    if "label_names" in good:
        n_classes = db["label_names"].shape[0]
        if n_classes < 2:
            out.append(f"only {n_classes} class in label_names; classification needs at least two")
        names = [bytes(x) if not isinstance(x, str) else x.encode() for x in db["label_names"][:]]
        if len(set(names)) != n_classes:  # two labels of one name: their rows scored as one class
            out.append(f"label_names name a class twice ({os.fsdecode(next(n for n in names if names.count(n) > 1))!r})")
        if "labels" in good and db["labels"].shape[0]:
            labels = db["labels"][:]
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= n_classes:
                out.append(f"labels range {lo}..{hi} falls outside label_names (0..{n_classes - 1})")
    raw_paths = db["paths"][:] if "paths" in good else None  # read once: the label rule and the path rules
    if raw_paths is not None and "labels" in good and "label_names" in good and len(raw_paths) == db["labels"].shape[0]:
        out += _label_folder_problems(db, raw_paths)
    if raw_paths is not None:
        paths = [os.fsdecode(x) for x in raw_paths]
        if len(set(paths)) != len(paths):
            out.append(f"{len(paths) - len(set(paths))} duplicate paths")
        odd = [p for p in paths if not p or p.startswith("/") or any(part in ("", ".", "..") for part in p.split("/"))]
        if odd:  # bag/../coat/x lies in coat, not bag: the label rule reads a path's first part
            out.append(f"{len(odd)} paths are not plain relative paths (an empty, '.' or '..' part), e.g. {odd[0]!r}")
        if "rejected/paths" in good:
            both = {os.fsdecode(x) for x in db["rejected/paths"][:]} & set(paths)
            if both:
                out.append(f"{len(both)} paths are both extracted and rejected, e.g. {sorted(both)[0]}")
    if merged and all(f"merged/{n}" in good for n in ("files", "fingerprints", "rows")):
        n_shards = db["merged/files"].shape[0]
        names = attrs.get("merged_from")
        if isinstance(names, np.ndarray) and len(names) != n_shards:
            out.append(f"attribute 'merged_from' names {len(names)} shard files but merged/files {n_shards}")
        if shards is not None and n_shards != shards:
            out.append(f"merged/files names {n_shards} shard files but attribute 'shards' is {shards}")
        if "features" in good and int(db["merged/rows"][:].sum()) != db["features"].shape[0]:
            out.append(f"merged/rows add up to {int(db['merged/rows'][:].sum())} but features has {db['features'].shape[0]} rows")
    return out


def _label_folder_problems(db: h5py.File, paths) -> list[str]:
    """Each row's label must name the class folder its path lies in (the path's first part): a file whose labels or label names were edited is refused, not read with shifted classes."""
    names = [os.fsencode(x) for x in db["label_names"][:]]
    labels = db["labels"][:]
    bad = [(i, p, f) for i, (p, lab) in enumerate(zip(paths, labels.tolist()))
           if 0 <= lab < len(names) and (f := os.fsencode(p).split(b"/", 1)[0]) != names[lab]]  # fmt: skip
    if not bad:
        return []
    i, path, folder = bad[0]
    return [f"{len(bad)} rows have a label that is not their class folder, e.g. row {i} ({os.fsdecode(path)}) has label "
            f"{os.fsdecode(names[labels[i]])!r} but lies in class folder {os.fsdecode(folder)!r}"]  # fmt: skip


def merged_record_ok(db: h5py.File) -> bool:
    """Whether a merged file's ``merged/`` record is there, well typed and of one length."""
    cols = [c for c in DATASETS if c.merged_only]
    if not all(c.name in db and column_problem(db, c) is None for c in cols):
        return False
    return len({db[c.name].shape[0] for c in cols}) == 1
