"""The frozen prefix's outputs for the test images, kept in a folder and reused by every run with the same prefix and the same test images (compare's rows and seeds score the test set through it once)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.core.outputs import atomic_output


def key_of(fields: dict) -> str:
    """The file name stem of a prefix's outputs: SHA-256 of what determines them (backbone, weights checksum, input size, resize, cut layer, precision, test images)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load_or_compute(folder: Path, fields: dict, shape: tuple, dtype, compute) -> tuple[np.ndarray, bool]:
    """The cached outputs of ``fields`` in ``folder``, or ``compute()`` written there; and whether they were reused.

    A file whose size does not match ``shape`` and ``dtype`` (a write cut short) is computed again.
    """
    folder = Path(folder)
    dtype = np.dtype(dtype)
    path = folder / f"{key_of(fields)}.bin"
    want = int(np.prod(shape)) * dtype.itemsize
    if path.is_file() and path.stat().st_size == want:
        return np.frombuffer(path.read_bytes(), dtype=dtype).reshape(shape), True
    out = np.ascontiguousarray(compute(), dtype=dtype)
    if out.shape != tuple(shape):  # a programming error, not a user error
        raise RuntimeError(f"prefix outputs have shape {out.shape}, expected {tuple(shape)}")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, suffix=".bin") as tmp:
        Path(tmp).write_bytes(out.tobytes())
    (folder / f"{path.stem}.json").write_text(json.dumps(fields, sort_keys=True, default=str, indent=1) + "\n")
    return out, False
