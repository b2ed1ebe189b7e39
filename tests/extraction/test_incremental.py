"""Incremental updates: rows of unchanged files are kept (by path, size, modification time and class name), changed and removed ones are not, and kept rows read back under the new labels."""

from __future__ import annotations

import os

import numpy as np

from conftest import make_tree, write_image
from pipeline.extraction.incremental import base_rows, plan_incremental
from pipeline.extraction.reader import list_images
from pipeline.extraction.store import write_feature_file


def write_from_listing(path, listing, rejected=()):
    """A feature file of every listed file but the rejected ones; row i's features are its listing index."""
    keep = [i for i, p in enumerate(listing.paths) if p not in {r[0] for r in rejected}]
    idx = np.asarray(keep)
    feats = idx.astype(np.float32)[:, None, None, None] * np.ones((1, 1, 1, 2), np.float32)
    rows = iter([(feats, listing.labels[idx], [listing.paths[i] for i in keep], listing.sizes[idx], listing.mtimes_ns[idx])])
    write_feature_file(path, row_shape=(1, 1, 2), storage="float32", class_names=listing.class_names, rows=rows, rejected=list(rejected), attrs={})
    return {listing.paths[i]: float(i) for i in keep}


def test_only_unchanged_files_are_kept(tmp_path):
    data = make_tree(tmp_path / "data", classes=("b", "c"), per_class=4, size=(6, 6))
    before = list_images(data)
    bad = ("c/003.png", "empty file (0 bytes)", int(before.sizes[-1]), int(before.mtimes_ns[-1]))
    old = write_from_listing(tmp_path / "old.h5", before, rejected=[bad])
    (data / "b" / "001.png").unlink()  # removed
    write_image(data / "c" / "000.png", size=(6, 6), seed=99)  # rewritten: other size or time
    os.utime(data / "c" / "000.png", ns=(1, 1))
    write_image(data / "a" / "000.png", size=(6, 6), seed=98)  # a new class sorting first: every label index moves
    after = list_images(data)

    base = plan_incremental(tmp_path / "old.h5", {"k": 1}, after)
    kept = ["b/000.png", "b/002.png", "b/003.png", "c/001.png", "c/002.png"]
    assert [after.paths[i] for i in base.keep_index] == kept
    assert base.keep_rows.tolist() == [0, 2, 3, 5, 6] and base.old_rows == 7 and base.fingerprint == {"k": 1}
    assert base.kept_rejected == [bad] and [after.paths[i] for i in base.kept_rejected_index] == ["c/003.png"]
    assert sorted(after.paths[i] for i in base.covered) == sorted(kept + ["c/003.png"])

    blocks = list(base_rows(base, after, block=2))
    assert [len(b[0]) for b in blocks] == [2, 2, 1]
    feats = np.concatenate([b[0] for b in blocks])[:, 0, 0, 0]
    assert feats.tolist() == [old[p] for p in kept]  # copied from the old file, in its order
    labels = np.concatenate([b[1] for b in blocks])
    assert [after.class_names[k] for k in labels] == ["b", "b", "b", "c", "c"] and labels.tolist() == [1, 1, 1, 2, 2]
    assert [p for b in blocks for p in b[2]] == kept


def test_a_moved_file_is_extracted_again(tmp_path):
    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=2, size=(6, 6))
    write_from_listing(tmp_path / "old.h5", list_images(data))
    (data / "b" / "000.png").rename(data / "a" / "x.png")
    base = plan_incremental(tmp_path / "old.h5", {}, list_images(data))
    assert [list_images(data).paths[i] for i in base.keep_index] == ["a/000.png", "a/001.png", "b/001.png"]
