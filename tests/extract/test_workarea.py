"""The work area: parts written atomically, read back in listing order, mapped onto a changed listing by path and file version, damaged parts (and parts of another version of the pipeline) dropped."""

from __future__ import annotations

import os

import numpy as np

from conftest import make_tree, write_image
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
