"""The merge library: shards merged into one virtual file equal a single run, read like one, move with their folder; bad shard sets (a shard of another version of the pipeline or of another sharding, shards of other folders or of another state of the folder, an output that is a shard however spelled) are refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import assert_same_rows, make_tree
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import OutputLock
from pipeline.extract import shardset
from pipeline.extract.fingerprints import merged_fingerprint
from pipeline.extract.shardset import merge
from pipeline.featurefile.checks import stale_sources, verify
from pipeline.featurefile.store import open_features
from shard_data import N, extract, extract_shards, make_run, one_shard, without_sharding


def read(path, name):
    with h5py.File(path, "r") as db:
        return db[name][:]


def attr(path, name):
    with h5py.File(path, "r") as db:
        return db.attrs[name]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tree of 3 classes (21 images, one broken, one .txt), its single-process file and 3 shards."""
    return make_run(tmp_path_factory.mktemp("merge"))


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
        assert all(ff.db[name].is_virtual for name in shardset.ROW_DATASETS)
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
        np.testing.assert_array_equal(feats[5:12], stacked[5:12])  # a slice across shard borders
        np.testing.assert_array_equal(feats[[0, 9, 20]], stacked[[0, 9, 20]])
        last = read(shards[0], "paths").shape[0] - 1  # shard 0's last row, then shard 1's first
        assert db["paths"][last] == read(shards[0], "paths")[last] and db["paths"][last + 1] == read(shards[1], "paths")[0]
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
    with pytest.raises(PipelineError) as exc:
        merge(tmp_path / "m.h5", given)
    assert re.search(message, str(exc.value)), str(exc.value)
    assert not (tmp_path / "m.h5").exists() and not list(tmp_path.glob(".m.h5.tmp-*"))


def test_refuses_an_existing_output_a_merged_input_and_other_weights(run, tmp_path):
    data, reference, out, shards = run
    merged = tmp_path / "m.h5"
    merge(merged, shards)
    with pytest.raises(PipelineError, match=r"m.h5: exists; pass --overwrite to replace it"):
        merge(merged, shards)
    assert merge(merged, shards, overwrite=True) == 21
    with pytest.raises(PipelineError, match=r"m.h5: is itself a merged file; merge its shard files"):
        merge(tmp_path / "m2.h5", [merged])
    other = tmp_path / "w.shard-00001-of-00003.h5"
    shutil.copy2(shards[1], other)
    with h5py.File(other, "r+") as db:  # as if made with another weights file
        fp = json.loads(db.attrs["fingerprint"])
        db.attrs["fingerprint"] = json.dumps(dict(fp, weights="file", weights_checksum="abc123"))
    with pytest.raises(PipelineError, match=r"w.shard-00001-of-00003.h5: made with weights 'file' but .* with 'none'"):
        merge(tmp_path / "m3.h5", [shards[0], other, shards[2]])


def test_empty_shards_are_merged(tmp_path):
    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=2, size=(12, 12))
    shards = extract_shards(data, tmp_path / "x.h5", 5)  # 4 images in 5 shards: at least one is empty
    assert 0 in [read(p, "paths").shape[0] for p in shards]
    assert merge(tmp_path / "x.h5", shards) == 4
    assert verify(tmp_path / "x.h5") == []
    with open_features(tmp_path / "x.h5") as ff:
        assert sorted(ff.paths) == ["a/000.png", "a/001.png", "b/000.png", "b/001.png"]


def test_a_shard_of_another_version_of_the_pipeline_is_refused_in_one_line(run, tmp_path):
    data, reference, out, shards = run
    older = tmp_path / shards[1].name
    shutil.copy2(shards[1], older)
    with h5py.File(older, "r+") as db:
        db.attrs["format_version"] = 1
    with pytest.raises(PipelineError) as exc:
        merge(tmp_path / "m.h5", [shards[0], older, shards[2]])
    assert str(exc.value) == f"{older}: written by another version of the pipeline (format_version 1, this version reads 2); extract it again"
    assert not (tmp_path / "m.h5").exists()


def test_shards_of_another_sharding_are_not_mixed(run, tmp_path):
    data, reference, out, shards = run
    other = without_sharding(shards[1], tmp_path / shards[1].name)
    with pytest.raises(PipelineError) as exc:
        merge(tmp_path / "m.h5", [shards[0], other, shards[2]])
    assert str(exc.value) == f"{other}: made with sharding None but {shards[0]} with 'path-hash'; all shards must come from one extraction's data folder, settings and weights"


def test_per_run_attributes_count_only_the_shards_that_ran(run, tmp_path):
    data, reference, out, shards = run
    rows = [read(p, "paths").shape[0] for p in shards]
    merged = tmp_path / "ran.h5"
    with OutputLock(merged):
        shardset.merge_locked(merged, shards, ran={1})
    processed = [int(attr(p, "images_processed_last_run")) for p in shards]
    assert attr(merged, "images_processed_last_run") == processed[1]
    assert attr(merged, "rows_kept") == rows[0] + rows[2] and bool(attr(merged, "incremental"))
    assert attr(merged, "extract_seconds") == attr(shards[1], "extract_seconds")
    with OutputLock(merged):
        shardset.merge_locked(merged, shards, overwrite=True, ran=set())
    assert attr(merged, "images_processed_last_run") == 0 and attr(merged, "rows_kept") == 21 and attr(merged, "extract_seconds") == 0
    merge(merged, shards, overwrite=True)  # the merge command: every shard counts
    assert attr(merged, "images_processed_last_run") == sum(processed) > processed[1]


def test_the_output_is_never_one_of_the_shards_however_spelled(run, tmp_path):
    data, reference, out, shards = run
    folder = tmp_path / "a"
    folder.mkdir()
    copies = [Path(shutil.copy2(p, folder / p.name)) for p in shards]
    os.symlink(folder, tmp_path / "via")
    before = copies[1].read_bytes()
    spellings = ["/" + str(copies[1]), tmp_path / "via" / copies[1].name, folder / ".." / "a" / copies[1].name]
    for spelled in spellings:
        with pytest.raises(PipelineError, match=r"is both the output \(.*\) and a shard; write the merged file elsewhere$"):
            merge(spelled, copies, overwrite=True)
        assert copies[1].read_bytes() == before
    assert verify(copies[1]) == [] and not list(folder.glob(".*tmp*")) and not list(folder.glob("*.lock"))


def test_shards_of_another_folder_are_refused(run, tmp_path):
    data, reference, out, shards = run
    twin = tmp_path / "twin"
    shutil.copytree(data, twin)  # the same class names and images, another folder
    other = one_shard(twin, tmp_path / "t.h5", N, 1)
    with pytest.raises(PipelineError) as exc:
        merge(tmp_path / "m.h5", [shards[0], other, shards[2]])
    message = str(exc.value)
    assert message.startswith(f"{other}: made with data_dir {os.path.realpath(twin)!r} but {shards[0]} with {os.path.realpath(data)!r}"), message
    assert not (tmp_path / "m.h5").exists()


def _shard_holding(paths, n, k):
    from pipeline.extract.fingerprints import shard_of

    return next(p for p in paths if shard_of(p, n) == k)


def test_shards_of_another_state_of_the_folder_are_refused(tmp_path):
    """Images deleted, then only the other shard re-extracted: the merge would still hold the deleted images."""
    from pipeline.images.listing import list_images

    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=6, size=(12, 12))
    out = tmp_path / "x.h5"
    shards = extract_shards(data, out, 2)
    gone = _shard_holding(list_images(data).paths, 2, 0)
    (data / gone).unlink()
    assert extract(data, shards[1], "--shards", "2", "--shard", "1") == 0  # its own images did not change
    with pytest.raises(PipelineError) as exc:
        merge(out, shards)
    message = str(exc.value)
    assert message.startswith(f"{shards[1]}: made from another state of the data folder than {shards[0]} (whole_listing_sha256 "), message
    assert "re-extract the shards made before the change" in message and not out.exists()
    assert extract(data, shards[0], "--shards", "2", "--shard", "0") == 0
    assert merge(out, shards) == 11
    with open_features(out) as ff:
        assert gone not in ff.paths and verify(out) == []
