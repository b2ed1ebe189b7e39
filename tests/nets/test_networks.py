"""The networks: the fine-tuning network split at --unfreeze-from, builders that take fields, seeded starts, and preprocessing equal to the backbone's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.nets import finetune
from pipeline.nets.networks import (
    VGG16_LAYERS,
    apply_layers,
    augmentation_layers,
    build_scratch_network,
    find_layer,
    frozen_count,
    preprocess_layers,
)

FIELDS = dict(input_size=32, head="dense", pool="avg", dense=4, dropout=0.1, seed=0)


def build_finetune_network(n_classes, *, precision="float32", **fields):
    """The finetune stage's network of these fields (seeded random weights)."""
    return finetune.build_network(finetune.FinetuneConfig(Path("d"), weights="none", **fields), n_classes, precision)


def test_preprocessing_layers_equal_backbone_preprocess():
    import keras

    from pipeline.backbones.network import preprocess

    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    inp = keras.Input((8, 8, 3), dtype="float32")
    model = keras.Model(inp, apply_layers(preprocess_layers(), inp))
    assert np.array_equal(model.predict(pixels.astype(np.float32), verbose=0), preprocess(pixels).numpy())


def test_augmentation_is_inactive_at_inference():
    x = np.random.default_rng(1).uniform(0, 255, size=(2, 16, 16, 3)).astype(np.float32)
    assert np.array_equal(np.asarray(apply_layers(augmentation_layers(0), x, training=False)), x)


@pytest.mark.parametrize("unfreeze_from, cut, phases", [("none", 18, ["head"]), ("all", 0, ["head", "finetune"]), ("block4_conv1", 10, ["head", "finetune"])])
def test_finetune_builder_splits_vgg16_at_the_layer(unfreeze_from, cut, phases):
    net = build_finetune_network(3, unfreeze_from=unfreeze_from, **FIELDS)
    assert net.cut == cut == frozen_count(unfreeze_from)
    assert [name for name, _ in net.phases] == phases
    prefix_layers = {l.name for l in net.prefix.layers}
    top_layers = {l.name for l in net.top.layers}
    assert set(VGG16_LAYERS[:cut]) <= prefix_layers and not set(VGG16_LAYERS[cut:]) & prefix_layers
    assert set(VGG16_LAYERS[cut:]) <= top_layers and {"head_avg", "head_dense", "predictions"} <= top_layers
    if len(phases) == 2:
        assert [l.name for l in net.phases[1][1]][: 18 - cut] == list(VGG16_LAYERS[cut:])
    assert tuple(net.full.inputs[0].shape) == (None, 32, 32, 3) and net.full.inputs[0].dtype == "uint8"
    assert tuple(net.full.outputs[0].shape) == (None, 3)
    assert not net.prefix.trainable


def test_finetune_builder_is_seeded():
    a = build_finetune_network(2, unfreeze_from="block5_conv1", **FIELDS)
    b = build_finetune_network(2, unfreeze_from="block5_conv1", **FIELDS)
    c = build_finetune_network(2, unfreeze_from="block5_conv1", **dict(FIELDS, seed=1))
    for name in ("block1_conv1", "block5_conv3", "head_dense", "predictions"):
        assert np.array_equal(find_layer(a.full, name).get_weights()[0], find_layer(b.full, name).get_weights()[0]), name
    assert not np.array_equal(find_layer(a.full, "head_dense").get_weights()[0], find_layer(c.full, "head_dense").get_weights()[0])


def test_scratch_builder_takes_its_fields():
    net = build_scratch_network(2, input_size=16, filters=(4, 8), dense=5, dropout=0.0, precision="float32", seed=3)
    assert net.prefix is None and [name for name, _ in net.phases] == ["train"]
    assert find_layer(net.full, "block2_conv").filters == 8 and find_layer(net.full, "dense").units == 5
    with pytest.raises(ValueError, match="no layer 'block3_conv'"):
        find_layer(net.full, "block3_conv")
    pixels = np.zeros((3, 16, 16, 3), np.uint8)
    probs = net.full.predict(pixels, verbose=0)
    assert probs.shape == (3, 2) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_frozen_count_refuses_unknown_layers():
    assert frozen_count("block5_pool") == 17
    with pytest.raises(ValueError):
        frozen_count("block9_conv1")


def test_random_weights_are_extract_s_one_network_whatever_the_seed(tmp_path):
    """Sixteenth pass: with --weights none, finetune --seed 1 built its frozen base from seed 1, extract from seed 0, under one feature
    spec: a probe fitted at seed 1 scored 0.100 on the test file (0.567 on its own features), in compare's probe row and in evaluate."""
    from conftest import make_tree
    from pipeline import extract_features
    from pipeline.backbones.weights import resolve_weights
    from pipeline.images.decode import load_image
    from pipeline.nets.networks import base_features, build_base

    root = make_tree(tmp_path / "d", classes=("a", "b"), per_class=2, size=(24, 24))
    paths = sorted(root.rglob("*.png"))
    pixels = np.stack([load_image(p, 32, "bilinear") for p in paths])
    extracted = extract_features(paths, weights="none", input_size=32, precision="float32").features.astype(np.float32)
    for seed in (0, 1, 7):
        base = build_base(input_size=32, unfreeze_from="block5_conv1", precision="float32", seed=seed, weights=resolve_weights("none"))
        np.testing.assert_allclose(base_features(base, pixels, 4), extracted, rtol=2e-2, atol=2e-2 * float(np.abs(extracted).max()))
