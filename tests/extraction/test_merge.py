"""Sharded extraction and the merge stage: shards partition the listing, the merged virtual file equals a single run, bad shard sets are refused."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import assert_same_rows, make_tree
from pipeline.extraction import merge as merge_mod
from pipeline.cli import main
from pipeline.extraction.merge import merge, merged_fingerprint, shard_path, stale_sources
from pipeline.extraction.reader import list_images
from pipeline.extraction.store import open_features, verify

FAST = ["--weights", "none", "--input-size", "32", "--batch-size", "4", "--quiet"]
N = 3


def read(path, name):
    with h5py.File(path, "r") as db:
        return db[name][:]


def attr(path, name):
    with h5py.File(path, "r") as db:
        return db.attrs[name]


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


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tree of 3 classes (21 images, one broken, one .txt), its single-process file and 3 shards."""
    root = tmp_path_factory.mktemp("merge")
    data = make_tree(root / "data", classes=("cat", "dog", "owl"), per_class=7, size=(12, 12))
    (data / "dog" / "broken.png").write_bytes(b"\x89PNG broken")
    (data / "owl" / "notes.txt").write_text("not an image")
    reference = root / "single.h5"
    assert extract(data, reference) == 0
    out = root / "sharded" / "x.h5"
    shards = extract_shards(data, out)
    return data, reference, out, shards


def test_shards_partition_the_sorted_listing(run, capsys):
    data, reference, out, shards = run
    listing = list_images(data)
    got = []
    for k, p in enumerate(shards):
        with open_features(p) as ff:
            rejected = [x.decode() for x in ff.db["rejected/paths"][:]]
            assert ff.attrs["shards"] == N and ff.attrs["shard"] == k
            # every N-th file of the sorted listing, starting at k; rejects stay in their shard
            assert [x for x in listing.paths[k::N] if x not in rejected] == ff.paths
            got += ff.paths + rejected
        assert verify(p) == []
    assert sorted(got) == sorted(listing.paths + tuple(u[0] for u in listing.unlisted))
    capsys.readouterr()
    assert extract(data, shards[1], "--shards", str(N), "--shard", "1") == 0
    assert "up to date" in capsys.readouterr().out
    assert extract(data, shards[1], "--shards", str(N), "--shard", str(N)) == 2
    assert f"--shard {N} of --shards {N}: need 0 <= shard < shards" in capsys.readouterr().err


def test_merged_file_equals_the_single_process_run(run, tmp_path):
    data, reference, out, shards = run
    merged = tmp_path / "merged.h5"  # another folder than the shards: sources stored as ../.../sharded/...
    assert merge(merged, list(reversed(shards))) == 21  # any order on the command line
    assert verify(merged) == []
    assert_same_rows(merged, reference)
    with open_features(merged) as ff, open_features(reference) as ref:
        a = ff.attrs
        assert bool(a["complete"]) and a["n_images"] == 21 and a["n_rejected"] == 2 and a["shards"] == N
        assert "shard" not in a
        assert list(a["merged_from"]) == [os.path.relpath(p, tmp_path) for p in shards]
        assert a["merged_from"][0].startswith("../") and a["merged_from"][0].endswith("/sharded/x.shard-00000-of-00003.h5")
        assert ff.label_names == ref.label_names == ["cat", "dog", "owl"]
        assert ff.spec == ref.spec and a["precision"] == ref.attrs["precision"]
        # Documented order: shard 0's rows, then shard 1's, ...
        expected = []
        for p in shards:
            with open_features(p) as s:
                expected += s.paths
        assert ff.paths == expected
        assert all(ff.db[name].is_virtual for name in merge_mod.ROW_DATASETS)
        assert not ff.db["label_names"].is_virtual and not ff.db["rejected/paths"].is_virtual
    fp = merged_fingerprint([json.loads(attr(p, "fingerprint")) for p in shards])
    assert fp["n_files"] == 23 and "shard" not in fp and fp["shards"] == N
    assert stale_sources(merged) == []


def test_plain_h5py_and_train_style_reading(run, tmp_path):
    data, reference, out, shards = run
    merged = out.with_name("plain.h5")
    merge(merged, shards)
    stacked = np.concatenate([read(p, "features") for p in shards])
    with h5py.File(merged, "r") as db:
        feats = db["features"]
        assert feats.shape == (21, 1, 1, 512) and feats.dtype == np.float16
        np.testing.assert_array_equal(feats[5:12], stacked[5:12])  # a slice across the shard 0 / shard 1 border
        np.testing.assert_array_equal(feats[[0, 9, 20]], stacked[[0, 9, 20]])
        assert db["paths"][7] == read(shards[0], "paths")[7]
    with open_features(merged) as ff:  # what train does: chunks, or selected rows
        blocks = [b for _, b in ff.iter_chunks(rows=5)]
        np.testing.assert_array_equal(np.concatenate(blocks), stacked.astype(np.float32))
        sel = np.array([1, 8, 15, 19])
        np.testing.assert_array_equal(np.concatenate([b for _, b in ff.iter_chunks(indices=sel)]), stacked[sel].astype(np.float32))


def test_moving_the_folder_keeps_it_readable(run, tmp_path):
    data, reference, out, shards = run
    a = tmp_path / "a"
    a.mkdir()
    copies = [Path(shutil.copy2(p, a / p.name)) for p in shards]
    merge(a / "x.h5", copies)
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    a.rename(moved)
    assert verify(moved / "x.h5") == [] and stale_sources(moved / "x.h5") == []
    assert_same_rows(moved / "x.h5", reference)
    (moved / copies[2].name).unlink()  # a lost shard is loud, never zeros
    assert stale_sources(moved / "x.h5") == [f"{moved / copies[2].name}: shard file missing or unreadable"]
    assert any("shard file(s)" in msg and "are missing" in msg for msg in verify(moved / "x.h5"))


def _incomplete(path: Path, dest: Path) -> Path:
    shutil.copy2(path, dest)
    with h5py.File(dest, "r+") as db:
        db.attrs["complete"] = False
    return dest


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda s, t, d: [s[0], s[2]], r"missing shard 1 of 3: the shards were made with --shards 3 but 2 shard files given"),
        (lambda s, t, d: [s[0], s[1], s[1], s[2]], r"shard-00001-of-00003.h5: shard 1 of 3 given twice \(also .*shard-00001-of-00003.h5\)"),
        (lambda s, t, d: [s[0], _incomplete(s[1], t / "bad.shard-00001-of-00003.h5"), s[2]], r"bad.shard-00001-of-00003.h5: incomplete feature file"),
        (lambda s, t, d: [s[0], s[1], one_shard(d, t / "f32.h5", 3, 2, "--storage", "float32")],
         r"f32.shard-00002-of-00003.h5: made with storage 'float32' but .*x.shard-00000-of-00003.h5 with 'float16'"),
        (lambda s, t, d: [s[0], s[1], one_shard(d, t / "near.h5", 3, 2, "--resize", "nearest")], r"made with resize 'nearest' but"),
        (lambda s, t, d: [s[0], one_shard(d, t / "two.h5", 2, 1)], r"two.shard-00001-of-00002.h5: made with shards 2 but .* with 3"),
        (lambda s, t, d: [t / "nope.h5", *s], r"nope.h5: feature file does not exist"),
    ],
    ids=["missing", "duplicate", "incomplete", "other-storage", "other-resize", "other-shard-count", "no-file"],
)
def test_refuses_a_bad_set_of_shards(run, tmp_path, make, message):
    import re

    data, reference, out, shards = run
    given = make(shards, tmp_path, data)
    with pytest.raises(merge_mod.PipelineError) as exc:
        merge(tmp_path / "m.h5", given)
    assert re.search(message, str(exc.value)), str(exc.value)
    assert not (tmp_path / "m.h5").exists() and not list(tmp_path.glob(".m.h5.tmp-*"))


def test_refuses_an_existing_output_a_merged_input_and_other_weights(run, tmp_path):
    data, reference, out, shards = run
    merged = tmp_path / "m.h5"
    merge(merged, shards)
    with pytest.raises(merge_mod.PipelineError, match=r"m.h5: exists; pass --overwrite to replace it"):
        merge(merged, shards)
    assert merge(merged, shards, overwrite=True) == 21
    with pytest.raises(merge_mod.PipelineError, match=r"m.h5: is itself a merged file; merge its shard files"):
        merge(tmp_path / "m2.h5", [merged])
    other = tmp_path / "w.shard-00001-of-00003.h5"
    shutil.copy2(shards[1], other)
    with h5py.File(other, "r+") as db:  # as if made with another weights file
        fp = json.loads(db.attrs["fingerprint"])
        db.attrs["fingerprint"] = json.dumps(dict(fp, weights="file", weights_checksum="abc123"))
    with pytest.raises(merge_mod.PipelineError, match=r"w.shard-00001-of-00003.h5: made with weights 'file' but .* with 'none'"):
        merge(tmp_path / "m3.h5", [shards[0], other, shards[2]])


def test_empty_shards_are_merged(tmp_path):
    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=2, size=(12, 12))
    shards = extract_shards(data, tmp_path / "x.h5", 5)  # 4 images in 5 shards: shard 4 is empty
    with h5py.File(shards[4], "r") as db:
        assert db["features"].shape[0] == 0
    assert merge(tmp_path / "x.h5", shards) == 4
    assert verify(tmp_path / "x.h5") == []
    with open_features(tmp_path / "x.h5") as ff:
        assert sorted(ff.paths) == ["a/000.png", "a/001.png", "b/000.png", "b/001.png"]


def _merge_cli(*argv: str) -> int:
    """``python -m pipeline merge ARGV`` through the stage's own parser and runner, with the CLI's error handling."""
    parser = argparse.ArgumentParser()
    merge_mod.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["merge", *argv])
    try:
        return merge_mod.run_cli(args, ["merge", *argv])
    except merge_mod.PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def test_cli(run, tmp_path, capsys):
    data, reference, out, shards = run
    assert _merge_cli(str(tmp_path / "c.h5"), *map(str, shards)) == 0
    assert f"merged 3 shards: 21 images, 2 rejected -> {tmp_path / 'c.h5'}" in capsys.readouterr().out
    with h5py.File(tmp_path / "c.h5", "r") as db:
        assert db.attrs["command_line"].startswith("python -m pipeline merge ")
    assert _merge_cli(str(tmp_path / "d.h5"), str(shards[0])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: missing shards 1, 2 of 3") and err.count("\n") == 1
