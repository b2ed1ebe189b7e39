"""Fine-tuning other backbones: where each is cut by default (its last block), the frozen base computing what extract computes, layer names inside a branch refused, the tf-mode preprocessing layers, and an LP-FT run with ``--backbone`` whose saved model loads and whose probe names its backbone."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import assert_recomputed_close
from pipeline.classical.bundle import load_bundle
from pipeline.core.errors import PipelineError
from pipeline.backbones.network import Backbone, preprocess
from pipeline.backbones.registry import BACKBONES
from pipeline.backbones.weights import resolve_weights
from pipeline.nets import finetune as ft
from pipeline.nets.networks import apply_layers, base_features, build_base, find_layer, preprocess_layers
from pipeline.nets.probe import check_probe, feature_spec
from test_finetune import CLASSES, colour_tree

#: The last frozen layer when fine-tuning starts at each backbone's default (its last block).
LAST_FROZEN = {"vgg16": "block4_pool", "vgg19": "block4_pool", "resnet50": "conv4_block6_out", "resnet50v2": "conv4_block6_out",
               "inception_v3": "mixed9", "mobilenetv2": "block_15_add"}  # fmt: skip


def test_each_backbone_has_a_default_unfreeze_layer_and_input_size(tmp_path):
    for name, spec in BACKBONES.items():
        config = ft.FinetuneConfig(tmp_path, backbone=name)
        assert (config.unfreeze_from, config.input_size) == (spec.unfreeze_from, spec.input_size)
    assert ft.FinetuneConfig(tmp_path).unfreeze_from == "block5_conv1"
    assert ft.FinetuneConfig(tmp_path, backbone="inception_v3").input_size == 299
    with pytest.raises(PipelineError, match=r"^--input-size 64: inception_v3 needs at least 75 pixels$"):
        ft.FinetuneConfig(tmp_path, backbone="inception_v3", input_size=64).validate()


@pytest.mark.parametrize("name", [n for n in BACKBONES if n != "vgg16"])
def test_the_default_cut_is_the_last_block_and_the_base_computes_extracts_features(name):
    size = BACKBONES[name].min_size
    base = build_base(input_size=size, unfreeze_from=BACKBONES[name].unfreeze_from, precision="float32", seed=0, backbone=name)
    assert base.cut_layer == LAST_FROZEN[name] and base.prefix.trainable is False
    assert sum(int(np.prod(w.shape)) for l in base.suffix for w in l.trainable_weights) > 0
    pixels = np.random.default_rng(1).integers(0, 256, (3, size, size, 3)).astype(np.uint8)
    reference = Backbone(size, resolve_weights("none", backbone=name), "float32")(pixels)
    assert_recomputed_close(base_features(base, pixels, 2), reference)


def test_layers_inside_a_branch_and_unknown_layers_are_refused():
    with pytest.raises(PipelineError, match=r"^--unfreeze-from conv5_block1_2_conv: resnet50 branches there: .*; choose none, all, a layer of keras\.applications\.ResNet50 where the network can be cut \(e\.g\. its default conv5_block1_1_conv\)$"):
        build_base(input_size=32, unfreeze_from="conv5_block1_2_conv", precision="float32", seed=0, backbone="resnet50")
    with pytest.raises(PipelineError, match=r"^--unfreeze-from block5_conv1: not a layer of resnet50; "):
        build_base(input_size=32, unfreeze_from="block5_conv1", precision="float32", seed=0, backbone="resnet50")
    # a block boundary further down is accepted, and InceptionV3 takes its blocks by name
    assert build_base(input_size=32, unfreeze_from="conv4_block1_1_conv", precision="float32", seed=0, backbone="resnet50").cut_layer == "conv3_block4_out"
    assert build_base(input_size=75, unfreeze_from="mixed8", precision="float32", seed=0, backbone="inception_v3").cut_layer == "mixed7"


def test_tf_mode_preprocessing_layers_match_preprocess_input():
    """Rescaling multiplies by 1/127.5 where Keras divides by 127.5: equal within one float32 rounding."""
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    inp = keras.Input((16, 16, 3), dtype="float32")
    model = keras.Model(inp, apply_layers(preprocess_layers("resnet50v2"), inp))
    got = np.asarray(model(pixels.astype(np.float32)))
    np.testing.assert_allclose(got, np.asarray(preprocess(pixels, "resnet50v2")), rtol=0, atol=1.2e-7)
    assert got.min() == -1.0 and got.max() == pytest.approx(1.0)


def test_lp_ft_with_another_backbone_saves_a_model_and_a_probe_of_it(tmp_path):
    data = colour_tree(tmp_path / "data", per_class=6)
    config = ft.FinetuneConfig(data, backbone="mobilenetv2", out_dir=tmp_path / "out", input_size=32, weights="none", epochs=1,
                               batch_size=8, cache_copies=2, precision="float32", quiet=True)  # fmt: skip
    result = ft.fit(config)
    m = result.metrics
    assert m["backbone"] == "mobilenetv2" and m["unfreeze_from"] == "block_16_expand" and m["mode"] == "cached-prefix"
    assert m["cache_layer"] == "block_15_add" and m["probe"]["file"].endswith("finetune.probe.joblib")
    bundle = load_bundle(Path(m["probe"]["file"]))
    assert bundle["feature_spec"]["backbone"] == "mobilenetv2" and bundle["feature_spec"]["feature_shape"] == [1, 1, 1280]
    saved = keras.saving.load_model(tmp_path / "out" / "finetune.keras")
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    np.testing.assert_allclose(saved.predict(x, verbose=0), result.net.full.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert find_layer(saved, "block_16_expand") is not None
    # the probe of one backbone is refused by a fine-tuning of another, naming the field and the flag
    spec = feature_spec(input_size=32, resize="bilinear", weights=resolve_weights("none"), pool="flatten")
    with pytest.raises(PipelineError, match=r"--probe .*finetune\.probe\.joblib: its backbone is 'mobilenetv2' but this fine-tuning computes 'vgg16' \(--backbone vgg16\); "):
        check_probe(Path(m["probe"]["file"]), bundle, spec, CLASSES)
