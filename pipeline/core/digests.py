"""Digests of a run's inputs (a file's bytes, an image tree's paths, labels and bytes), and arrays kept in a folder under the digest of what determines them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from pipeline.core.outputs import atomic_output


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (a feature file updated in place by an incremental extract changes it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def tree_digest(root: Path, paths, labels) -> str:
    """SHA-256 of an image tree's listed files: each relative path, its label and its bytes (a changed, added or removed image changes it)."""
    h = hashlib.sha256()
    for path, label in zip(paths, np.asarray(labels).tolist()):
        h.update(os.fsencode(path) + b"\0" + str(label).encode() + b"\0")
        try:
            h.update(hashlib.sha256((Path(root) / path).read_bytes()).digest())
        except OSError as exc:
            h.update(f"unreadable: {exc.strerror}".encode())
    return h.hexdigest()


def key_of(fields: dict) -> str:
    """A short SHA-256 of JSON-able ``fields``: the name under which what they determine is kept."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load_or_compute(folder: Path, fields: dict, shape: tuple, dtype, compute) -> tuple[np.ndarray, bool]:
    """The array kept in ``folder`` under ``key_of(fields)``, or ``compute()`` written there (with ``fields`` beside it); and whether it was reused.

    A file whose size does not match ``shape`` and ``dtype`` (a write cut short) is computed again.
    """
    folder, dtype = Path(folder), np.dtype(dtype)
    path = folder / f"{key_of(fields)}.bin"
    if path.is_file() and path.stat().st_size == int(np.prod(shape)) * dtype.itemsize:
        return np.frombuffer(path.read_bytes(), dtype=dtype).reshape(shape), True
    out = np.ascontiguousarray(compute(), dtype=dtype)
    if out.shape != tuple(shape):  # a programming error, not a user error
        raise RuntimeError(f"computed array has shape {out.shape}, expected {tuple(shape)}")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, suffix=".bin") as tmp:
        Path(tmp).write_bytes(out.tobytes())
    (folder / f"{path.stem}.json").write_text(json.dumps(fields, sort_keys=True, default=str, indent=1) + "\n")
    return out, False
