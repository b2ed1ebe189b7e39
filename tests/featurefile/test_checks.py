"""The verify stage: a sound file passes; each broken invariant (also of a merged file whose shards moved on) is named; the command prints ok/FAIL per file and exits 1 on any failure."""

from __future__ import annotations

import json

import numpy as np

from pipeline.cli import main
from pipeline.backbones.registry import PREPROCESSING
from pipeline.extract.fingerprints import shard_path
from pipeline.extract.shardset import merge
from pipeline.featurefile.store import write_feature_file
from pipeline.featurefile.checks import verify

#: Every attribute the contract asks of a file written by one extraction (``extract`` writes these).
ATTRS = {"backbone": "vgg16", "layer": "block5_pool", "input_size": 32, "feature_shape": [1, 1, 512], "preprocessing": PREPROCESSING,
         "resize": "bilinear", "weights": "none", "weights_source": "random init", "weights_checksum": "none", "precision": "float32",
         "storage_dtype": "float32", "batch_size": 4, "versions": "{}", "created": "2024-01-01T00:00:00+00:00",
         "command_line": "python -m pipeline extract", "data_dir": "/data", "extract_seconds": 0.5,
         "images_processed_last_run": 2, "incremental": False, "rows_kept": 0}  # fmt: skip


def write(path, paths, *, shard=None, shards=2, rejected=()):
    """A small feature file with one row per path (class = the path's folder)."""
    classes = ("a", "b")
    labels = np.array([classes.index(p.split("/")[0]) for p in paths])
    feats = np.arange(len(paths), dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 1, 512), np.float32)
    n = 1 if shard is None else shards
    fp = {"backbone": "vgg16", "shards": n, "shard": shard or 0, "listing_sha256": str(paths), "n_files": len(paths)}
    write_feature_file(
        path, row_shape=(1, 1, 512), storage="float32", class_names=classes,
        rows=iter([(feats, labels, list(paths), np.ones(len(paths)), np.zeros(len(paths)))]),
        rejected=list(rejected), attrs={**ATTRS, "shards": n, "shard": shard or 0, "fingerprint": json.dumps(fp, sort_keys=True)},
    )  # fmt: skip
    return path


def test_a_sound_file_passes_and_the_command_says_ok(tmp_path, capsys):
    good = write(tmp_path / "good.h5", ["a/1.png", "b/2.png"], rejected=[("b/3.png", "empty file (0 bytes)", 0, 0)])
    assert verify(good) == []
    assert main(["verify", str(good)]) == 0
    assert capsys.readouterr().out == f"ok {good}\n"


def test_each_file_is_reported_and_any_failure_exits_1(tmp_path, capsys):
    good = write(tmp_path / "good.h5", ["a/1.png", "b/2.png"])
    both = write(tmp_path / "both.h5", ["a/1.png", "b/2.png"], rejected=[("a/1.png", "corrupt", 0, 0)])
    missing = tmp_path / "missing.h5"
    assert verify(both) == [f"{both}: 1 paths are both extracted and rejected, e.g. a/1.png"]
    assert main(["verify", str(good), str(both), str(missing)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"ok {good}" and out[1] == f"FAIL {both}: 1 paths are both extracted and rejected, e.g. a/1.png"
    assert out[2].startswith(f"FAIL {missing}: feature file does not exist") and len(out) == 3


def test_a_merged_file_whose_shards_moved_on_is_named(tmp_path):
    out = tmp_path / "x.h5"
    shards = [write(shard_path(out, 0, 2), ["a/1.png", "b/3.png"], shard=0), write(shard_path(out, 1, 2), ["a/2.png"], shard=1)]
    assert merge(out, shards) == 3
    assert verify(out) == []
    write(shards[1], ["a/2.png", "b/4.png"], shard=1)  # re-extracted after the merge
    assert verify(out) == [f"{shards[1]}: shard file changed since the merge"]
    shards[0].unlink()
    problems = verify(out)
    assert problems == [f"{out}: merged file whose shard file(s) x.shard-00000-of-00002.h5 are missing; keep them next to it (move the folder as a whole)"]
