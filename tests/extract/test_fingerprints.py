"""Shard identity: a file's shard is a hash of its path (stable when files come and go, even across shards and classes); shard files partition the listing; a shard file of another sharding is named as such."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tree, write_image
from pipeline.images.listing import list_images
from pipeline.backbones.resolved import resolve_backbone
from pipeline.extract.fingerprints import SHARDING, describe_difference, fingerprint, merged_fingerprint, shard_listing, shard_of, shard_path
from pipeline.featurefile.store import open_features
from pipeline.featurefile.checks import verify
from shard_data import N, extract, make_run, without_sharding


def test_shard_of_is_a_stable_hash_of_the_path():
    # Pinned: shard files of one version must be reusable by the next, on any machine and under
    # any Python hash seed, so the assignment is written down here, and recomputed independently.
    paths = ("a/000.png", "b/001.png", "c/zebra.jpg", "dog/ü.png", "cat/x/y.webp")
    assert [shard_of(p, 4) for p in paths] == [0, 1, 0, 0, 3]
    for p in paths:
        assert shard_of(p, 4) == int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "big") % 4
    assert shard_of("cat/000.png", 1) == 0
    assert {shard_of(f"x/{i}.png", 7) for i in range(200)} == set(range(7))


def _listing(root: Path, classes=("a", "b", "c"), per_class=60):
    make_tree(root, classes=classes, per_class=per_class, size=(4, 4))
    return list_images(root)


def test_adding_files_never_moves_a_file_to_another_shard(tmp_path):
    root = tmp_path / "data"
    before = _listing(root)
    for i in range(30):  # 10% more, spread over the classes, some sorting before the existing ones
        write_image(root / "abc"[i % 3] / f"{'0' if i % 2 else 'z'}-new-{i}.png", size=(4, 4), seed=500 + i)
    after = list_images(root)
    for shards in (2, 3, 8):
        for k in range(shards):
            old = set(shard_listing(before, shards, k).paths)
            new = set(shard_listing(after, shards, k).paths)
            assert old <= new, (shards, k)  # every file stays where it was; only new files join
            assert all(shard_of(p, shards) == k for p in new - old)


def test_shards_partition_the_listing_evenly_with_every_class_in_every_shard(tmp_path):
    listing = _listing(tmp_path / "data", per_class=200)
    (tmp_path / "data" / "a" / "notes.txt").write_text("not an image")
    listing = list_images(tmp_path / "data")
    shards = 4
    parts = [shard_listing(listing, shards, k) for k in range(shards)]
    assert sorted(p for part in parts for p in part.paths) == sorted(listing.paths)
    assert sum(len(part.skipped) for part in parts) == len(listing.skipped) == 1
    sizes = [len(part) for part in parts]
    assert all(abs(n - len(listing) / shards) < 0.2 * len(listing) / shards for n in sizes), sizes
    for part in parts:
        assert part.class_names == listing.class_names  # the labels keep their meaning in every shard
        assert set(part.labels.tolist()) == {0, 1, 2}
        assert list(part.paths) == [p for p in listing.paths if p in set(part.paths)]  # listing order kept
        positions = [listing.paths.index(p) for p in part.paths]
        np.testing.assert_array_equal(part.labels, listing.labels[positions])
        np.testing.assert_array_equal(part.sizes, listing.sizes[positions])
    assert shard_listing(listing, 1, 0) is listing


def test_shard_path():
    assert shard_path(Path("features/train.h5"), 3, 8) == Path("features/train.shard-00003-of-00008.h5")


def test_fingerprints_record_the_sharding(tmp_path):
    listing = _listing(tmp_path / "data", per_class=5)
    backbone = resolve_backbone("vgg16", "none", 32, "float32")
    settings = {"resize": "bilinear", "storage": "float16"}
    single = fingerprint(listing, backbone, shards=1, shard=0, **settings)
    assert "sharding" not in single  # one shard is the whole listing, whatever the scheme
    fps = [fingerprint(shard_listing(listing, 3, k), backbone, shards=3, shard=k, **settings) for k in range(3)]
    assert all(fp["sharding"] == SHARDING == "path-hash" for fp in fps)
    merged = merged_fingerprint(fps)
    assert merged["sharding"] == SHARDING and merged["n_files"] == 15 and "shard" not in merged
    older = {k: v for k, v in merged.items() if k != "sharding"}
    assert describe_difference(older, merged) == "sharding None -> 'path-hash'"
    assert describe_difference(merged, dict(merged, storage="float32")) == "storage 'float16' -> 'float32'"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tree of 3 classes (21 images, one broken, one .txt), its single-process file and 3 shards."""
    return make_run(tmp_path_factory.mktemp("shards"))


def test_shards_partition_the_sorted_listing(run, capsys):
    data, reference, out, shards = run
    listing = list_images(data)
    got = []
    for k, p in enumerate(shards):
        with open_features(p) as ff:
            rejected = [x.decode() for x in ff.db["rejected/paths"][:]]
            assert ff.attrs["shards"] == N and ff.attrs["shard"] == k
            # the files whose path hashes to k, in the order of the sorted listing; rejects stay in their shard
            assert [x for x in listing.paths if shard_of(x, N) == k and x not in rejected] == ff.paths
            got += ff.paths + rejected
        assert verify(p) == []
    assert sorted(got) == sorted(listing.paths + tuple(r.path for r in listing.skipped))
    capsys.readouterr()
    assert extract(data, shards[1], "--shards", str(N), "--shard", "1") == 0
    assert "up to date" in capsys.readouterr().out
    assert extract(data, shards[1], "--shards", str(N), "--shard", str(N)) == 2
    assert f"--shard {N} of --shards {N}: need 0 <= shard < shards" in capsys.readouterr().err


def test_a_shard_file_of_another_sharding_differs_in_it(run, tmp_path, capsys):
    """A shard file without `sharding` in its fingerprint holds other files: a rerun names the
    difference and needs --overwrite, which extracts it again."""
    data, reference, out, shards = run
    older = without_sharding(shards[2], tmp_path / shards[2].name)
    assert extract(data, older, "--shards", str(N), "--shard", "2") == 2
    err = capsys.readouterr().err
    assert err == f"error: {older}: exists and differs: sharding None -> 'path-hash'; pass --overwrite to replace it\n"
    assert extract(data, older, "--shards", str(N), "--shard", "2", "--overwrite") == 0
    with open_features(older) as ff:
        assert json.loads(ff.attrs["fingerprint"])["sharding"] == "path-hash" and not ff.attrs["incremental"]
