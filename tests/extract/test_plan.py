"""The plan: one answer to "what must this run do?": a fresh extraction of every row, nothing for an up-to-date output, an update that keeps the unchanged rows and extracts the new ones, a refusal (or with --overwrite a fresh start) for other settings or another data folder."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from conftest import make_tree, write_image
from pipeline.core.errors import PipelineError
from pipeline.extract.config import ExtractConfig
from pipeline.featurefile.store import open_features
from pipeline.extract.plan import REPLACE, UP_TO_DATE, UPDATE, make_plan
from pipeline.images.listing import list_images
from shard_data import extract


def test_a_plan_says_what_to_keep_and_what_to_extract(tmp_path):
    data = make_tree(tmp_path / "data", per_class=3, size=(12, 12))
    out = tmp_path / "x.h5"
    config = ExtractConfig(data_dir=data, output=out, weights="none", input_size=32).validate()

    fresh = make_plan(config, list_images(data))
    assert fresh.action == REPLACE and fresh.kept is None and fresh.todo.tolist() == list(range(6)) and len(fresh.done) == 0
    assert fresh.work.manifest() == dict(fresh.fingerprint, kept_from=None)  # the work area is this run's
    fresh.work.remove()

    assert extract(data, out) == 0
    same = make_plan(config, list_images(data))
    assert same.action == UP_TO_DATE and same.fingerprint == fresh.fingerprint

    write_image(data / "dog" / "new.png", size=(12, 12), seed=7)
    whole = list_images(data)
    update = make_plan(config, whole)
    assert update.action == UPDATE and [whole.paths[i] for i in update.todo] == ["dog/new.png"]
    assert len(update.kept.rows) == 6 and sorted(update.kept.covered.tolist()) == [i for i, p in enumerate(whole.paths) if p != "dog/new.png"]
    update.work.remove()

    other = ExtractConfig(data_dir=data, output=out, weights="none", input_size=32, storage="float32").validate()
    with pytest.raises(PipelineError, match=r"x.h5: exists and differs: storage 'float16' -> 'float32'; the images changed \(6 files before, 7 now, or files modified\); pass --overwrite to replace it$"):
        make_plan(other, whole)
    replace = make_plan(dataclasses.replace(other, overwrite=True), whole)
    assert replace.action == REPLACE and replace.kept is None and len(replace.todo) == len(whole)


def test_the_features_of_another_data_folder_are_not_replaced_without_overwrite(tmp_path, capsys):
    """Issue #22: extract onto a copy of the training file with the test folder replaced its rows, as an ordinary update."""
    train, test = make_tree(tmp_path / "train", per_class=4, size=(8, 8)), make_tree(tmp_path / "test", per_class=3, size=(8, 8))
    assert extract(train, tmp_path / "tr.h5") == 0
    shutil.copy(tmp_path / "tr.h5", tmp_path / "c.h5")
    before = (tmp_path / "c.h5").read_bytes()
    capsys.readouterr()
    assert extract(test, tmp_path / "c.h5") == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'c.h5'}: holds the features of another data folder {train.resolve()}; pass --overwrite to replace it\n"
    assert (tmp_path / "c.h5").read_bytes() == before and not (tmp_path / "c.h5.partial").exists()
    assert extract(test, tmp_path / "c.h5", "--overwrite") == 0
    with open_features(tmp_path / "c.h5") as ff:
        assert len(ff.paths) == 6 and ff.attrs["data_dir"] == str(test.resolve())
