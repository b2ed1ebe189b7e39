"""Digests of a run's inputs (a file's bytes, an image tree's paths, labels and bytes), and arrays kept in a folder under the digest of what determines them."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.outputs import atomic_output, write_text_atomic


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (a feature file updated in place by an incremental extract changes it).

    Raises:
        OSError: the file cannot be read, or is not a regular file (a FIFO or a device, which is never read: reading one blocks
            or never ends; it is opened without blocking and looked at first).
    """
    with _open_regular(path) as f:
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _open_regular(path: Path):
    """``path`` opened for reading without blocking, when it is a regular file (a FIFO's open would wait for a writer)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return f


def read_regular(path: Path, most: int) -> bytes:
    """The bytes of a regular file of at most ``most`` bytes (a cache's record, a manifest).

    Raises:
        OSError: it cannot be read, is not a regular file (a FIFO, a device: never read), or is larger.
    """
    with _open_regular(path) as f:
        if os.fstat(f.fileno()).st_size > most:
            raise OSError(errno.EFBIG, f"more than {most} bytes", str(path))
        return f.read(most + 1)


def tree_digest(root: Path, paths, labels) -> str:
    """SHA-256 of an image tree's listed files: each relative path, its label and its bytes (a changed, added or removed image changes it)."""
    h = hashlib.sha256()
    for path, label in zip(paths, np.asarray(labels).tolist()):
        h.update(os.fsencode(path) + b"\0" + str(label).encode() + b"\0")
        try:
            h.update(bytes.fromhex(file_digest(Path(root) / path)))
        except OSError as exc:
            h.update(f"unreadable: {exc.strerror}".encode())
    return h.hexdigest()


def key_of(fields: dict) -> str:
    """A short SHA-256 of JSON-able ``fields``: the name under which what they determine is kept."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load_or_compute(folder: Path, fields: dict, shape: tuple, dtype, compute) -> tuple[np.ndarray, bool]:
    """The array kept in ``folder`` under ``key_of(fields)``, or ``compute()`` written there (with ``fields`` beside it); and whether it was reused.

    A file whose bytes are not those written (its sha256, kept beside it: a write cut short, a file
    damaged or replaced since) is computed again. ``folder`` must be a folder (or not exist yet).

    Raises:
        PipelineError: ``folder`` exists and is not a folder.
    """
    folder, dtype = Path(folder), np.dtype(dtype)
    if os.path.lexists(folder) and not folder.is_dir():
        raise PipelineError(f"{folder}: exists and is not a folder; the cache needs a folder of its own")
    path = folder / f"{key_of(fields)}.bin"
    size = int(np.prod(shape)) * dtype.itemsize
    try:  # only regular files, of the sizes written, are read (a FIFO in their place hung the run)
        kept = json.loads(read_regular(folder / f"{path.stem}.json", 1 << 20)).get("sha256") if path.is_file() else None
        data = read_regular(path, size) if kept else b""
    except (OSError, ValueError, AttributeError):
        kept, data = None, b""
    if kept and len(data) == size and hashlib.sha256(data).hexdigest() == kept:
        return np.frombuffer(data, dtype=dtype).reshape(shape), True
    out = np.ascontiguousarray(compute(), dtype=dtype)
    if out.shape != tuple(shape):  # a programming error, not a user error
        raise RuntimeError(f"computed array has shape {out.shape}, expected {tuple(shape)}")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, suffix=".bin") as tmp:
        Path(tmp).write_bytes(out.tobytes())
    write_text_atomic(folder / f"{path.stem}.json", json.dumps({**fields, "sha256": hashlib.sha256(out.tobytes()).hexdigest()}, sort_keys=True, default=str, indent=1) + "\n")
    return out, False
