"""Every backbone of the registry: feature shapes against the built Keras model, our preprocessing against ``load_img`` + ``img_to_array`` + the family's ``preprocess_input``, features against a direct model call, GMACs counted from the layers, and the weights of the backbones without the offline route (Keras cache, download, file, one-line errors)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from conftest import assert_recomputed_close, make_tree
from pipeline.core.errors import PipelineError
from pipeline.backbones import network as bb
from pipeline.backbones.network import Backbone, count_macs, preprocess
from pipeline.backbones.registry import BACKBONES, feature_shape
from pipeline.images.listing import list_images
from pipeline.images.decode import load_image
from pipeline.backbones.weights import file_checksum, load_weights, resolve_weights

#: The smallest input each backbone builds at (tiny inputs keep the tests fast).
SMALL = {name: spec.min_size for name, spec in BACKBONES.items()}


def test_the_registry_lists_the_backbones_of_the_issue():
    assert list(BACKBONES) == ["vgg16", "vgg19", "resnet50", "resnet50v2", "inception_v3", "mobilenetv2"]
    assert {s.mode for s in BACKBONES.values()} == {"caffe", "tf"}
    assert BACKBONES["inception_v3"].input_size == 299 and all(s.input_size == 224 for n, s in BACKBONES.items() if n != "inception_v3")
    assert feature_shape(224, "resnet50") == (7, 7, 2048) and feature_shape(299, "inception_v3") == (8, 8, 2048)
    assert feature_shape(224) == (7, 7, 512)  # VGG16, the default


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("bb") / "d", classes=("a", "b"), per_class=2, size=(40, 30))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_preprocessing_features_and_shapes_equal_keras(name, tree):
    """Our uint8 pixels -> ``preprocess`` equal ``load_img`` + ``img_to_array`` + ``keras.applications.<family>.preprocess_input``
    bit for bit, and ``Backbone`` gives what the Keras model gives on Keras's own preprocessing."""
    import keras

    spec = BACKBONES[name]
    size = SMALL[name]
    listing = list_images(tree)
    paths = [tree / p for p in listing.paths]
    pixels = np.stack([load_image(p, size, "bilinear") for p in paths])
    family = importlib.import_module(f"keras.applications.{spec.family}")
    theirs = np.stack(
        [family.preprocess_input(keras.utils.img_to_array(keras.utils.load_img(p, target_size=(size, size), interpolation="bilinear"))) for p in paths]
    )
    ours = np.asarray(preprocess(pixels, name))
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)

    net = Backbone(size, resolve_weights("none", backbone=name), "float32", batch_size=3)
    got = net(pixels)
    assert got.shape == (len(paths), *feature_shape(size, name)) == (len(paths), *net.model.output.shape[1:])
    assert net.model.layers[-1].name == spec.layer
    assert_recomputed_close(got, np.asarray(net.model(theirs, training=False)))
    assert np.abs(got).max() > 0


@pytest.mark.parametrize("name", [n for n in BACKBONES if n != "vgg16"])
def test_feature_shape_follows_the_model_at_odd_sizes(name):
    """The shape is computed without building the network (verify, contract checks); here it is checked against it."""
    size = SMALL[name] + 21  # an odd side: floor and ceil roundings differ
    model = bb.build(name, size)
    assert tuple(model.output.shape[1:]) == feature_shape(size, name)


def test_macs_are_counted_from_the_layers():
    """VGG16 at 224: 15.35 GMACs (the published 15.5 G-ops include the classifier); the count follows the input area."""
    m224, m112 = count_macs(bb.build("vgg16", 224)), count_macs(bb.build("vgg16", 112))
    conv = sum(3 * 3 * cin * cout for cin, cout in [(3, 64), (64, 64)]) * 224 * 224  # block1 by hand
    assert conv < m224 and m224 == 4 * m112
    assert 15.3e9 < m224 < 15.4e9
    assert count_macs(bb.build("mobilenetv2", 224)) < count_macs(bb.build("resnet50", 224)) < m224


# --------------------------------------------------------------------------- weights of the other backbones


def test_no_cached_file_and_no_network_is_one_line_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(PipelineError) as err:
        resolve_weights("imagenet", backbone="resnet50", allow_download=False, progress=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "keras" / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5") in msg
    assert "--weights PATH" in msg and "keras.applications.ResNet50(include_top=False)" in msg


def test_a_failed_download_is_one_line_too(tmp_path, monkeypatch):
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/x -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(PipelineError, match=r"^no ImageNet inception_v3 weights: Keras expects .*inception_v3_weights_tf_dim_ordering_tf_kernels_notop\.h5 in its cache and could not download it \(\[Errno -3\] Temporary failure in name resolution\); .*--weights PATH") as err:
        resolve_weights("imagenet", backbone="inception_v3", progress=False)
    assert "\n" not in str(err.value)


def _legacy_h5(model, path):
    """``model``'s weights in the layout of Keras's own ``_notop.h5`` files (what ``keras.utils.get_file`` caches)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


def test_the_keras_cache_file_is_used_and_loads(tmp_path, monkeypatch):
    """MobileNetV2 (Keras checks no md5 for it): a file in the Keras cache is the ImageNet weights, loaded as Keras loads it."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    source = bb.build("mobilenetv2", 32, seed=7)
    cached = _legacy_h5(source, tmp_path / "keras" / "models" / BACKBONES["mobilenetv2"].weights_file)
    info = resolve_weights("imagenet", backbone="mobilenetv2", allow_download=False, progress=False)
    assert (info.name, info.source, info.path, info.backbone) == ("imagenet", "keras-cache", str(cached), "mobilenetv2")
    assert info.checksum == file_checksum(cached) and len(info.checksum) == 64
    target = bb.build("mobilenetv2", 32, seed=0)
    assert load_weights(target, info) == info.checksum
    for a, b in zip(target.weights, source.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_cached_file_with_the_wrong_md5_is_not_used(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    _legacy_h5(bb.build("resnet50", 32), tmp_path / "keras" / "models" / BACKBONES["resnet50"].weights_file)
    with pytest.raises(PipelineError, match=r"no ImageNet resnet50 weights"):
        resolve_weights("imagenet", backbone="resnet50", allow_download=False, progress=True)
    assert "md5 is not Keras's 4d473c1dd8becc155b73f8504c6f6626" in capsys.readouterr().err


def test_a_weights_file_for_the_backbone_loads_and_another_is_refused(tmp_path):
    source = bb.build("resnet50", 32, seed=3)
    path = tmp_path / "r.weights.h5"
    source.save_weights(path)
    info = resolve_weights(str(path), backbone="resnet50", progress=False)
    assert (info.name, info.source, info.backbone) == ("file", "explicit-file", "resnet50")
    net = Backbone(32, info, "float32")
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    assert_recomputed_close(net(x), np.asarray(source(preprocess(x, "resnet50"), training=False)))
    assert net.weights_checksum == info.checksum
    wrong = resolve_weights(str(path), backbone="mobilenetv2", progress=False)
    with pytest.raises(PipelineError, match=r"^weights file .*r\.weights\.h5 does not load into the mobilenetv2 base: [^\n]*$"):
        Backbone(32, wrong, "float32")


def test_a_weights_file_changed_after_resolving_is_refused(tmp_path):
    path = tmp_path / "r.weights.h5"
    bb.build("mobilenetv2", 32, seed=1).save_weights(path)
    info = resolve_weights(str(path), backbone="mobilenetv2", progress=False)
    bb.build("mobilenetv2", 32, seed=2).save_weights(path)
    with pytest.raises(PipelineError, match=r"r\.weights\.h5 changed since it was resolved"):
        load_weights(bb.build("mobilenetv2", 32), info)


def test_an_unknown_backbone_is_one_line():
    with pytest.raises(PipelineError, match=r"^backbone 'alexnet' is not one of vgg16, vgg19, resnet50, resnet50v2, inception_v3, mobilenetv2$"):
        resolve_weights("none", backbone="alexnet")
