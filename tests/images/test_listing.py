"""The listing: sorted by class then path, skipped files as reject records, errors that name the path, matching stored rows by path and version."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import make_tree, write_image
from pipeline.core.errors import PipelineError
from pipeline.images.listing import list_images


def test_listing_sorted_by_class_then_path(tmp_path):
    root = make_tree(tmp_path / "d", classes=("zebra", "ant", "moose"), per_class=2)
    write_image(root / "ant" / "sub" / "deep.JPG", fmt="JPEG")
    (root / "ant" / ".hidden.png").write_bytes(b"x")
    (root / "moose" / "notes.txt").write_text("hi")
    (root / "stray.png").write_bytes(b"x")
    listing = list_images(root)
    assert listing.class_names == ("ant", "moose", "zebra")
    assert listing.paths == (
        "ant/000.png", "ant/001.png", "ant/sub/deep.JPG",
        "moose/000.png", "moose/001.png",
        "zebra/000.png", "zebra/001.png",
    )
    assert listing.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert {(r.path, r.reason) for r in listing.skipped} == {
        ("stray.png", "not inside a class folder"),
        ("moose/notes.txt", "unsupported file type '.txt'"),
    }


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, r"data folder does not exist"),
        (lambda root: root.mkdir(), r"no class sub-folders"),
        (lambda root: make_tree(root, classes=("only",)), r"only one class folder \(only\)"),
        (lambda root: (make_tree(root), (root / "empty").mkdir()), r"empty: class folder has no image files"),
        (lambda root: (root.parent.mkdir(exist_ok=True), root.write_text("x")), r"not a folder"),
    ],
    ids=["missing", "no-classes", "one-class", "empty-class", "file-not-folder"],
)
def test_listing_errors_name_the_path(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(PipelineError, match=message) as err:
        list_images(root)
    assert str(tmp_path) in str(err.value)


def test_match_finds_stored_rows_by_path_and_version(tmp_path):
    root = make_tree(tmp_path / "d", per_class=3, size=(6, 6))
    listing = list_images(root)
    stored = ["dog/001.png", "gone.png", "cat/002.png", "cat/000.png"]
    versions = listing.versions([4, 0, 2, 0])  # gone.png's row: any version
    versions[3, 1] += 1  # cat/000.png: stored with another mtime
    idx, same = listing.match(stored, versions)
    assert idx.tolist() == [4, -1, 2, 0] and same.tolist() == [True, False, True, False]
    os.utime(root / "cat" / "002.png", ns=(1, 1))  # changed since it was stored
    idx, same = list_images(root).match(stored, versions)
    assert idx.tolist() == [4, -1, 2, 0] and same.tolist() == [True, False, False, False]
    assert [a.tolist() for a in listing.match([], np.zeros((0, 4), np.int64))] == [[], []]
