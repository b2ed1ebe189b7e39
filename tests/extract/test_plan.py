"""The plan: one answer to "what must this run do?": a fresh extraction of every row, nothing for an up-to-date output, an update that keeps the unchanged rows and extracts the new ones, a refusal (or with --overwrite a fresh start) for other settings."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import make_tree, write_image
from pipeline.core.errors import PipelineError
from pipeline.extract.config import ExtractConfig
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
