"""The work area: parts written atomically, read back in listing order, mapped onto a changed listing by path and file version, damaged parts (and parts of another version of the pipeline, or of other settings) dropped; only a plain folder holding the tool's own files is used, and removing it never deletes anything else."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from conftest import assert_same_rows, by_path, make_tree, write_image
from pipeline.cli import main
from pipeline.images.listing import list_images
from pipeline.extract.workarea import WorkArea
from pipeline.featurefile import chunks


def packed(rows: np.ndarray) -> chunks.Packed:
    """Rows as the loop hands them to a part: compressed chunks of the default layout."""
    return chunks.pack(rows, chunks.default_layout(rows.shape[1:], "float16"))


def test_parts_and_resume_indices(tmp_path):
    listing = list_images(make_tree(tmp_path / "data", per_class=4, size=(6, 6)))
    work = WorkArea(tmp_path / "x.h5")
    assert work.path == tmp_path / "x.h5.partial" and not work.exists() and work.manifest() is None
    work.start({"listing_sha256": "abc"})
    assert work.manifest() == {"listing_sha256": "abc"} and work.next_seq() == 0
    feats = np.ones((2, 1, 1, 4), np.float16)
    work.write_part(0, listing, np.array([4, 5]), packed(feats), np.array([6]), ["empty file (0 bytes)"], [""])
    work.write_part(1, listing, np.array([0, 1]), packed(feats * 2), np.array([], np.int64), [], [])
    assert [p.name for p in work.parts()] == ["part-000000000.part", "part-000000001.part"] and work.next_seq() == 2
    assert work.done_indices(listing).tolist() == [0, 1, 4, 5, 6]
    index = work.index(listing)  # in listing order, not in the order written
    assert [p.indices.tolist() for p in index] == [[0, 1], [4, 5]] and index[1].reasons == ["empty file (0 bytes)"]
    np.testing.assert_array_equal(WorkArea.features(index[0]).array(), feats * 2)
    assert not list(work.path.glob(".part-*"))  # no temporary part left behind
    assert work.done_indices(listing, exclude=np.array([0, 6])).tolist() == [1, 4, 5]  # already accounted for elsewhere
    (work.path / "part-000000002.part").write_bytes(b"damaged")  # never written by us: a disk fault
    (work.path / "part-000000003.npz").write_bytes(b"PK")  # a part of another version of the pipeline
    assert len(work.parts()) == 4
    assert work.done_indices(listing).tolist() == [0, 1, 4, 5, 6] and len(work.parts()) == 2  # dropped, their rows redone
    work.set_manifest({"listing_sha256": "def"})
    assert work.manifest() == {"listing_sha256": "def"} and len(work.parts()) == 2  # the parts stay
    work.remove()
    assert not work.exists()


def test_parts_follow_their_files_through_a_changed_listing(tmp_path):
    data = make_tree(tmp_path / "data", classes=("b", "c"), per_class=3, size=(6, 6))
    before = list_images(data)  # b/000 b/001 b/002 c/000 c/001 c/002
    work = WorkArea(tmp_path / "x.h5")
    work.start({})
    rows = np.arange(4, dtype=np.float16)[:, None, None, None] * np.ones((1, 1, 1, 2), np.float16)
    work.write_part(0, before, np.array([0, 1, 2, 3]), packed(rows), np.array([4, 5]), ["timed out", "corrupt"], ["image_timeout=0.5", ""])
    write_image(data / "a" / "000.png", size=(6, 6), seed=50)  # a new class first: every index moves by one
    write_image(data / "b" / "001.png", size=(6, 6), seed=51)  # rewritten
    os.utime(data / "b" / "001.png", ns=(1, 1))
    (data / "c" / "000.png").unlink()  # deleted
    after = list_images(data)
    assert after.paths[:3] == ("a/000.png", "b/000.png", "b/001.png")

    [part] = work.index(after)
    assert [after.paths[i] for i in part.indices] == ["b/000.png", "b/002.png"]  # b/001 changed, c/000 gone
    np.testing.assert_array_equal(WorkArea.features(part)[:, 0, 0, 0], [0, 2])  # their own rows of features
    assert [after.paths[i] for i in part.rejected_indices] == ["c/001.png", "c/002.png"] and part.limits == ["image_timeout=0.5", ""]
    # a rejection whose limit no longer holds is not kept: the file is decoded again
    [part] = work.index(after, keep_rejected=lambda limit: limit == "")
    assert [after.paths[i] for i in part.rejected_indices] == ["c/002.png"] and part.reasons == ["corrupt"]
    assert sorted(after.paths[i] for i in work.done_indices(after)) == ["b/000.png", "b/002.png", "c/001.png", "c/002.png"]


FAST = ["--weights", "none", "--batch-size", "4", "--quiet"]


def extract(data, out, size, *extra):
    return main(["extract", str(data), "-o", str(out), *FAST, "--input-size", str(size), *extra])


@pytest.mark.parametrize("kind", ["link", "file", "fifo"])
def test_a_work_area_that_is_not_a_plain_folder_is_refused_before_any_work(tmp_path, capsys, kind):
    """Issue #22: through a link the parts were written into (and reused from) the link's target, and a later run
    with other settings kept them; a file there was a 30-line NotADirectoryError."""
    data = make_tree(tmp_path / "data", per_class=2, size=(8, 8))
    out, work, target = tmp_path / "x.h5", tmp_path / "x.h5.partial", tmp_path / "elsewhere"
    target.mkdir()
    {"link": lambda: work.symlink_to(target), "file": lambda: work.write_text("user file\n"), "fifo": lambda: os.mkfifo(work)}[kind]()
    assert extract(data, out, 32) == 2
    err = capsys.readouterr().err
    what = {"link": f"a symbolic link (to {target})", "file": "a file, not a folder", "fifo": "a FIFO (named pipe), not a folder"}[kind]
    assert err.count("\n") == 1 and err.startswith(f"error: {work}: the work area is {what}"), err
    assert not out.exists() and os.listdir(target) == [] and (kind != "file" or work.read_text() == "user file\n")


def test_a_work_area_holding_anything_else_is_refused_and_left_whole(tmp_path, capsys):
    """Issue #22: a work area holding no part was replaced: the user's whole folder, notes and subfolder, was deleted."""
    data = make_tree(tmp_path / "data", per_class=2, size=(8, 8))
    work = tmp_path / "x.h5.partial"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("note\n")
    (work / "sub" / "x.png").write_text("n2\n")
    assert extract(data, tmp_path / "x.h5", 32) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{work}: the work area holds 'notes.txt', which extract did not write" in err
    assert (work / "notes.txt").read_text() == "note\n" and (work / "sub" / "x.png").read_text() == "n2\n"
    WorkArea(tmp_path / "x.h5").remove()  # removing a work area never deletes what the tool did not write
    assert sorted(os.listdir(work)) == ["notes.txt", "sub"]


def test_parts_of_other_settings_are_never_reused_whatever_the_record_says(tmp_path, monkeypatch):
    """Issue #22: parts made at --input-size 32 were kept by a run at 48 (0 processed, the file said 48, verify ok).

    The parts are put under the record of a 48-pixel run (a stale record): each part's own settings key refuses them.
    """
    from conftest import stopping_batches
    from pipeline.extract import loop as runner

    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=6, size=(12, 12))
    out, work = tmp_path / "x.h5", tmp_path / "x.h5.partial"

    with monkeypatch.context() as m:
        m.setattr(runner, "iter_batches", stopping_batches(2))
        assert extract(data, out, 32, "--workers", "1") == 130
        work.rename(tmp_path / "saved")
        assert extract(data, out, 48, "--workers", "1") == 130
    for part in (tmp_path / "saved").glob("part-*"):
        shutil.copy(part, work / part.name)  # 32-pixel parts under the 48-pixel run's record
    assert extract(data, out, 48) == 0
    assert extract(data, tmp_path / "fresh48.h5", 48) == 0 and extract(data, tmp_path / "fresh32.h5", 32) == 0
    assert_same_rows(out, tmp_path / "fresh48.h5")
    rows32, rows48 = by_path(tmp_path / "fresh32.h5")[0], by_path(out)[0]
    assert any(not np.allclose(rows32[p][1], rows48[p][1], rtol=0.05, atol=0.05) for p in rows48)  # the sizes give other rows
