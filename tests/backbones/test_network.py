"""Backbone: feature shapes, every precision close to float32 on the real weights, batch-size independence."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_tree
from pipeline.backbones.network import Backbone, resolve_precision
from pipeline.backbones.registry import feature_shape
from pipeline.images.listing import list_images
from pipeline.images.decode import load_image
from pipeline.backbones.weights import resolve_weights


@pytest.mark.parametrize("size, shape", [(32, (1, 1, 512)), (64, (2, 2, 512)), (224, (7, 7, 512)), (100, (3, 3, 512))])
def test_feature_shape(size, shape):
    assert feature_shape(size) == shape


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    root = make_tree(tmp_path_factory.mktemp("imgs") / "d", classes=("a", "b"), per_class=3, size=(40, 30))
    listing = list_images(root)
    return np.stack([load_image(root / p, 64, "bilinear") for p in listing.paths])


@pytest.fixture(scope="module")
def reference(pixels):
    return Backbone(64, resolve_weights("imagenet", allow_download=False, progress=False), "float32", batch_size=4)(pixels)


@pytest.mark.weights
@pytest.mark.parametrize("precision, tolerance", [("bfloat16", 0.05), ("float16", 0.01)])
def test_each_precision_is_close_to_float32(pixels, reference, precision, tolerance):
    """Relative L2 error per image: bfloat16 keeps 8 mantissa bits, float16 11."""
    net = Backbone(64, resolve_weights("imagenet", allow_download=False, progress=False), precision, batch_size=4)
    got = net(pixels)
    assert got.dtype == np.float32 and got.shape == reference.shape
    err = np.linalg.norm((got - reference).reshape(len(got), -1), axis=1) / np.linalg.norm(reference.reshape(len(got), -1), axis=1)
    assert err.max() < tolerance, err
    assert err.max() > 0, "a lower precision that gives bit-identical features did not run at that precision"


@pytest.mark.weights
def test_results_do_not_depend_on_batch_size(pixels, reference):
    net = Backbone(64, resolve_weights("imagenet", allow_download=False, progress=False), "float32", batch_size=5)
    np.testing.assert_allclose(net(pixels), reference, rtol=1e-5, atol=1e-4)


def test_auto_precision_is_a_concrete_one():
    assert resolve_precision("auto") in ("float32", "bfloat16", "float16")
    assert resolve_precision("float32") == "float32"


@pytest.mark.parametrize(
    "flags, expected",
    [("fma avx2", "float32"), ("avx512f avx512bw", "float32"), ("avx512f avx512_bf16", "bfloat16"), ("amx_tile amx_bf16", "bfloat16"), ("", "float32")],
    ids=["avx2", "avx512-no-bf16", "avx512-bf16", "amx", "none"],
)
def test_auto_precision_follows_the_cpu_with_and_without_bfloat16(monkeypatch, flags, expected):
    """The same test on every CPU: the flags are given, not read from this machine."""
    import tensorflow as tf

    monkeypatch.setenv("PIPELINE_CPU_FLAGS", flags)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert resolve_precision("auto") == expected
    assert resolve_precision("bfloat16") == "bfloat16"  # an explicit choice is never changed


def test_auto_precision_is_float16_on_a_gpu(monkeypatch):
    import tensorflow as tf

    monkeypatch.setenv("PIPELINE_CPU_FLAGS", "avx512_bf16")
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert resolve_precision("auto") == "float16"


@pytest.mark.parametrize("flags, expected", [("avx2", "float32"), ("avx512_bf16", "bfloat16")])
def test_resolved_precision_is_recorded_in_the_file(tmp_path, monkeypatch, flags, expected):
    import h5py

    from pipeline.cli import main

    monkeypatch.setenv("PIPELINE_CPU_FLAGS", flags)
    data = make_tree(tmp_path / "data", per_class=2)
    out = tmp_path / "x.h5"
    assert main(["extract", str(data), "-o", str(out), "--weights", "none", "--input-size", "32", "--quiet", "--precision", "auto"]) == 0
    with h5py.File(out, "r") as db:
        assert db.attrs["precision"] == expected
        assert expected in db.attrs["fingerprint"]
