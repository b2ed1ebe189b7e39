"""A test tree holding a training image (the same file, or the same bytes under another name) is refused by every stage that scores on a test tree: finetune, scratch and compare, before any work."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import make_tree
from pipeline.core.errors import PipelineError
from pipeline.images.overlap import list_inputs


def _trees(tmp_path):
    root = tmp_path / "data"
    make_tree(root / "train", classes=("a", "b"), per_class=4, size=(24, 24))
    make_tree(root / "test", classes=("a", "b"), per_class=2, size=(24, 24))
    return root


def test_a_test_tree_sharing_a_training_image_is_refused_unless_allowed(tmp_path):
    root = _trees(tmp_path)
    train_image = sorted((root / "train" / "b").iterdir())[1]
    list_inputs(root / "train", root / "test")  # disjoint: fine
    shutil.copy(train_image, root / "test" / "b" / "copied.png")  # the same bytes under another name
    with pytest.raises(PipelineError, match=rf"test: 1 of its 5 images are also training images of .*train \(first: .*test/b/copied\.png, "
                                            rf"the same content as .*train/b/{train_image.name}\); test on other images, or pass --allow-overlap if you mean it$"):  # fmt: skip
        list_inputs(root / "train", root / "test")
    listing, test_listing = list_inputs(root / "train", root / "test", allow_overlap=True)
    assert len(test_listing) == 5
    copy = tmp_path / "copy"
    shutil.copytree(root / "train", copy)  # a copy of the whole training tree
    with pytest.raises(PipelineError, match=r"copy: 8 of its 8 images are also training images"):
        list_inputs(root / "train", copy)


@pytest.mark.parametrize("argv", [
    ["scratch", "{data}/train", "--test", "{test}", "--dense", "4", "--input-size", "32", "--epochs", "1", "-o", "{out}", "--quiet"],
    ["finetune", "{data}/train", "--test", "{test}", "--weights", "none", "--input-size", "32", "--epochs", "1", "-o", "{out}", "--quiet"],
    ["compare", "--data", "{data}", "-o", "{out}", "--weights", "none", "--input-size", "32", "--strategies", "lr,scratch", "--quiet"],
])  # fmt: skip
def test_stages_scoring_on_a_test_tree_refuse_one_that_shares_training_images(argv, tmp_path, capsys):
    """Fourth pass (#22): finetune and scratch with --test a copy of the training tree scored 0.925 on their own training images, and compare
    with training images copied into DATA/test reported LR 0.675 where the honest test gives 0.567, all exit 0 (train refused the same files)."""
    from pipeline.cli import main

    root = _trees(tmp_path)
    for image in sorted((root / "train" / "a").iterdir())[:2]:
        shutil.copy(image, root / "test" / "a" / f"copy-{image.name}")
    out = tmp_path / "out"
    assert main([a.format(data=root, test=root / "test", out=out) for a in argv]) == 2
    assert "2 of its 6 images are also training images of" in capsys.readouterr().err
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


def _twins(root):
    """``root`` with a byte-identical ``dup_`` twin beside every image (the adversarial tree of #22)."""
    for image in sorted(root.glob("*/*.png")):
        shutil.copy(image, image.parent / f"dup_{image.name}")
    return root


def test_duplicate_groups_join_the_same_file_and_the_same_bytes_only(tmp_path, monkeypatch):
    from pipeline.images import overlap

    root = make_tree(tmp_path / "data", classes=("a",), per_class=3, size=(24, 24))
    a, b, c = sorted(str(p) for p in (root / "a").iterdir())
    shutil.copy(a, root / "a" / "copy.png")
    (root / "link.png").symlink_to(b)
    (root / "other.png").write_bytes(b"x" * 7)
    hashed = []
    monkeypatch.setattr(overlap, "file_digest", lambda p: hashed.append(str(p)) or str(p.read_bytes()))
    files = [(os.path.realpath(p), os.path.getsize(p)) for p in (a, b, c, root / "a" / "copy.png", root / "link.png", root / "other.png")]
    files += [(None, 7), (str(tmp_path / "gone.png"), os.path.getsize(c))]
    groups = overlap.duplicate_groups(files)
    assert groups.tolist()[:6] == [0, 1, 2, 0, 1, 5]  # the copy joins a, the link is b, the 7-byte file and the unknown one stand alone
    assert groups[6] == 6 and groups[7] == 7  # no path, and a file that cannot be read: their own groups
    assert str(root / "other.png") not in hashed and len(hashed) == len(set(hashed))  # only same-size files are read, once each


def test_split_groups_notes_the_groups_kept_together(tmp_path, capsys):
    from pipeline.images.listing import list_images
    from pipeline.images.overlap import listing_files, split_groups

    root = make_tree(tmp_path / "data", classes=("a", "b"), per_class=3, size=(24, 24))
    groups = split_groups(listing_files(list_images(root)), "S")
    assert len(set(groups.tolist())) == 6 and capsys.readouterr().err == ""  # no duplicates: no note
    listing = list_images(_twins(root))
    groups = split_groups(listing_files(listing), "S")
    assert len(set(groups.tolist())) == 6
    assert all(groups[listing.paths.index(p)] == groups[listing.paths.index(p.replace("dup_", ""))] for p in listing.paths)
    assert capsys.readouterr().err == "note: 6 groups of identical images (12 images: the same file or the same bytes) are each kept on one side of S\n"
    gone = [(str(tmp_path / f"gone{i}.png"), 5) for i in range(2)]
    assert split_groups(gone + [(str(tmp_path / "x.png"), 9)], "S").tolist() == [0, 1, 2]
    assert capsys.readouterr().err == "note: 2 images could not be compared by content for S (their files are gone); identical copies among them may fall on both sides\n"


@pytest.mark.parametrize("argv", [
    ["scratch", "{data}", "--dense", "4", "--input-size", "32", "--epochs", "1", "-o", "{out}", "--quiet"],
    ["finetune", "{data}", "--weights", "none", "--input-size", "32", "--epochs", "1", "-o", "{out}", "--quiet"],
])  # fmt: skip
def test_stages_splitting_a_tree_keep_identical_images_on_one_side(argv, tmp_path, capsys):
    """Fifth pass (#22): finetune without --test on a tree where every image has a byte-identical twin scored 0.90 on 20 images, each test image's
    twin being a training image."""
    import json

    from pipeline.cli import main

    data = _twins(make_tree(tmp_path / "data", classes=("a", "b"), per_class=5, size=(24, 24)))
    out = tmp_path / "out"
    assert main([a.format(data=data, out=out) for a in argv]) == 0
    metrics = json.loads((out / f"{argv[0]}.metrics.json").read_text())
    test = metrics["test_predictions"]["paths"]
    assert len(test) == 4 and sorted(p.replace("dup_", "") for p in test if "dup_" in p) == sorted(p for p in test if "dup_" not in p)
    assert metrics["n_val"] == 4  # whole pairs: validation as well (tests/nets/test_images.py checks its pixels)
    assert "note: 10 groups of identical images (20 images" in capsys.readouterr().err


def test_a_fifo_or_a_device_among_the_images_is_never_read_for_its_digest(tmp_path):
    """Ninth pass (#22): a FIFO in the training tree and an empty test image (both size 0) hung scratch and compare in the overlap
    check, and a FIFO or a link to /dev/zero hung scratch's data digest: digests read whatever the path named."""
    import signal

    from pipeline.core.digests import file_digest, tree_digest
    from pipeline.images.overlap import shared_files

    fifo, empty = tmp_path / "pipe.png", tmp_path / "empty.png"
    os.mkfifo(fifo)
    empty.write_bytes(b"")
    (tmp_path / "zero.png").symlink_to("/dev/zero")

    def hung(*_):
        raise TimeoutError("a digest read a FIFO or a device")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        for special in (fifo, tmp_path / "zero.png"):
            with pytest.raises(OSError, match="not a regular file"):
                file_digest(special)
        found = shared_files([(str(fifo), 0)], [(str(empty), 0)])
        assert not found.pairs and found.unchecked == 1
        assert tree_digest(tmp_path, ["pipe.png", "zero.png", "empty.png"], [0, 0, 1]) != tree_digest(tmp_path, ["empty.png"], [1])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
