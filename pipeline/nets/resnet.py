"""The CIFAR ResNet family trained from scratch (He et al. 2016, section 4.2): the network builder and its step learning-rate schedule.

Depth 6n+2: a 3x3 conv of 16 filters, then three stages of n residual blocks at 16, 32 and
64 filters (the first block of stages 2 and 3 halves the feature map with stride 2), global
average pooling and a softmax Dense. Each block is conv3x3 -> BN -> ReLU -> conv3x3 -> BN,
added to its shortcut, then ReLU. Shortcuts are the identity; where the shape changes they
are the paper's option A (parameter-free): the input subsampled by 2 and padded with zero
channels, built from stock layers (a 1x1 pooling of stride 2, and its copy multiplied by 0
concatenated), so the saved model loads with plain ``keras.saving.load_model``. Weight
decay is an L2 penalty on every kernel (the paper's 1e-4 in gradient terms, through the
momentum as in the paper).
"""

from __future__ import annotations

from pipeline.core.errors import PipelineError
from pipeline.backbones.network import POLICIES
from pipeline.nets.networks import Network

#: Filters of the three stages (the paper's CIFAR networks).
STAGE_FILTERS = (16, 32, 64)
#: The learning rate is divided by DROP_FACTOR at these fractions of the epochs (the paper:
#: 32k and 48k of 64k iterations).
DROP_AT = (0.5, 0.75)
DROP_FACTOR = 10.0
MOMENTUM = 0.9
#: Batch normalisation's moving-average momentum: 0.9, not Keras's 0.99, as for the small CNN:
#: with a thousand images an epoch has few steps, and 0.99 leaves the moving statistics (used
#: for validation and prediction) far from the batch ones for the first epochs.
BN_MOMENTUM = 0.9
#: The paper's weight decay (gradient += WEIGHT_DECAY * w); Keras's L2(c) adds 2c * w.
WEIGHT_DECAY = 1e-4


def blocks_per_stage(depth: int) -> int:
    """n of a depth-(6n+2) CIFAR ResNet.

    Raises:
        PipelineError: ``depth`` is not 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...).
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise PipelineError(f"--depth {depth}: a CIFAR ResNet has 6n+2 layers (8, 14, 20, 32, 44, 56, 110, ...)")
    return (depth - 2) // 6


def step_schedule(lr: float, epochs: int, steps_per_epoch: int):
    """The step schedule: ``lr``, divided by DROP_FACTOR from epoch ``int(f * epochs)`` (0-based) on, for each f of DROP_AT.

    Returns:
        A ``keras.optimizers.schedules.PiecewiseConstantDecay`` over optimizer steps, or the
        float ``lr`` when no drop falls inside the run (fewer than two epochs).
    """
    import keras

    boundaries, values = [], [float(lr)]
    for frac in DROP_AT:
        epoch = int(frac * epochs)
        if 1 <= epoch < epochs and (not boundaries or epoch * steps_per_epoch - 1 > boundaries[-1]):
            boundaries.append(epoch * steps_per_epoch - 1)  # the schedule's value changes after this step
            values.append(values[-1] / DROP_FACTOR)
    if not boundaries:
        return float(lr)
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def sgd(lr: float, epochs: int, steps_per_epoch: int):
    """SGD with momentum MOMENTUM over ``step_schedule`` (the paper's optimizer)."""
    import keras

    return keras.optimizers.SGD(learning_rate=step_schedule(lr, epochs, steps_per_epoch), momentum=MOMENTUM)


def _block(x, filters: int, stride: int, name: str, *, policy, seed: int, l2):
    import keras

    def conv(y, stride_, suffix, k):
        return keras.layers.Conv2D(filters, 3, strides=stride_, padding="same", use_bias=False, kernel_regularizer=l2,
                                   kernel_initializer=keras.initializers.HeNormal(seed=seed + k), dtype=policy, name=f"{name}_{suffix}")(y)  # fmt: skip

    y = conv(x, stride, "conv1", 0)
    y = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, dtype=policy, name=f"{name}_bn1")(y)
    y = keras.layers.Activation("relu", dtype=policy, name=f"{name}_relu1")(y)
    y = conv(y, 1, "conv2", 1)
    y = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, dtype=policy, name=f"{name}_bn2")(y)
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:  # option A: subsample, pad with zero channels
        if filters != 2 * x.shape[-1]:
            raise ValueError(f"option-A shortcut doubles the channels, not {x.shape[-1]} -> {filters}")
        sub = keras.layers.MaxPooling2D(pool_size=1, strides=stride, dtype=policy, name=f"{name}_subsample")(x)
        zeros = keras.layers.Rescaling(0.0, dtype=policy, name=f"{name}_zero_channels")(sub)
        shortcut = keras.layers.Concatenate(dtype=policy, name=f"{name}_pad_channels")([sub, zeros])
    y = keras.layers.Add(dtype=policy, name=f"{name}_add")([y, shortcut])
    return keras.layers.Activation("relu", dtype=policy, name=f"{name}_out")(y)


def build_resnet_network(n_classes: int, *, input_size: int, depth: int, precision: str, seed: int) -> Network:
    """A CIFAR ResNet of ``depth`` layers with seeded initialisers (He normal, as the paper).

    Args:
        n_classes: outputs of the softmax layer.
        input_size: square side of the input images (at least 4: two stride-2 stages).
        depth: 6n+2 (20 is ResNet-20: 0.27M parameters).
        precision: a resolved precision (``float32``, ``bfloat16``, ``float16``).
        seed: seeds Keras and every initialiser.

    Returns:
        Network: ``full`` takes uint8 RGB pixels and returns class probabilities; no prefix;
        one phase ``train`` with every layer of ``top``.

    Raises:
        PipelineError: ``depth`` is not 6n+2, or ``input_size`` is below 4.
    """
    import keras

    n = blocks_per_stage(depth)
    if input_size < 4:
        raise PipelineError(f"--input-size {input_size}: a CIFAR ResNet halves the image twice and needs at least 4 pixels")
    policy = POLICIES[precision]
    keras.utils.set_random_seed(seed)
    l2 = keras.regularizers.L2(WEIGHT_DECAY / 2)
    s = input_size
    body_in = keras.Input((s, s, 3), dtype="float32", name="rgb_0_255")
    x = keras.layers.Rescaling(1.0 / 255, dtype=policy, name="scale_0_1")(body_in)
    x = keras.layers.Conv2D(STAGE_FILTERS[0], 3, padding="same", use_bias=False, kernel_regularizer=l2,
                            kernel_initializer=keras.initializers.HeNormal(seed=seed), dtype=policy, name="stem_conv")(x)  # fmt: skip
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, dtype=policy, name="stem_bn")(x)
    x = keras.layers.Activation("relu", dtype=policy, name="stem_relu")(x)
    k = 1
    for stage, filters in enumerate(STAGE_FILTERS, start=1):
        for block in range(1, n + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            x = _block(x, filters, stride, f"stage{stage}_block{block}", policy=policy, seed=seed + 10 * k, l2=l2)
            k += 1
    x = keras.layers.GlobalAveragePooling2D(dtype=policy, name="gap")(x)
    out = keras.layers.Dense(n_classes, activation="softmax", kernel_regularizer=l2,
                             kernel_initializer=keras.initializers.HeNormal(seed=seed + 10 * k), dtype="float32", name="predictions")(x)  # fmt: skip
    top = keras.Model(body_in, out, name=f"resnet{depth}")
    pixels = keras.Input((s, s, 3), dtype="uint8", name="pixels")
    full = keras.Model(pixels, top(keras.layers.Rescaling(1.0, dtype="float32", name="to_float")(pixels)), name=f"scratch_resnet{depth}")
    return Network(full, None, top, [("train", [layer for layer in top.layers if not isinstance(layer, keras.layers.InputLayer)])])
