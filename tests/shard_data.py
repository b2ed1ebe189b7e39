"""Shard files for the merge tests: a small tree extracted once in one process and once in 3 shards (``extract --shards 3 --shard K``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py

from conftest import make_tree
from pipeline.cli import main
from pipeline.extract.fingerprints import shard_path

FAST = ["--weights", "none", "--input-size", "32", "--batch-size", "4", "--quiet"]
N = 3


def extract(data, out, *extra):
    return main(["extract", str(data), "-o", str(out), *FAST, *extra])


def extract_shards(data, out, n=N, *extra):
    paths = [shard_path(out, k, n) for k in range(n)]
    for k, p in enumerate(paths):
        assert extract(data, p, "--shards", str(n), "--shard", str(k), *extra) == 0
    return paths


def one_shard(data, out, n, k, *extra):
    path = shard_path(out, k, n)
    assert extract(data, path, "--shards", str(n), "--shard", str(k), *extra) == 0
    return path


def make_run(root: Path):
    """A tree of 3 classes (21 images, one broken, one .txt), its single-process file and 3 shards."""
    data = make_tree(root / "data", classes=("cat", "dog", "owl"), per_class=7, size=(12, 12))
    (data / "dog" / "broken.png").write_bytes(b"\x89PNG broken")
    (data / "owl" / "notes.txt").write_text("not an image")
    reference = root / "single.h5"
    assert extract(data, reference) == 0
    out = root / "sharded" / "x.h5"
    shards = extract_shards(data, out)
    return data, reference, out, shards


def without_sharding(path: Path, copy_to: Path | None = None) -> Path:
    """``path`` (or a copy of it at ``copy_to``) with no ``sharding`` in its fingerprint: another sharding than this version's."""
    if copy_to is not None:
        path = Path(shutil.copy2(path, copy_to))
    with h5py.File(path, "r+") as db:
        fp = json.loads(db.attrs["fingerprint"])
        del fp["sharding"]
        db.attrs["fingerprint"] = json.dumps(fp, sort_keys=True)
    return path
