"""The CIFAR ResNet builder: depth 6n+2 with parameter-free shortcuts, three stages at 16/32/64 filters, seeded, saved and loaded by plain Keras; its step schedule drops at the set fractions."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.nets.resnet import DROP_AT, DROP_FACTOR, MOMENTUM, STAGE_FILTERS, blocks_per_stage, build_resnet_network, sgd, step_schedule


@pytest.mark.parametrize("depth", [8, 20])
def test_depth_counts_the_weighted_layers(depth):
    import keras

    net = build_resnet_network(3, input_size=32, depth=depth, precision="float32", seed=0)
    layers = net.top.layers
    convs = [l for l in layers if isinstance(l, keras.layers.Conv2D)]
    dense = [l for l in layers if isinstance(l, keras.layers.Dense)]
    assert len(convs) + len(dense) == depth  # the paper counts conv and fully connected layers; shortcuts add none
    assert all(l.kernel_size == (3, 3) for l in convs)
    n = (depth - 2) // 6
    per_stage = [[l for l in convs if l.name.startswith(f"stage{k}_")] for k in (1, 2, 3)]
    assert [len(s) for s in per_stage] == [2 * n] * 3
    assert [s[0].filters for s in per_stage] == list(STAGE_FILTERS)
    assert sum(isinstance(l, keras.layers.BatchNormalization) for l in layers) == depth - 1
    assert sum(isinstance(l, keras.layers.Add) for l in layers) == 3 * n
    gap = net.top.get_layer("gap")
    assert tuple(gap.input.shape) == (None, 32 // 4, 32 // 4, STAGE_FILTERS[-1])
    assert tuple(net.full.inputs[0].shape) == (None, 32, 32, 3) and net.full.inputs[0].dtype == "uint8"
    assert tuple(net.full.outputs[0].shape) == (None, 3) and net.phases[0][0] == "train"


def test_zero_padded_shortcut_passes_the_subsampled_input():
    import keras

    net = build_resnet_network(2, input_size=8, depth=8, precision="float32", seed=0)
    block_in = net.top.get_layer("stage2_block1_subsample").input
    pad = net.top.get_layer("stage2_block1_pad_channels").output
    probe = keras.Model(net.top.inputs, [block_in, pad])
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    before, after = probe.predict(x, verbose=0)
    np.testing.assert_array_equal(after[..., : before.shape[-1]], before[:, ::2, ::2, :])
    assert not after[..., before.shape[-1] :].any()


def test_builder_is_seeded_and_plain_keras_loads_the_model(tmp_path):
    import keras

    a = build_resnet_network(4, input_size=16, depth=8, precision="float32", seed=3)
    b = build_resnet_network(4, input_size=16, depth=8, precision="float32", seed=3)
    c = build_resnet_network(4, input_size=16, depth=8, precision="float32", seed=4)
    for wa, wb in zip(a.full.get_weights(), b.full.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(a.top.get_layer("stem_conv").get_weights()[0], c.top.get_layer("stem_conv").get_weights()[0])
    pixels = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    a.full.save(tmp_path / "m.keras")
    back = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(back.predict(pixels, verbose=0), a.full.predict(pixels, verbose=0))


@pytest.mark.parametrize("depth", [7, 21, 2, 0])
def test_depth_must_be_6n_plus_2(depth):
    with pytest.raises(PipelineError, match=rf"^--depth {depth}: a CIFAR ResNet has 6n\+2 layers"):
        blocks_per_stage(depth)


def test_input_too_small_is_refused():
    with pytest.raises(PipelineError, match=r"^--input-size 3: a CIFAR ResNet halves the image twice"):
        build_resnet_network(2, input_size=3, depth=8, precision="float32", seed=0)


def test_step_schedule_drops_at_the_fractions():
    epochs, steps = 8, 5
    schedule = step_schedule(0.1, epochs, steps)
    drops = [int(f * epochs) * steps for f in DROP_AT]  # the first step of each drop epoch
    assert float(schedule(0)) == pytest.approx(0.1)
    assert float(schedule(drops[0] - 1)) == pytest.approx(0.1)
    assert float(schedule(drops[0])) == pytest.approx(0.1 / DROP_FACTOR)
    assert float(schedule(drops[1])) == pytest.approx(0.1 / DROP_FACTOR**2)
    assert float(schedule(epochs * steps)) == pytest.approx(0.1 / DROP_FACTOR**2)
    opt = sgd(0.1, epochs, steps)
    assert float(opt.momentum) == MOMENTUM


def test_one_epoch_has_no_drop():
    assert step_schedule(0.05, 1, 10) == 0.05
