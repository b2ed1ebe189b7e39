"""The batch loop's writer: finished batches compressed and written by several threads, each exactly once, errors reported to the loop; the prefetch depth."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_tree
from pipeline.featurefile import chunks
from pipeline.images.listing import list_images
from pipeline.extract.loop import PartWriter, prefetch_depth
from pipeline.extract.workarea import WorkArea


def test_writer_threads_write_every_batch_once_as_compressed_chunks(tmp_path):
    listing = list_images(make_tree(tmp_path / "data", per_class=40, size=(6, 6)))
    work = WorkArea(tmp_path / "x.h5")
    work.start({"k": 1})
    layout = chunks.default_layout((2, 2, 8), "float16")
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((80, 2, 2, 8)).astype(np.float32)
    writer = PartWriter(work, listing, 5, layout, threads=3)
    writer.start()
    for s in range(0, 80, 8):  # ten batches; the last row of each rejected
        writer.put((np.arange(s, s + 7), feats[s : s + 7], np.array([s + 7]), ["empty file (0 bytes)"], [""]))
    writer.close()
    assert writer.written == 80 and len(work.parts()) == 10 and work.next_seq() == 15
    assert work.done_indices(listing).tolist() == list(range(80))
    for part in work.index(listing):
        got = WorkArea.features(part)
        assert isinstance(got, chunks.Packed) and got.layout == layout
        np.testing.assert_array_equal(got.array(), feats[part.indices].astype(np.float16))  # stored as float16, by the writer threads


def test_a_write_error_reaches_the_loop(tmp_path):
    listing = list_images(make_tree(tmp_path / "data", per_class=2, size=(6, 6)))
    work = WorkArea(tmp_path / "x.h5")  # never started: its folder does not exist
    writer = PartWriter(work, listing, 0, chunks.default_layout((1, 1, 4), "float16"), threads=2)
    writer.start()
    writer.put((np.array([0]), np.zeros((1, 1, 1, 4), np.float32), np.zeros(0, np.int64), [], []))
    with pytest.raises(Exception, match="x.h5.partial"):
        writer.close()


def test_prefetch_depth_scales_with_threads_and_batch():
    assert prefetch_depth(32, 1) == 2 and prefetch_depth(32, 16) == 2
    assert prefetch_depth(32, 64) == 8 and prefetch_depth(8, 16) == 8
    assert prefetch_depth(512, 16) == 2
