"""Feature store: the writer's round trip (also of rows without inodes and change times), the validating reader's refusals, and the output lock."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.outputs import OutputLock
from pipeline.featurefile.schema import FORMAT_VERSION
from pipeline.featurefile.store import (
    SPEC_KEYS,
    check_compatible,
    Stored,
    open_features,
    stored_output,
)
from pipeline.featurefile.writer import write_feature_file
from pipeline.images.listing import Reject

SPEC = {"backbone": "vgg16", "layer": "block5_pool", "input_size": 32, "preprocessing": "caffe", "resize": "bilinear", "weights": "none", "weights_checksum": "none"}


def write(path, *, n=7, classes=("a", "b"), block=3, rejected=(), attrs=None, features=None, storage="float16"):
    """A feature file of ``n`` rows (row i: all values i / 10, label i % classes) written ``block`` rows at a time."""
    feats = np.arange(n, dtype=np.float32)[:, None, None, None] / 10 * np.ones((1, 1, 1, 4), np.float32) if features is None else features
    labels = np.arange(n) % len(classes)
    paths = [f"{classes[labels[i]]}/{i:03d}.png" for i in range(n)]

    def rows():
        for s in range(0, n, block):
            yield feats[s : s + block], labels[s : s + block], paths[s : s + block], np.full(len(feats[s : s + block]), 100), np.arange(s, min(n, s + block))

    return write_feature_file(path, row_shape=(1, 1, 4), storage=storage, class_names=classes, rows=rows(), rejected=list(rejected), attrs={**SPEC, **(attrs or {})})


def test_writer_and_reader_round_trip(tmp_path):
    out = tmp_path / "x.h5"
    assert write(out, rejected=[Reject("b/bad.png", "empty file (0 bytes)", 0, 5)], attrs={"fingerprint": json.dumps({"k": 1})}) == 7
    with open_features(out) as ff:
        assert len(ff) == 7 and ff.row_shape == (1, 1, 4) and ff.label_names == ["a", "b"]
        assert ff.labels.tolist() == [0, 1, 0, 1, 0, 1, 0]
        assert ff.paths == ["a/000.png", "b/001.png", "a/002.png", "b/003.png", "a/004.png", "b/005.png", "a/006.png"]
        assert ff.db["features"].dtype == np.float16 and ff.db["features"].maxshape[0] is None
        assert ff.db["file_mtimes_ns"][:].tolist() == list(range(7))
        # rows given without inodes and change times: stored as unknown, so an update extracts them again
        assert ff.db["file_inodes"][:].tolist() == ff.db["file_ctimes_ns"][:].tolist() == [-1] * 7
        assert ff.db["rejected/file_inodes"][:].tolist() == [-1] and [x.decode() for x in ff.db["rejected/limits"][:]] == [""]
        a = ff.attrs
        assert a["complete"] and a["n_images"] == 7 and a["n_rejected"] == 1 and a["format_version"] == FORMAT_VERSION == 2
        assert ff.spec == {**{k: SPEC[k] for k in SPEC_KEYS}, "feature_shape": [1, 1, 4]}
        blocks = list(ff.iter_chunks(rows=3))
        assert [s for s, _ in blocks] == [0, 3, 6] and all(b.dtype == np.float32 for _, b in blocks)
        np.testing.assert_allclose(np.concatenate([b for _, b in blocks])[:, 0, 0, 0], np.arange(7) / 10, atol=1e-3)
        picked = np.concatenate([b for _, b in ff.iter_chunks(rows=2, indices=np.array([1, 4, 6]))])
        np.testing.assert_allclose(picked[:, 0, 0, 0], [0.1, 0.4, 0.6], atol=1e-3)
        assert [x.decode() for x in ff.db["rejected/reasons"][:]] == ["empty file (0 bytes)"]
    toy = stored_output(out)  # rows of 4 values for vgg16, no provenance: not a file extract can reuse
    assert toy.fingerprint is None and toy.problem.startswith("it breaks the feature-file contract (attribute 'feature_shape' missing and ")
    from featurefile.test_checks import write as write_sound

    sound = write_sound(out.with_name("sound.h5"), ["a/1.png", "b/2.png"], rejected=[Reject("b/bad.png", "empty file (0 bytes)", 0, 5)])
    fp = {"backbone": "vgg16", "listing_sha256": "['a/1.png', 'b/2.png']", "n_files": 2, "shard": 0, "shards": 1}
    assert stored_output(sound) == Stored(fp, False, (Reject("b/bad.png", "empty file (0 bytes)", 0, 5),), "")


def test_non_finite_features_are_refused_and_nothing_is_left(tmp_path):
    out = tmp_path / "x.h5"
    feats = np.full((4, 1, 1, 4), 1e6, np.float32)  # overflows float16
    with pytest.raises(PipelineError, match=r"x.h5: non-finite features \(overflow of the float16 storage\?\) in rows 0..3"):
        write(out, n=4, features=feats, block=3)
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.unlink(), r"feature file does not exist \(run `python -m pipeline extract` first\)"),
        (lambda p: p.write_bytes(b"not hdf5"), r"not a readable HDF5 feature file"),
        (lambda p: _edit(p, lambda db: db.attrs.__setitem__("complete", False)), r"incomplete feature file"),
        (lambda p: _edit(p, lambda db: db.__delitem__("paths")), r"missing dataset 'paths'"),
        (lambda p: _edit(p, lambda db: db["labels"].__setitem__(2, 5)), r"labels range 0..5 falls outside label_names \(0..1\)"),
        (lambda p: _edit(p, lambda db: db["labels"].resize((5,))), r"datasets have different lengths"),
        (lambda p: (p.unlink(), p.mkdir()), r"x.h5: is a folder, not a feature file$"),
        (lambda p: _edit(p, lambda db: db.attrs.__setitem__("complete", "yes")), r"incomplete feature file"),
        (lambda p: _edit(p, lambda db: (db.__delitem__("features"), db.create_dataset("features", data=np.zeros(7)))),
         r"dataset 'features' has shape \(7,\); it must have at least 2 dimensions"),
        (lambda p: _edit(p, lambda db: (db.__delitem__("paths"), db.create_dataset("paths", data=np.arange(7)))), r"dataset 'paths' is int64; it must be UTF-8 string"),
    ],
    ids=["missing", "not-hdf5", "incomplete", "no-paths", "mislabelled", "lengths", "folder", "complete-yes", "1-d-features", "integer-paths"],
)
def test_open_features_refuses_a_broken_file(tmp_path, damage, message):
    out = tmp_path / "x.h5"
    write(out)
    damage(out)
    with pytest.raises(PipelineError, match=message) as exc:
        open_features(out)
    assert str(out) in str(exc.value) and "\n" not in str(exc.value)


def test_open_features_refuses_a_single_class_and_can_read_an_incomplete_file(tmp_path):
    write(tmp_path / "one.h5", classes=("a",))
    with pytest.raises(PipelineError, match=r"only 1 class in label_names"):
        open_features(tmp_path / "one.h5")
    out = tmp_path / "x.h5"
    write(out)
    _edit(out, lambda db: db.attrs.__setitem__("complete", False))
    with open_features(out, require_complete=False) as ff:
        assert len(ff) == 7
    assert stored_output(out) == stored_output(tmp_path / "nope.h5") == Stored(problem="it is not a complete feature file")
    _edit(out, lambda db: (db.attrs.__setitem__("complete", True), db.attrs.__setitem__("format_version", 1)))
    assert stored_output(out).problem == "it was written by another version of the pipeline (format_version 1, this version reads 2)"
    with pytest.raises(PipelineError, match=r"x.h5: written by another version of the pipeline \(format_version 1, this version reads 2\); extract it again$"):
        open_features(out)


def _edit(path, change):
    with h5py.File(path, "r+") as db:
        change(db)


def test_check_compatible(tmp_path):
    write(tmp_path / "a.h5")
    write(tmp_path / "b.h5", attrs={"resize": "nearest"})
    write(tmp_path / "c.h5", classes=("a", "c"))
    with open_features(tmp_path / "a.h5") as a, open_features(tmp_path / "b.h5") as b, open_features(tmp_path / "c.h5") as c:
        check_compatible(a, a)
        with pytest.raises(PipelineError, match=r"b.h5: resize is 'nearest' but .*a.h5 has 'bilinear'"):
            check_compatible(a, b)
        with pytest.raises(PipelineError, match=r"c.h5: class names \['a', 'c'\] differ from"):
            check_compatible(a, c)
    # another precision: train --test scored a float32 model on int8 test features with exit 0 (evaluate refuses the pair; seventeenth pass)
    write(tmp_path / "a.h5", attrs={"precision": "float32"})
    write(tmp_path / "d.h5", attrs={"precision": "bfloat16"})
    with open_features(tmp_path / "a.h5") as a, open_features(tmp_path / "d.h5") as d:
        with pytest.raises(PipelineError, match=r"d.h5: precision is 'bfloat16' but .*a.h5 has 'float32'; extract both with the same --precision"):
            check_compatible(a, d)


def test_the_output_lock_admits_one_writer(tmp_path):
    out = tmp_path / "x.h5"
    with OutputLock(out):
        assert (tmp_path / "x.h5.lock").read_text() == f"{os.getpid()} pipeline-lock\n"
        with pytest.raises(PipelineError, match=r"x.h5.lock: another run is writing this output \(pid \d+\)"):
            with OutputLock(out):
                pass
    assert not (tmp_path / "x.h5.lock").exists()
    with OutputLock(out):  # free again once its holder is gone
        pass
