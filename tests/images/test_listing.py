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


def test_links_are_followed_once_and_every_other_entry_is_a_reject_with_its_reason(tmp_path):
    """Issue #22: images in a linked sub-folder and a link loop were neither rows nor rejects; a class linked to another doubled its images."""
    root = make_tree(tmp_path / "d", classes=("cat", "dog"), per_class=2)
    outside = make_tree(tmp_path / "elsewhere", classes=("more",), per_class=2) / "more"
    (root / "cat" / "linked").symlink_to(outside)  # followed: its images are cat's
    (root / "dog" / "again").symlink_to(outside)  # the same folder through a second link: listed once
    (root / "cat" / "loop").symlink_to(root / "cat")  # a loop
    (root / "dog" / "cats").symlink_to(root / "cat")  # into another class folder
    listing = list_images(root)
    assert listing.paths == ("cat/000.png", "cat/001.png", "cat/linked/000.png", "cat/linked/001.png", "dog/000.png", "dog/001.png")
    reasons = {r.path: r.reason for r in listing.skipped}
    assert reasons.keys() == {"cat/loop", "dog/again", "dog/cats"}
    assert reasons["cat/loop"].startswith("link loop: a link to ")
    assert reasons["dog/cats"].startswith("link to a folder of class folder cat (") and reasons["dog/cats"].endswith("its images are listed there, not twice")
    assert reasons["dog/again"].endswith("already listed through cat/linked: its images are listed once")


@pytest.mark.parametrize("target", ["cat", "cat/sub", "."], ids=["class", "inside-a-class", "the-data-folder"])
def test_a_class_folder_linked_to_another_class_folder_is_refused(tmp_path, target):
    root = make_tree(tmp_path / "d", classes=("cat", "dog"), per_class=2)
    write_image(root / "cat" / "sub" / "x.png")
    (root / "kitten").symlink_to(root / target)
    with pytest.raises(PipelineError, match=r"kitten: class folder is a link to .*(inside class folder .*cat; its images would be listed under two labels|holds the data folder itself)"):
        list_images(root)


@pytest.mark.parametrize("splits", [("train", "test"), ("Train", "VAL"), ("validation",)])
def test_split_named_sub_folders_are_not_taken_as_classes(tmp_path, splits):
    """Issue #23: `extract mydata` with mydata/train and mydata/test gave two classes named test and train."""
    root = tmp_path / "mydata"
    for split in splits:
        make_tree(root / split, classes=("cat", "dog"), per_class=1)
    with pytest.raises(PipelineError, match=r"(are split names|is a split name), not classes") as err:
        list_images(root)
    first = next((s for s in splits if s.lower() == "train"), splits[0])
    assert f"point at {root / first} for the training split" in str(err.value)
    assert ("and at" in str(err.value)) == ("test" in [s.lower() for s in splits])
    assert list_images(root / splits[0]).class_names == ("cat", "dog")  # the split itself is a data folder


def test_a_file_reached_twice_is_listed_once_where_it_lies_and_the_other_path_is_a_reject(tmp_path):
    """Second adversarial pass (#22): a file link in one class folder to a file of another class listed one image under two labels; a hard link did too."""
    root = make_tree(tmp_path / "d", classes=("cat", "dog"), per_class=2)
    (root / "cat" / "from-dog.png").symlink_to(root / "dog" / "000.png")  # a link to another class's image
    (root / "dog" / "again.png").symlink_to("001.png")  # a second path to an image of the same class
    os.link(root / "cat" / "001.png", root / "dog" / "hard.png")  # a hard link: two names, one file
    outside = write_image(tmp_path / "elsewhere" / "x.png")
    (root / "cat" / "out.png").symlink_to(outside)  # a link out of the tree: listed (once)
    (root / "dog" / "out-too.png").symlink_to(outside)
    listing = list_images(root)
    assert listing.paths == ("cat/000.png", "cat/001.png", "cat/out.png", "dog/000.png", "dog/001.png")
    assert listing.labels.tolist() == [0, 0, 0, 1, 1]
    reasons = {r.path: r.reason for r in listing.skipped}
    assert reasons == {
        "cat/from-dog.png": "same file as dog/000.png of class dog (a symbolic link): each image is listed once",
        "dog/again.png": "same file as dog/001.png (a symbolic link): each image is listed once",
        "dog/hard.png": "same file as cat/001.png of class cat (a hard link): each image is listed once",
        "dog/out-too.png": "same file as cat/out.png of class cat (a symbolic link): each image is listed once",
    }
    only_links = tmp_path / "d2"
    make_tree(only_links, classes=("cat",), per_class=2)
    (only_links / "dog").mkdir()
    (only_links / "dog" / "a.png").symlink_to(only_links / "cat" / "000.png")
    with pytest.raises(PipelineError, match=r"d2/dog: class folder has no image of its own: its 1 image file\(s\) are links or hard links"):
        list_images(only_links)


def test_a_link_to_itself_at_the_top_of_the_data_folder_is_a_record_not_a_traceback(tmp_path):
    """Eleventh pass (#22): `extract`, `evaluate`, `finetune --test` and `extract_features` on a folder holding `loop -> loop` at its top
    were an OSError traceback (Too many levels of symbolic links)."""
    make_tree(tmp_path / "d", classes=("a", "b"), per_class=2)
    (tmp_path / "d" / "loop").symlink_to("loop")
    listing = list_images(tmp_path / "d")
    assert len(listing) == 4 and [(r.path, r.reason) for r in listing.skipped] == [("loop", "not inside a class folder")]
