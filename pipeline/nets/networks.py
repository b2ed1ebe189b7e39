"""The Keras networks of the nets stages: VGG16 split at a layer plus a head (the LP-FT probe or a dense head from random), the from-scratch CNN, and the preprocessing and augmentation layers they share.

The fine-tuning network is three nested Keras models that share their layers::

    full   = pixels uint8 -> to_float -> frozen_prefix(training=False) -> trainable_top
    prefix = float RGB 0..255 -> VGG16 preprocessing -> VGG16 layers before ``unfreeze_from``
    top    = prefix output -> VGG16 layers from ``unfreeze_from`` on -> head
    head   = probe: pooling -> the probe's row scaling -> softmax Dense (its coefficients)
           | dense: pooling -> Dense(relu) -> Dropout -> softmax Dense (from random)

so training ``top`` trains ``full``. ``full`` is what the stages save: uint8 RGB pixels in,
class probabilities out, loadable with ``keras.saving.load_model`` and no custom objects
(the preprocessing is built from stock layers; see ``preprocess_layers``).

The builders take fields, not configs (as ``keras.applications.VGG16`` does), and are
deterministic for a given seed, so tests can rebuild a run's starting point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.extraction.backbone import BGR_MEANS, POLICIES, build_vgg16

#: Every layer of the headless VGG16, in order (``--unfreeze-from`` takes any of them).
VGG16_LAYERS: tuple[str, ...] = (
    "block1_conv1", "block1_conv2", "block1_pool",
    "block2_conv1", "block2_conv2", "block2_pool",
    "block3_conv1", "block3_conv2", "block3_conv3", "block3_pool",
    "block4_conv1", "block4_conv2", "block4_conv3", "block4_pool",
    "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool",
)  # fmt: skip
#: ``none``: frozen base, head only (phase 1 only); ``all``: every VGG16 layer trains in phase 2.
UNFREEZE_SPECIAL = ("none", "all")
#: ``probe``: LP-FT, the fitted logistic-regression probe as the head; ``dense``: the classic head from random.
HEADS = ("probe", "dense")
#: Augmentation applied to training images only (Keras preprocessing layers, seeded).
AUGMENTATION = {"flip": "horizontal", "translation": 0.1, "rotation": 0.05, "zoom": 0.1}


@dataclass
class Network:
    """The models of one run; they share their layers, so training ``top`` trains ``full``.

    Attributes:
        full: uint8 RGB pixels (n, s, s, 3) -> class probabilities (float32); the saved model.
        prefix: float RGB 0..255 -> output of the frozen part (never trained); None for scratch.
        top: prefix output (or float pixels for scratch) -> class probabilities.
        phases: (name, layers of ``top`` trainable in that phase) in training order.
        cut: number of VGG16 layers in the frozen prefix.
        fitted_start: the head starts fitted (the LP-FT probe): its validation scores before
            any step are epoch 0 of the history.
    """

    full: object
    prefix: object | None
    top: object
    phases: list
    cut: int = 0
    fitted_start: bool = False


def preprocess_layers():
    """``backbone.preprocess`` (RGB->BGR, minus the ImageNet BGR means, float32) as stock Keras layers.

    A frozen 3x3 permutation Dense flips the channels (exact: one weight is 1, the others 0,
    and the values are still integers 0..255, so even TF32 or bfloat16 matmuls keep them),
    then a Rescaling with a per-channel offset subtracts the means. Stock layers keep the
    saved model loadable without custom objects or unsafe Lambda deserialisation; a test
    checks the result is bit-identical to ``backbone.preprocess``.
    """
    import keras

    flip = keras.layers.Dense(3, use_bias=False, trainable=False, dtype="float32", name="rgb_to_bgr")
    flip.build((None, 3))
    flip.set_weights([np.eye(3, dtype=np.float32)[::-1].copy()])
    offset = keras.layers.Rescaling(1.0, offset=[-m for m in BGR_MEANS], dtype="float32", name="subtract_imagenet_bgr_means")
    return [flip, offset]


def augmentation_layers(seed: int):
    """The training-time augmentation (AUGMENTATION), float32, seeded; inactive at inference."""
    import keras

    a = AUGMENTATION
    return [
        keras.layers.RandomFlip(a["flip"], seed=seed, dtype="float32", name="aug_flip"),
        keras.layers.RandomTranslation(a["translation"], a["translation"], fill_mode="reflect", seed=seed + 1, dtype="float32", name="aug_translate"),
        keras.layers.RandomRotation(a["rotation"], fill_mode="reflect", seed=seed + 2, dtype="float32", name="aug_rotate"),
        keras.layers.RandomZoom(a["zoom"], fill_mode="reflect", seed=seed + 3, dtype="float32", name="aug_zoom"),
    ]


def apply_layers(layers, x, **kwargs):
    """``x`` passed through ``layers`` in order (keyword arguments go to every call)."""
    for layer in layers:
        x = layer(x, **kwargs)
    return x


def find_layer(model, name: str):
    """The layer called ``name`` anywhere in ``model`` (nested models included).

    Raises:
        ValueError: no such layer.
    """
    for layer in model.layers:
        if layer.name == name:
            return layer
        if hasattr(layer, "layers"):
            try:
                return find_layer(layer, name)
            except ValueError:
                pass
    raise ValueError(f"no layer {name!r} in {model.name}")


def frozen_count(unfreeze_from: str) -> int:
    """How many VGG16 layers stay frozen for ``unfreeze_from`` (a layer name, ``none`` or ``all``).

    Raises:
        ValueError: ``unfreeze_from`` is neither a VGG16 layer nor ``none``/``all``.
    """
    if unfreeze_from == "none":
        return len(VGG16_LAYERS)
    if unfreeze_from == "all":
        return 0
    return VGG16_LAYERS.index(unfreeze_from)


def _dense_init(seed: int):
    import keras

    return keras.initializers.GlorotUniform(seed=seed)


@dataclass
class Base:
    """The VGG16 base split at ``unfreeze_from``, before a head is attached.

    Attributes:
        prefix: float RGB 0..255 -> VGG16 preprocessing -> the frozen VGG16 layers (never trained).
        suffix: the VGG16 layers from ``unfreeze_from`` on (shared with the network built on it).
        cut: number of VGG16 layers in the prefix.
    """

    prefix: object
    suffix: list
    cut: int


def build_base(*, input_size: int, unfreeze_from: str, precision: str, seed: int, weights=None) -> Base:
    """VGG16 (seeded; ``weights`` loaded when given) split into a frozen prefix and the layers from ``unfreeze_from`` on."""
    import keras

    from pipeline.extraction.weights import load_weights

    vgg = build_vgg16(input_size, precision, seed)
    if weights is not None:
        load_weights(vgg, weights)
    vgg_layers = [vgg.get_layer(name) for name in VGG16_LAYERS]
    cut = frozen_count(unfreeze_from)
    prefix_in = keras.Input((input_size, input_size, 3), dtype="float32", name="rgb_0_255")
    prefix_out = apply_layers(vgg_layers[:cut], apply_layers(preprocess_layers(), prefix_in))
    prefix = keras.Model(prefix_in, prefix_out, name="frozen_prefix")
    prefix.trainable = False
    return Base(prefix, vgg_layers[cut:], cut)


def base_features(base: Base, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """The frozen base's block5_pool outputs (float32, what ``extract`` stores) of uint8 RGB ``pixels``, batch by batch."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def forward(x):
        return tf.cast(apply_layers(base.suffix, base.prefix(tf.cast(x, tf.float32), training=False), training=False), tf.float32)

    return np.concatenate([forward(pixels[s : s + batch_size]).numpy() for s in range(0, len(pixels), batch_size)])


def dense_head(n_classes: int, *, pool: str, dense: int, dropout: float, precision: str, seed: int) -> list:
    """The classic head, from random: pooling, Dense(dense, relu), Dropout(dropout), Dense(n_classes, softmax), seeded."""
    import keras

    from pipeline.nets.probe import pool_layer

    policy = POLICIES[precision]
    return [
        pool_layer(pool, "head"),
        keras.layers.Dense(dense, activation="relu", kernel_initializer=_dense_init(seed + 101), dtype=policy, name="head_dense"),
        keras.layers.Dropout(dropout, seed=seed + 102, dtype=policy, name="head_dropout"),
        # float32 softmax: mixed precision keeps the probabilities and the loss in float32
        keras.layers.Dense(n_classes, activation="softmax", kernel_initializer=_dense_init(seed + 103), dtype="float32", name="predictions"),
    ]


def assemble(base: Base, head_layers: list, *, input_size: int, unfreeze_from: str, head_phase: bool, fitted_start: bool = False) -> Network:
    """The network of ``base`` + ``head_layers``: ``top`` (suffix + head), ``full`` (uint8 pixels in) and the phases.

    Args:
        head_phase: run phase ``head`` (head layers only, frozen base) first; a fitted
            probe head skips it (it is already fitted).
        fitted_start: the head starts fitted (the probe), recorded in the history as epoch 0.
    """
    import keras

    s = input_size
    prefix_out = base.prefix.outputs[0]
    top_in = keras.Input(tuple(prefix_out.shape[1:]), dtype=prefix_out.dtype, name="prefix_output")
    top = keras.Model(top_in, apply_layers(head_layers, apply_layers(base.suffix, top_in)), name="trainable_top")
    pixels = keras.Input((s, s, 3), dtype="uint8", name="pixels")
    x = keras.layers.Rescaling(1.0, dtype="float32", name="to_float")(pixels)
    full = keras.Model(pixels, top(base.prefix(x, training=False)), name="vgg16_finetune")
    phases = [("head", head_layers)] if head_phase else []
    if unfreeze_from != "none":
        phases.append(("finetune", base.suffix + head_layers))
    return Network(full, base.prefix, top, phases, base.cut, fitted_start)


def build_finetune_network(
    n_classes: int,
    *,
    input_size: int,
    unfreeze_from: str,
    head: str,
    pool: str,
    dense: int,
    dropout: float,
    precision: str,
    seed: int,
    weights=None,
    probe=None,
) -> Network:
    """VGG16 base + a head, split at ``unfreeze_from``.

    Args:
        n_classes: outputs of the softmax layer.
        input_size: square side of the input images (at least 32).
        unfreeze_from: first VGG16 layer of ``top`` (trained in phase ``finetune``), ``none``
            (the whole base frozen, head only) or ``all`` (nothing frozen).
        head: ``dense`` (the classic head from random: phases ``head`` then ``finetune``) or
            ``probe`` (the fitted ``probe`` estimator as layers: phase ``finetune`` only).
        pool: ``flatten``, ``avg`` or ``max`` before the head.
        dense, dropout: units of the dense head's hidden layer and the dropout rate after it.
        precision: a resolved precision (``float32``, ``bfloat16``, ``float16``), not ``auto``.
        seed: initialises the base (``build_vgg16``) and every new layer (each its own seed).
        weights: a ``WeightsInfo`` loaded into the base, or None to keep the seeded random init.
        probe: for ``head="probe"``, a fitted logistic-regression pipeline on pooled features.

    Returns:
        Network: phases ``head`` (dense head only) and, unless ``none``, ``finetune``
        (the unfrozen VGG16 layers and the head).
    """
    from pipeline.nets.probe import probe_layers

    base = build_base(input_size=input_size, unfreeze_from=unfreeze_from, precision=precision, seed=seed, weights=weights)
    if head == "probe":
        layers = probe_layers(probe, pool, n_classes)
    else:
        layers = dense_head(n_classes, pool=pool, dense=dense, dropout=dropout, precision=precision, seed=seed)
    return assemble(base, layers, input_size=input_size, unfreeze_from=unfreeze_from, head_phase=head != "probe", fitted_start=head == "probe")


def build_scratch_network(
    n_classes: int,
    *,
    input_size: int,
    filters: Sequence[int],
    dense: int,
    dropout: float,
    precision: str,
    seed: int,
) -> Network:
    """The baseline CNN, with seeded initialisers.

    ``len(filters)`` blocks of conv3x3 -> batchnorm -> relu -> maxpool, then global average
    pooling, Dense(dense, relu), Dropout(dropout), Dense(n_classes, softmax).

    Args:
        n_classes: outputs of the softmax layer.
        input_size: square side of the input images (at least ``2 ** len(filters)``).
        filters: filters of each conv block.
        dense, dropout: units of the hidden dense layer and the dropout rate after it.
        precision: a resolved precision (``float32``, ``bfloat16``, ``float16``).
        seed: seeds Keras and every initialiser.

    Returns:
        Network: no prefix; one phase ``train`` with every layer of ``top``.
    """
    import keras

    policy = POLICIES[precision]
    keras.utils.set_random_seed(seed)
    s = input_size
    body_in = keras.Input((s, s, 3), dtype="float32", name="rgb_0_255")
    x = keras.layers.Rescaling(1.0 / 255, dtype=policy, name="scale_0_1")(body_in)
    for i, f in enumerate(filters, start=1):
        x = keras.layers.Conv2D(f, 3, padding="same", use_bias=False, kernel_initializer=keras.initializers.HeNormal(seed=seed + i), dtype=policy, name=f"block{i}_conv")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, dtype=policy, name=f"block{i}_bn")(x)  # small data: few steps per epoch
        x = keras.layers.Activation("relu", dtype=policy, name=f"block{i}_relu")(x)
        x = keras.layers.MaxPooling2D(dtype=policy, name=f"block{i}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(dtype=policy, name="gap")(x)
    x = keras.layers.Dense(dense, activation="relu", kernel_initializer=_dense_init(seed + 101), dtype=policy, name="dense")(x)
    x = keras.layers.Dropout(dropout, seed=seed + 102, dtype=policy, name="dropout")(x)
    out = keras.layers.Dense(n_classes, activation="softmax", kernel_initializer=_dense_init(seed + 103), dtype="float32", name="predictions")(x)
    top = keras.Model(body_in, out, name="scratch_cnn")
    pixels = keras.Input((s, s, 3), dtype="uint8", name="pixels")
    full = keras.Model(pixels, top(keras.layers.Rescaling(1.0, dtype="float32", name="to_float")(pixels)), name="scratch")
    return Network(full, None, top, [("train", [l for l in top.layers if not isinstance(l, keras.layers.InputLayer)])])
