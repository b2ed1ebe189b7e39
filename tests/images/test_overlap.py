"""A test tree holding a training image (the same file, or the same bytes under another name) is refused by every stage that scores on a test tree: finetune, scratch and compare, before any work."""

from __future__ import annotations

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
