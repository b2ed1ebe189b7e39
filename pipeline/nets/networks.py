"""The Keras networks of the nets stages: a backbone (VGG16 by default, any of ``backbone.BACKBONES``) split at a layer plus a head (the LP-FT probe or a dense head from random), the from-scratch CNN, and the preprocessing and augmentation layers they share.

The fine-tuning network is three nested Keras models that share their layers::

    full   = pixels uint8 -> to_float -> frozen_prefix(training=False) -> trainable_top
    prefix = float RGB 0..255 -> the backbone's preprocessing -> its layers before ``unfreeze_from``
    top    = prefix output -> the backbone's layers from ``unfreeze_from`` on -> head
    head   = probe: pooling -> the probe's row scaling -> softmax Dense (its coefficients)
           | dense: pooling -> Dense(relu) -> Dropout -> softmax Dense (from random)

so training ``top`` trains ``full``. ``full`` is what the stages save: uint8 RGB pixels in,
class probabilities out, loadable with ``keras.saving.load_model`` and no custom objects
(the preprocessing is built from stock layers; see ``preprocess_layers``).

VGG16 and VGG19 are chains: their layers are applied one by one. The other backbones branch
(residual adds, inception blocks): they are cut where one tensor joins the frozen part to
the rest (``unfreeze_index``), and each side is a Keras model on that tensor; the trainable
side runs with ``training=False``, so its batch normalisation keeps the ImageNet statistics
(Keras's advice for fine-tuning) while its scales and shifts train.

The builders (``build_base``, ``dense_head``, ``assemble``, ``build_scratch_network``) take
fields, not configs (as ``keras.applications.VGG16`` does), and are deterministic for a given
seed, so tests can rebuild a run's starting point; ``finetune.build_network`` puts a
fine-tuning network together from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.backbones.network import BGR_MEANS, POLICIES, build
from pipeline.backbones.registry import BACKBONE, get_spec

#: Every layer of the headless VGG16, in order (``--unfreeze-from`` takes any of them).
VGG16_LAYERS: tuple[str, ...] = (
    "block1_conv1", "block1_conv2", "block1_pool",
    "block2_conv1", "block2_conv2", "block2_pool",
    "block3_conv1", "block3_conv2", "block3_conv3", "block3_pool",
    "block4_conv1", "block4_conv2", "block4_conv3", "block4_pool",
    "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool",
)  # fmt: skip
#: ``none``: frozen base, head only (phase 1 only); ``all``: every layer of the backbone trains in phase 2.
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
        cut: number of backbone layers in the frozen prefix.
        fitted_start: the head starts fitted (the LP-FT probe): its validation scores before
            any step are epoch 0 of the history.
        cut_layer: the last frozen layer of the backbone (None: nothing frozen).
    """

    full: object
    prefix: object | None
    top: object
    phases: list
    cut: int = 0
    fitted_start: bool = False
    cut_layer: str | None = None


def preprocess_layers(backbone: str = BACKBONE):
    """``backbone.preprocess`` of ``backbone`` (float32) as stock Keras layers.

    ``caffe`` (VGG, ResNet50): a frozen 3x3 permutation Dense flips the channels (exact: one
    weight is 1, the others 0, and the values are still integers 0..255, so even TF32 or
    bfloat16 matmuls keep them), then a Rescaling with a per-channel offset subtracts the
    means; a test checks the result is bit-identical to ``backbone.preprocess``. ``tf``
    (ResNet50V2, InceptionV3, MobileNetV2): a Rescaling by 1/127.5 with offset -1 (a multiply
    where Keras divides: equal within one float32 rounding). Stock layers keep the saved
    model loadable without custom objects or unsafe Lambda deserialisation.
    """
    import keras

    if get_spec(backbone).mode == "tf":
        return [keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, dtype="float32", name="scale_to_plus_minus_1")]

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


def unfreeze_index(model, backbone: str, unfreeze_from: str) -> int:
    """Index in ``model.layers`` of the first layer trained for ``unfreeze_from`` (``model.layers[0]`` is the input).

    ``all``: 1 (every layer); ``none``: ``len(model.layers)`` (nothing); a block name of the
    backbone's ``blocks`` (InceptionV3's ``mixedN``): the layer after the block before it; any
    other layer name: that layer, where the network can be cut: exactly one tensor of the
    layers before it is used by it and the layers after it.

    Raises:
        ValueError: not a layer of the backbone, or a layer inside a branching block.
    """
    layers = model.layers
    if unfreeze_from == "all":
        return 1
    if unfreeze_from == "none":
        return len(layers)
    names = [l.name for l in layers]
    blocks = get_spec(backbone).blocks
    if unfreeze_from in blocks:
        k = names.index(blocks[unfreeze_from]) + 1
    elif unfreeze_from in names[1:]:
        k = names.index(unfreeze_from)
    else:
        raise ValueError(f"not a layer of {backbone}")
    if len(cut_tensors(layers, k)) != 1:
        raise ValueError(f"{backbone} branches there: more than one tensor joins the layers before it to the rest; choose the first layer of a block")
    return k


def cut_tensors(layers, k: int) -> list:
    """The tensors made by ``layers[:k]`` that ``layers[k:]`` use (one: the network can be cut there)."""
    made = {id(l.output): l.output for l in layers[:k]}
    out: dict = {}
    for layer in layers[k:]:
        inputs = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        for t in inputs:
            if id(t) in made:
                out[id(t)] = t
    return list(out.values())


def unfreeze_choices(backbone: str) -> str:
    """What ``--unfreeze-from`` accepts for ``backbone``, for messages."""
    spec = get_spec(backbone)
    if backbone == BACKBONE:
        return "none, all or one of " + ", ".join(VGG16_LAYERS)
    extra = f" or a block {', '.join(spec.blocks)}" if spec.blocks else ""
    return f"none, all, a layer of keras.applications.{spec.constructor} where the network can be cut (e.g. its default {spec.unfreeze_from}){extra}"


@dataclass
class Base:
    """The backbone split at ``unfreeze_from``, before a head is attached.

    Attributes:
        prefix: float RGB 0..255 -> the backbone's preprocessing -> its frozen layers (never trained).
        suffix: what follows: the layers from ``unfreeze_from`` on (a chain, VGG), or one Keras
            model of them (a branching backbone); shared with the network built on it.
        cut: number of backbone layers in the prefix.
        cut_layer: the last layer of the prefix (None: only the preprocessing).
        backbone: the backbone's name.
    """

    prefix: object
    suffix: list
    cut: int
    cut_layer: str | None = None
    backbone: str = BACKBONE


def build_base(*, input_size: int, unfreeze_from: str, precision: str, seed: int, weights=None, backbone: str = BACKBONE) -> Base:
    """The backbone (``weights`` loaded; random ones are extract's one network, seed 0's, whatever ``seed``: a probe of --seed 1 was
    fitted on other features than its spec's) split into a frozen prefix and the layers from ``unfreeze_from`` on.

    Raises: PipelineError: ``unfreeze_from`` is not a place where the backbone can be cut (checked before the weights load), or the weights do not load.
    """
    import keras

    from pipeline.core.errors import PipelineError
    from pipeline.backbones.weights import load_weights

    random_init = weights is None or weights.name == "none"
    model = build(backbone, input_size, precision, 0 if random_init else seed)
    if random_init:
        keras.utils.set_random_seed(seed)  # --seed: the head's start and the training
    try:
        k = unfreeze_index(model, backbone, unfreeze_from)
    except ValueError as exc:
        raise PipelineError(f"--unfreeze-from {unfreeze_from}: {exc}; choose {unfreeze_choices(backbone)}") from None
    if weights is not None:
        load_weights(model, weights)
    layers = model.layers
    prefix_in = keras.Input((input_size, input_size, 3), dtype="float32", name="rgb_0_255")
    x = apply_layers(preprocess_layers(backbone), prefix_in)
    chain = all(layer.input is layers[i].output for i, layer in enumerate(layers[1:]))
    if chain:
        prefix_out, suffix = apply_layers(layers[1:k], x), list(layers[k:])
    else:
        cut = cut_tensors(layers, k)[0] if k < len(layers) else model.output
        if k > 1:
            x = keras.Model(model.input, cut, name=f"{backbone}_frozen")(x, training=False)
        prefix_out = x
        suffix = [] if k == len(layers) else [model if k == 1 else keras.Model(cut, model.output, name=f"{backbone}_trainable")]
    prefix = keras.Model(prefix_in, prefix_out, name="frozen_prefix")
    prefix.trainable = False
    return Base(prefix, suffix, k - 1, layers[k - 1].name if k > 1 else None, backbone)


def base_features(base: Base, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """The frozen base's feature-layer outputs (float32, what ``extract`` stores) of uint8 RGB ``pixels``, batch by batch."""
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
    # training=False: batch normalisation in the backbone keeps its statistics (none in VGG)
    top = keras.Model(top_in, apply_layers(head_layers, apply_layers(base.suffix, top_in, training=False)), name="trainable_top")
    pixels = keras.Input((s, s, 3), dtype="uint8", name="pixels")
    x = keras.layers.Rescaling(1.0, dtype="float32", name="to_float")(pixels)
    full = keras.Model(pixels, top(base.prefix(x, training=False)), name=f"{base.backbone}_finetune")
    phases = [("head", head_layers)] if head_phase else []
    if unfreeze_from != "none":
        phases.append(("finetune", base.suffix + head_layers))
    return Network(full, base.prefix, top, phases, base.cut, fitted_start, base.cut_layer)


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
