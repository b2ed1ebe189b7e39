"""Training images: decoded in listing order, rejects recorded, the shared split for test and validation, the memory budget."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_tree
from pipeline.core.errors import PipelineError
from pipeline.core.splits import split_indices
from pipeline.images.decode import load_image
from pipeline.nets import images
from pipeline.images.overlap import list_inputs
from pipeline.nets.images import check_pixel_memory, load_data, split_rows

OPTS = dict(input_size=16, resize="bilinear", val_split=0.2, seed=0, quiet=True)


@pytest.fixture
def trees(tmp_path):
    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=5)
    (data / "b" / "broken.png").write_bytes(b"not an image")
    test = make_tree(tmp_path / "test", classes=("a", "b"), per_class=2)
    return data, test


def test_test_split_is_the_shared_split_of_the_decodable_images(trees):
    data, _ = trees
    listing, test_listing = list_inputs(data, None)
    d = load_data(listing, test_listing, **OPTS)
    pool, test_rows = split_indices(np.repeat([0, 1], 5), images.TEST_SIZE, 0)
    decodable = np.stack([load_image(data / p, 16, "bilinear") for p in listing.paths if "broken" not in p])
    assert np.array_equal(d.test_x, decodable[test_rows]) and d.test_x.dtype == np.uint8
    assert len(d.train_y) + len(d.val_y) == len(pool) and len(d.val_y) == 2
    assert d.rejected == [(str(data / "b" / "broken.png"), d.rejected[0][1])] and d.rejected[0][1]
    assert d.test_source.startswith("split of") and d.class_names == ("a", "b")


def test_a_test_folder_is_used_whole(trees):
    data, test = trees
    d = load_data(*list_inputs(data, test), **OPTS)
    assert len(d.test_y) == 4 and d.test_source.endswith("(test folder)")
    assert len(d.train_y) + len(d.val_y) == 10


def test_too_few_images_leave_no_validation_rows(tmp_path):
    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=2)
    with pytest.raises(PipelineError, match=r"4 decodable images leave no validation \(--val-split\) images; add images"):
        load_data(*list_inputs(data, None), **OPTS)


def test_split_errors_name_what_was_split():
    with pytest.raises(PipelineError, match=r"^X \(test split\): cannot split 4 images"):
        split_rows(np.array([0, 0, 1, 1]), 1.5, 0, "X (test split)")


def test_pixels_over_the_memory_budget_are_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(images, "memory_budget", lambda: 10_000)
    assert check_pixel_memory(tmp_path, 3, 32) == 3 * 32 * 32 * 3
    with pytest.raises(PipelineError, match=r"4 images at 32x32 need 0.00 GB in memory as uint8, over the budget"):
        check_pixel_memory(tmp_path, 4, 32)


def test_identical_images_never_straddle_the_test_or_validation_split(tmp_path, capsys):
    """#22: finetune without --test on a tree where every image had a byte-identical twin scored 0.90: each test image's twin was a training image
    (and the validation split, which picks the epochs, leaked the same way)."""
    import shutil

    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=5)
    for image in sorted(data.glob("*/*.png")):
        shutil.copy(image, image.parent / f"dup_{image.name}")
    d = load_data(*list_inputs(data, None), **OPTS)
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (12, 4, 4)  # whole pairs: 1 of 5 per class to test, 1 of 4 to validation
    assert {p.replace("dup_", "") for p in d.test_paths} == {p.replace("dup_", "") for p in d.test_paths if "dup_" in p}
    sides = [{x.tobytes() for x in side} for side in (d.train_x, d.val_x, d.test_x)]
    assert sum(len(s) for s in sides) == 10 and not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert "note: 10 groups of identical images (20 images: the same file or the same bytes) are each kept on one side of the test and validation splits" in capsys.readouterr().err


def test_a_class_left_without_training_images_by_the_twin_groups_is_refused(tmp_path):
    """Ninth pass (#22): a class whose only image is a byte copy of another class's image followed its twin's group to the test or
    validation side: scratch and finetune trained with no image of that class and exited 0 (train refused the same file)."""
    import shutil

    data = make_tree(tmp_path / "data", classes=("bag", "coat", "dress"), per_class=4)
    for image in sorted((data / "coat").iterdir())[1:]:
        image.unlink()
    shutil.copy(sorted((data / "bag").iterdir())[0], sorted((data / "coat").iterdir())[0])
    refused = 0
    for seed in range(8):
        try:
            d = load_data(*list_inputs(data, None), **{**OPTS, "seed": seed})
        except PipelineError as exc:
            assert "class 'coat' has no training images (every image of it was rejected, or is byte-identical to an image of another class" in str(exc)
            refused += 1
        else:
            assert 1 in set(d.train_y.tolist())  # coat is trained on
    assert refused  # some seeds hold the pair out
