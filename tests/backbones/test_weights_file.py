"""Weights files: the converted layout round-trips its tensors and checksum, plain Keras loads it, the first layout is still read and upgraded; wrong shapes and foreign HDF5 files are refused by name."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.backbones.registry import CONV_LAYERS, KERNEL_SHAPES
from pipeline.backbones.weights_file import (
    CONVERTED_FORMAT,
    checksum_tensors,
    keras_loadable,
    read_tensors,
    tensor_checksum,
    upgrade_converted,
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
    with h5py.File(dest, "r") as fh:  # the datasets where earlier versions of the pipeline read them
        for name in CONV_LAYERS:
            np.testing.assert_array_equal(fh[f"{name}/kernel"][()], tensors[name][0])


def write_first_layout(dest, tensors, source="test"):
    """A converted file as written before the Keras attributes (files cached on users' machines)."""
    with h5py.File(dest, "w") as fh:
        fh.attrs["format"] = CONVERTED_FORMAT
        fh.attrs["source"] = source
        fh.attrs["tensor_sha256"] = checksum_tensors(tensors)
        fh.attrs["layout"] = "/<layer>/kernel float32 HWIO, /<layer>/bias float32"
        for name in CONV_LAYERS:
            fh.create_dataset(f"{name}/kernel", data=tensors[name][0])
            fh.create_dataset(f"{name}/bias", data=tensors[name][1])


def test_plain_keras_loads_the_converted_file(tmp_path):
    import keras

    tensors = small_tensors(seed=3)
    dest = tmp_path / "w.h5"
    checksum = write_converted(dest, tensors, "test")
    model = keras.applications.VGG16(include_top=False, weights=str(dest), input_shape=(32, 32, 3))
    assert tensor_checksum(model) == checksum
    kernel, bias = model.get_layer("block4_conv2").get_weights()
    np.testing.assert_array_equal(kernel, tensors["block4_conv2"][0])
    np.testing.assert_array_equal(bias, tensors["block4_conv2"][1])


def test_the_first_layout_is_still_read(tmp_path):
    tensors = small_tensors(seed=4)
    dest = tmp_path / "old.h5"
    write_first_layout(dest, tensors)
    assert not keras_loadable(dest)
    layout, back, attrs = read_tensors(dest)
    assert layout == "converted" and attrs["format"] == CONVERTED_FORMAT
    assert checksum_tensors(back) == checksum_tensors(tensors) == attrs["tensor_sha256"]


def test_upgrade_rewrites_the_first_layout_only(tmp_path):
    import keras

    tensors = small_tensors(seed=5)
    old = tmp_path / "old.h5"
    write_first_layout(old, tensors, source="onnx")
    assert upgrade_converted(old) is True
    assert keras_loadable(old)
    layout, back, attrs = read_tensors(old)
    assert attrs == {"format": CONVERTED_FORMAT, "tensor_sha256": checksum_tensors(tensors), "source": "onnx"}
    for name in CONV_LAYERS:
        np.testing.assert_array_equal(back[name][0], tensors[name][0])
    model = keras.applications.VGG16(include_top=False, weights=str(old), input_shape=(32, 32, 3))
    assert tensor_checksum(model) == checksum_tensors(tensors)
    assert upgrade_converted(old) is False  # already current
    assert not list(tmp_path.glob(".old.h5.tmp-*"))


def test_upgrade_leaves_a_keras_file_alone(tmp_path):
    tensors = small_tensors(seed=7)
    path = tmp_path / "keras2.h5"
    with h5py.File(path, "w") as fh:  # as Keras 2 save_weights writes: <layer>/<layer>/kernel:0
        fh.attrs["layer_names"] = np.array([n.encode() for n in CONV_LAYERS])
        for name in CONV_LAYERS:
            group = fh.create_group(name)
            group.attrs["weight_names"] = np.array([f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()])
            group[f"{name}/kernel:0"], group[f"{name}/bias:0"] = tensors[name]
    before = path.read_bytes()
    assert upgrade_converted(path) is False
    assert path.read_bytes() == before
    layout, back, _attrs = read_tensors(path)
    assert layout == "keras-legacy" and checksum_tensors(back) == checksum_tensors(tensors)


def test_upgrade_refuses_a_damaged_first_layout_file(tmp_path):
    tensors = small_tensors(seed=6)
    old = tmp_path / "old.h5"
    write_first_layout(old, tensors)
    with h5py.File(old, "r+") as fh:
        fh["block3_conv2/kernel"][0, 0, 0, 0] += np.float32(1.0)
    before = old.read_bytes()
    with pytest.raises(PipelineError, match=r"old.h5 is corrupt \(tensor checksum .* is not its recorded .*delete it"):
        upgrade_converted(old)
    assert old.read_bytes() == before


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
