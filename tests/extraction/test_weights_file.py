"""Weights files: the converted layout round-trips its tensors and checksum; wrong shapes and foreign HDF5 files are refused by name."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.extraction.weights_file import (
    CONV_LAYERS,
    CONVERTED_FORMAT,
    KERNEL_SHAPES,
    checksum_tensors,
    read_tensors,
    write_converted,
)


def small_tensors(seed=0, scale=1.0):
    """Tensors of the right shapes with few distinct values (the real ones are 58 MB; only shapes matter here)."""
    rng = np.random.default_rng(seed)
    return {
        name: (np.full(shape, rng.standard_normal() * scale, np.float32), np.full(shape[3], rng.standard_normal(), np.float32))
        for name, shape in KERNEL_SHAPES.items()
    }


def test_layer_table():
    assert len(CONV_LAYERS) == 13 and list(KERNEL_SHAPES) == list(CONV_LAYERS)
    assert KERNEL_SHAPES["block1_conv1"] == (3, 3, 3, 64) and KERNEL_SHAPES["block5_conv3"] == (3, 3, 512, 512)


def test_converted_file_round_trip(tmp_path):
    tensors = small_tensors()
    dest = tmp_path / "w.h5"
    checksum = write_converted(dest, tensors, "test")
    assert checksum == checksum_tensors(tensors) != checksum_tensors(small_tensors(seed=1))
    layout, back, attrs = read_tensors(dest)
    assert layout == "converted" and attrs == {"format": CONVERTED_FORMAT, "tensor_sha256": checksum, "source": "test"}
    for name in CONV_LAYERS:
        np.testing.assert_array_equal(back[name][0], tensors[name][0])
        np.testing.assert_array_equal(back[name][1], tensors[name][1])
    assert checksum_tensors(back) == checksum
    assert not list(tmp_path.glob(".w.h5.tmp-*"))


def test_a_wrong_shape_is_refused_by_layer(tmp_path):
    dest = tmp_path / "w.h5"
    write_converted(dest, small_tensors(), "test")
    with h5py.File(dest, "r+") as fh:
        del fh["block2_conv1/bias"]
        fh["block2_conv1/bias"] = np.zeros(64, np.float32)
    with pytest.raises(PipelineError, match=r"w.h5: layer block2_conv1 has kernel \(3, 3, 64, 128\) and bias \(64,\), but the VGG16 conv base needs \(3, 3, 64, 128\) and \(128,\)"):
        read_tensors(dest)


def test_foreign_files_are_refused(tmp_path):
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(PipelineError, match=r"text.h5 is not a readable HDF5 file"):
        read_tensors(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as fh:
        fh["x"] = np.zeros(3)
    with pytest.raises(PipelineError, match=r"holds no Keras layer weights"):
        read_tensors(tmp_path / "other.h5")
