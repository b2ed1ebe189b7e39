"""featurefile.kept (incremental updates): rows of unchanged files are kept (by path, size, modification time, inode, change time and class name), changed and removed ones are not, kept rows read back under the new labels; rejections of a changed limit are redone."""

from __future__ import annotations

import os

import numpy as np

from conftest import make_tree, write_image
import shutil

from pipeline.featurefile.kept import find_kept, kept_blocks
from pipeline.images.listing import list_images, Reject
from pipeline.images.decode import limit_holds, limits
from pipeline.featurefile.store import stored_rows
from pipeline.featurefile.writer import write_feature_file


def write_from_listing(path, listing, rejected=()):
    """A feature file of every listed file but the rejected ones; row i's features are its listing index."""
    keep = [i for i, p in enumerate(listing.paths) if p not in {r[0] for r in rejected}]
    idx = np.asarray(keep)
    feats = idx.astype(np.float32)[:, None, None, None] * np.ones((1, 1, 1, 2), np.float32)
    rows = iter([(feats, listing.labels[idx], [listing.paths[i] for i in keep], *listing.versions(idx).T)])
    write_feature_file(path, row_shape=(1, 1, 2), storage="float32", class_names=listing.class_names, rows=rows, rejected=list(rejected), attrs={})
    return {listing.paths[i]: float(i) for i in keep}


def test_only_unchanged_files_are_kept(tmp_path):
    data = make_tree(tmp_path / "data", classes=("b", "c"), per_class=4, size=(6, 6))
    before = list_images(data)
    bad = Reject("c/003.png", "empty file (0 bytes)", *before.versions([len(before) - 1])[0].tolist())
    old = write_from_listing(tmp_path / "old.h5", before, rejected=[bad])
    (data / "b" / "001.png").unlink()  # removed
    write_image(data / "c" / "000.png", size=(6, 6), seed=99)  # rewritten: other size or time
    os.utime(data / "c" / "000.png", ns=(1, 1))
    write_image(data / "a" / "000.png", size=(6, 6), seed=98)  # a new class sorting first: every label index moves
    after = list_images(data)

    base = find_kept(tmp_path / "old.h5", after)
    kept = ["b/000.png", "b/002.png", "b/003.png", "c/001.png", "c/002.png"]
    assert [after.paths[i] for i in base.index] == kept
    assert base.rows.tolist() == [0, 2, 3, 5, 6] and base.old_rows == 7
    assert base.rejected == [bad] and [after.paths[i] for i in base.rejected_index] == ["c/003.png"]
    assert sorted(after.paths[i] for i in base.covered) == sorted(kept + ["c/003.png"])

    blocks = list(kept_blocks(base, after, block=2))
    assert [len(b.features) for b in blocks] == [2, 2, 1]
    feats = np.concatenate([b.features for b in blocks])[:, 0, 0, 0]
    assert feats.tolist() == [old[p] for p in kept]  # copied from the old file, in its order
    labels = np.concatenate([b.labels for b in blocks])
    assert [after.class_names[k] for k in labels] == ["b", "b", "b", "c", "c"] and labels.tolist() == [1, 1, 1, 2, 2]
    assert [p for b in blocks for p in b.paths] == kept
    np.testing.assert_array_equal(np.concatenate([b.inodes for b in blocks]), after.inodes[base.index])


def test_a_moved_file_is_extracted_again(tmp_path):
    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=2, size=(6, 6))
    write_from_listing(tmp_path / "old.h5", list_images(data))
    (data / "b" / "000.png").rename(data / "a" / "x.png")
    base = find_kept(tmp_path / "old.h5", list_images(data))
    assert [list_images(data).paths[i] for i in base.index] == ["a/000.png", "a/001.png", "b/001.png"]


def test_replaced_files_with_the_same_size_and_time_are_extracted_again(tmp_path):
    """cp -p, rsync -a and tar keep the size and modification time; the inode or change time tells."""
    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=2, size=(6, 6), ext=".bmp")  # BMP: same size for same dimensions
    write_from_listing(tmp_path / "old.h5", list_images(data))
    st = os.stat(data / "a" / "000.bmp")
    # rsync -a / tar: a new file renamed over the old one (new inode), with the old time
    write_image(tmp_path / "new.bmp", size=(6, 6), seed=90)
    os.replace(tmp_path / "new.bmp", data / "a" / "000.bmp")
    os.utime(data / "a" / "000.bmp", ns=(st.st_atime_ns, st.st_mtime_ns))
    # cp -p: rewritten in place (same inode), with the old time: only the change time differs
    st = os.stat(data / "b" / "001.bmp")
    write_image(tmp_path / "other.bmp", size=(6, 6), seed=91)
    shutil.copyfile(tmp_path / "other.bmp", data / "b" / "001.bmp")
    os.utime(data / "b" / "001.bmp", ns=(st.st_atime_ns, st.st_mtime_ns))
    after = list_images(data)
    assert os.stat(data / "b" / "001.bmp").st_ino == st.st_ino and after.sizes.tolist() == [int(st.st_size)] * 4
    base = find_kept(tmp_path / "old.h5", after)
    assert [after.paths[i] for i in base.index] == ["a/001.bmp", "b/000.bmp"]


def test_rejections_of_a_changed_limit_are_not_kept(tmp_path):
    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=2, size=(6, 6))
    listing = list_images(data)
    slow = Reject("a/000.png", "decoding took longer than 0.5 s (per-image time limit)", *listing.versions([0])[0].tolist(), "image_timeout=0.5")
    corrupt = Reject("b/001.png", "corrupt", *listing.versions([3])[0].tolist(), "")
    write_from_listing(tmp_path / "old.h5", listing, rejected=[slow, corrupt])
    for timeout, kept in ((0.5, [slow, corrupt]), (600.0, [corrupt])):
        current = limits(timeout)
        base = find_kept(tmp_path / "old.h5", listing, lambda limit: limit_holds(limit, current))
        assert base.rejected == kept, timeout
        assert [r for r in stored_rows(tmp_path / "old.h5")[3] if not limit_holds(r.limit, current)] == [slow][: 2 - len(kept)]  # to retry
    assert find_kept(tmp_path / "old.h5", listing, lambda limit: False).rejected == []  # --retry-rejected


# --------------------------------------------------------------------------- reuse only what is provably unchanged
FAST = ["--weights", "none", "--input-size", "32", "--batch-size", "4", "--quiet"]


def _extract(data, out, *extra):
    from pipeline.cli import main

    return main(["extract", str(data), "-o", str(out), *FAST, *extra])


def _labels_follow_folders(out) -> bool:
    from conftest import by_path

    rows, _ = by_path(out)
    return all(label == path.split("/")[0] for path, (label, _) in rows.items())


def test_a_file_edited_by_another_tool_is_not_up_to_date(tmp_path, capsys):
    """Issue #22: only the fingerprint was compared: rows dropped or labels flipped by another tool were "up to date" (flipped labels now break the contract: refused, --overwrite extracts again)."""
    import h5py

    from pipeline.featurefile.checks import verify

    data = make_tree(tmp_path / "data", per_class=5, size=(8, 8))
    out = tmp_path / "x.h5"
    assert _extract(data, out) == 0
    with h5py.File(out, "r+") as db:  # labels flipped: not what the folders say (verify's label rule says so)
        db["labels"][0:2] = 1 - db["labels"][0:2]
    assert verify(out) == [f"{out}: 2 rows have a label that is not their class folder, e.g. row 0 (cat/000.png) has label 'dog' but lies in class folder 'cat'"]
    capsys.readouterr()
    assert _extract(data, out) == 2  # a file that breaks the contract is never updated in place
    assert "exists and it breaks the feature-file contract (" in capsys.readouterr().err
    assert _extract(data, out, "--overwrite") == 0
    assert verify(out) == [] and _labels_follow_folders(out)
    with h5py.File(out, "r+") as db:  # a row dropped from every column, the counts made to agree: a sound file of 9 images
        for name in ("features", "labels", "paths", "file_sizes", "file_mtimes_ns", "file_inodes", "file_ctimes_ns"):
            db[name].resize(9, axis=0)
        db.attrs["n_images"] = 9
    assert verify(out) == []
    assert _extract(data, out) == 0 and "1 processed this run" in capsys.readouterr().out
    with h5py.File(out, "r+") as db:  # a row dropped from the features only: the file breaks the contract
        db["features"].resize(9, axis=0)
    assert _extract(data, out) == 2
    assert "exists and it breaks the feature-file contract (" in capsys.readouterr().err
    assert _extract(data, out, "--overwrite") == 0 and verify(out) == []


def test_a_damaged_chunk_of_the_previous_output_is_extracted_again_never_copied(tmp_path, capsys):
    """Issue #22: a damaged chunk was copied as it was: a "complete" file verify rejects, then "up to date"."""
    from featurefile.test_checks import damage_chunk
    from pipeline.featurefile.checks import verify

    data = make_tree(tmp_path / "data", per_class=20, size=(8, 8))
    out = tmp_path / "x.h5"
    assert _extract(data, out) == 0
    damage_chunk(out, 20)
    assert verify(out)
    capsys.readouterr()
    assert _extract(data, out, "--batch-size", "4") == 0  # the same command: not up to date
    assert "16 processed this run" in capsys.readouterr().out
    assert verify(out) == [] and _labels_follow_folders(out)
    damage_chunk(out, 0)
    write_image(data / "dog" / "new.png", size=(8, 8), seed=77)  # an update keeping the other rows
    assert _extract(data, out) == 0 and "17 processed this run" in capsys.readouterr().out
    assert verify(out) == []
    assert _extract(data, out) == 0 and "up to date" in capsys.readouterr().out


def test_a_damaged_part_of_the_work_area_is_extracted_again(tmp_path, capsys, monkeypatch):
    """Issue #22: a work-area part's chunks were copied unchecked (the docs promise a bad part is re-extracted)."""
    from pipeline.extract import stage
    from pipeline.featurefile.checks import verify

    data = make_tree(tmp_path / "data", per_class=8, size=(8, 8))
    out = tmp_path / "x.h5"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("SIGTERM")

    with monkeypatch.context() as mp:  # every part written, then interrupted while assembling
        mp.setattr(stage, "write_feature_file", interrupted)
        assert _extract(data, out) == 130
    parts = sorted(out.with_name("x.h5.partial").glob("part-*.part"))
    assert len(parts) == 4
    with open(parts[1], "r+b") as f:  # the last bytes of its features: inside its last chunk
        f.seek(-8, os.SEEK_END)
        f.write(b"\xff" * 8)
    capsys.readouterr()
    assert _extract(data, out) == 0
    assert "4 processed this run" in capsys.readouterr().out  # the damaged part's batch only
    assert verify(out) == [] and _labels_follow_folders(out)
