"""The backbones: a registry of headless ImageNet networks (VGG16, VGG19, ResNet50, ResNet50V2, InceptionV3, MobileNetV2), each with its exact preprocessing, default input size and feature layer, and the precision policy: arrays in, features out, no files."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: ImageNet BGR channel means used by ``preprocess_input`` in ``caffe`` mode (VGG, ResNet50).
BGR_MEANS = (103.939, 116.779, 123.68)
#: ``--precision`` name -> Keras dtype policy.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
#: What each ``keras.applications.<family>.preprocess_input`` mode does to RGB pixels 0..255.
MODES = {
    "caffe": "caffe: RGB->BGR, minus ImageNet channel means, no scaling",
    "tf": "tf: x / 127.5 - 1, scaled to -1..1, RGB",
}
#: Where Keras downloads the ImageNet weights from.
KERAS_APPLICATIONS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class BackboneSpec:
    """One ``--backbone``: how to build it, feed it and name its features.

    Attributes:
        name: the ``--backbone`` value (recorded as the feature file's ``backbone``).
        constructor: the ``keras.applications`` function (``include_top=False``).
        family: the ``keras.applications`` module whose ``preprocess_input`` it uses.
        mode: that function's mode (``caffe`` or ``tf``; see MODES).
        layer: the feature layer: the last convolutional block's output before global
            pooling (the model's output with ``include_top=False``).
        input_size: the default input side (Keras's default size).
        min_size: the smallest input side Keras builds it for.
        channels: channels of the feature layer.
        reduction: how the input side shrinks to the feature grid (``floor5``: five 2x2 valid
            poolings; ``ceil5``: five stride-2 steps with padding; ``inception``).
        unfreeze_from: fine-tuning's default ``--unfreeze-from``: the first layer of the last block.
        blocks: block names ``--unfreeze-from`` also accepts, each meaning "from the layer after
            this one" (InceptionV3's convolutions have generated names; its blocks ``mixedN`` do not).
        weights_file, weights_url, weights_md5: the ``_notop`` ImageNet file Keras caches in
            ``$KERAS_HOME/models``, where it downloads it, and the md5 Keras checks (None: Keras checks none).
    """

    name: str
    constructor: str
    family: str
    mode: str
    layer: str
    input_size: int
    min_size: int
    channels: int
    reduction: str
    unfreeze_from: str
    weights_file: str
    weights_url: str
    weights_md5: str | None
    blocks: dict = field(default_factory=dict)

    @property
    def preprocessing(self) -> str:
        """The recorded ``preprocessing``: the Keras function and what its mode does."""
        return f"keras.applications.{self.family}.preprocess_input ({MODES[self.mode]})"

    def feature_shape(self, input_size: int) -> tuple[int, int, int]:
        """Shape of one image's features at ``input_size`` (the model's output shape, computed without building it)."""
        s = int(input_size)
        if self.reduction == "floor5":  # VGG: five 2x2 max poolings, valid padding
            for _ in range(5):
                s //= 2
        elif self.reduction == "ceil5":  # stride-2 convolutions and poolings, padded
            for _ in range(5):
                s = math.ceil(s / 2)
        else:  # inception: the stem's valid 3x3 convolutions and poolings, then mixed3 and mixed8
            s = (s - 3) // 2 + 1  # conv 3x3 / 2
            s -= 2  # conv 3x3
            s = (s - 3) // 2 + 1  # max pool 3x3 / 2
            s -= 2  # conv 3x3 after the 1x1
            for _ in range(3):  # max pool 3x3 / 2, mixed3, mixed8
                s = (s - 3) // 2 + 1
        return (s, s, self.channels)


def _keras_file(family_path: str, file: str) -> str:
    return KERAS_APPLICATIONS_URL + family_path + "/" + file


def _spec(name, constructor, family, mode, layer, input_size, min_size, channels, reduction, unfreeze_from, file, url_path, md5, blocks=None):
    return BackboneSpec(name, constructor, family, mode, layer, input_size, min_size, channels, reduction, unfreeze_from, file,
                        _keras_file(url_path, file), md5, dict(blocks or {}))  # fmt: skip


# File names, folders and md5s as in keras.applications (keras/src/applications/*.py, Keras 3).
BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        _spec("vgg16", "VGG16", "vgg16", "caffe", "block5_pool", 224, 32, 512, "floor5", "block5_conv1",
              "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "vgg16", "6d6bbae143d832006294945121d1f1fc"),
        _spec("vgg19", "VGG19", "vgg19", "caffe", "block5_pool", 224, 32, 512, "floor5", "block5_conv1",
              "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", "vgg19", "253f8cb515780f3b799900260a226db6"),
        _spec("resnet50", "ResNet50", "resnet50", "caffe", "conv5_block3_out", 224, 32, 2048, "ceil5", "conv5_block1_1_conv",
              "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "resnet", "4d473c1dd8becc155b73f8504c6f6626"),
        _spec("resnet50v2", "ResNet50V2", "resnet_v2", "tf", "post_relu", 224, 32, 2048, "ceil5", "conv5_block1_preact_bn",
              "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5", "resnet", "fac2f116257151a9d068a22e544a4917"),
        _spec("inception_v3", "InceptionV3", "inception_v3", "tf", "mixed10", 299, 75, 2048, "inception", "mixed10",
              "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", "inception_v3", "bcbd6486424b2319ff4ef7d526e38f63",
              blocks={f"mixed{n}": f"mixed{n - 1}" for n in range(1, 11)}),
        _spec("mobilenetv2", "MobileNetV2", "mobilenet_v2", "tf", "out_relu", 224, 32, 1280, "ceil5", "block_16_expand",
              "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", "mobilenet_v2", None),
    )
}  # fmt: skip
#: The default ``--backbone``, the one with the offline weights route.
BACKBONE = "vgg16"
#: VGG16's feature layer and preprocessing (the default backbone's; kept importable by name).
LAYER = BACKBONES[BACKBONE].layer
PREPROCESSING = BACKBONES[BACKBONE].preprocessing


def get_spec(name: str) -> BackboneSpec:
    """The registry entry of backbone ``name``.

    Raises:
        PipelineError: ``name`` is not a backbone of this program.
    """
    from pipeline.core.errors import PipelineError

    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise PipelineError(f"backbone {name!r} is not one of {', '.join(BACKBONES)}") from None


def feature_shape(self, input_size: int) -> tuple[int, int, int]:
        """Shape of one image's features at ``input_size`` (the model's output shape, computed without building it)."""
        s = int(input_size)
        if self.reduction == "floor5":  # VGG: five 2x2 max poolings, valid padding
            for _ in range(5):
                s //= 2
        elif self.reduction == "ceil5":  # stride-2 convolutions and poolings, padded
            for _ in range(5):
                s = math.ceil(s / 2)
        else:  # inception: the stem's valid 3x3 convolutions and poolings, then mixed3 and mixed8
            s = (s - 3) // 2 + 1  # conv 3x3 / 2
            s -= 2  # conv 3x3
            s = (s - 3) // 2 + 1  # max pool 3x3 / 2
            s -= 2  # conv 3x3 after the 1x1
            for _ in range(3):  # max pool 3x3 / 2, mixed3, mixed8
                s = (s - 3) // 2 + 1
        return (s, s, self.channels)


def _keras_file(family_path: str, file: str) -> str:
    return KERAS_APPLICATIONS_URL + family_path + "/" + file


def _spec(name, constructor, family, mode, layer, input_size, min_size, channels, reduction, unfreeze_from, file, url_path, md5, blocks=None):
    return BackboneSpec(name, constructor, family, mode, layer, input_size, min_size, channels, reduction, unfreeze_from, file,
                        _keras_file(url_path, file), md5, dict(blocks or {}))  # fmt: skip


# File names, folders and md5s as in keras.applications (keras/src/applications/*.py, Keras 3).
BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        _spec("vgg16", "VGG16", "vgg16", "caffe", "block5_pool", 224, 32, 512, "floor5", "block5_conv1",
              "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "vgg16", "6d6bbae143d832006294945121d1f1fc"),
        _spec("vgg19", "VGG19", "vgg19", "caffe", "block5_pool", 224, 32, 512, "floor5", "block5_conv1",
              "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", "vgg19", "253f8cb515780f3b799900260a226db6"),
        _spec("resnet50", "ResNet50", "resnet50", "caffe", "conv5_block3_out", 224, 32, 2048, "ceil5", "conv5_block1_1_conv",
              "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "resnet", "4d473c1dd8becc155b73f8504c6f6626"),
        _spec("resnet50v2", "ResNet50V2", "resnet_v2", "tf", "post_relu", 224, 32, 2048, "ceil5", "conv5_block1_preact_bn",
              "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5", "resnet", "fac2f116257151a9d068a22e544a4917"),
        _spec("inception_v3", "InceptionV3", "inception_v3", "tf", "mixed10", 299, 75, 2048, "inception", "mixed10",
              "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", "inception_v3", "bcbd6486424b2319ff4ef7d526e38f63",
              blocks={f"mixed{n}": f"mixed{n - 1}" for n in range(1, 11)}),
        _spec("mobilenetv2", "MobileNetV2", "mobilenet_v2", "tf", "out_relu", 224, 32, 1280, "ceil5", "block_16_expand",
              "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", "mobilenet_v2", None),
    )
}  # fmt: skip
#: The default ``--backbone``, the one with the offline weights route.
BACKBONE = "vgg16"
#: VGG16's feature layer and preprocessing (the default backbone's; kept importable by name).
LAYER = BACKBONES[BACKBONE].layer
PREPROCESSING = BACKBONES[BACKBONE].preprocessing


def get_spec(name: str) -> BackboneSpec:
    """The registry entry of backbone ``name``.

    Raises:
        PipelineError: ``name`` is not a backbone of this program.
    """
    from pipeline.core.errors import PipelineError

    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise PipelineError(f"backbone {name!r} is not one of {', '.join(BACKBONES)}") from None


def weights_file(name: str, input_size: int | None = None) -> str:
    """The name of the ImageNet ``_notop`` file Keras caches for backbone ``name`` (MobileNetV2's depends on the input side)."""
    spec = get_spec(name)
    if name == "mobilenetv2" and input_size in MOBILENET_V2_SIZES:
        return spec.weights_file.replace("_224_", f"_{int(input_size)}_")
    return spec.weights_file


def feature_shape(input_size: int, backbone: str = BACKBONE) -> tuple[int, int, int]:
    """Shape of one image's features from ``backbone`` at ``input_size`` (VGG16's by default: five 2x2 poolings, 512 channels)."""
    return get_spec(backbone).feature_shape(input_size)


#: Environment variable naming the CPU flags to assume instead of /proc/cpuinfo's (space
#: separated): ``PIPELINE_CPU_FLAGS=avx2 make test`` runs the suite on the path an AVX2-only
#: CPU takes (``auto`` -> float32) on any machine.
CPU_FLAGS_ENV = "PIPELINE_CPU_FLAGS"


def cpu_flags() -> set[str]:
    """This CPU's feature flags (``avx2``, ``avx512_bf16``, ...): ``$PIPELINE_CPU_FLAGS`` if set, else /proc/cpuinfo's."""
    forced = os.environ.get(CPU_FLAGS_ENV)
    if forced is not None:
        return set(forced.split())
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_precision(requested: str) -> str:
    """Turn ``auto`` into the fastest precision that keeps downstream accuracy here.

    float16 on a GPU (native half-precision tensor cores), bfloat16 on a CPU with native
    bfloat16 instructions (AVX512-BF16 or AMX), float32 otherwise. The choice is backed by
    ``make bench`` (speed and logistic-regression accuracy against float32). ``auto`` never
    picks ``int8`` (OpenVINO, ``engines``): it needs the int8 extra and a calibration, and
    its model depends on the images it is calibrated on; ask for it explicitly.
    """
    if requested != "auto":
        return requested
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "float16"
    flags = cpu_flags()
    if {"avx512_bf16", "amx_bf16"} & flags:
        return "bfloat16"
    return "float32"


@contextmanager
def _dtype_policy(name: str):
    import keras

    previous = keras.config.dtype_policy().name
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build(name: str, input_size: int, precision: str = "float32", seed: int = 0):
    """The headless network ``name`` (``keras.applications.<constructor>(include_top=False, weights=None)``) for ``precision``.

    Initialised from ``seed``, so ``--weights none`` gives the same network in every
    process (a resumed run must compute the same features as the one it continues).
    """
    import keras

    spec = get_spec(name)
    keras.utils.set_random_seed(seed)
    with _dtype_policy(POLICIES[precision]):
        return getattr(keras.applications, spec.constructor)(include_top=False, weights=None, input_shape=(input_size, input_size, 3))


def build_vgg16(input_size: int, precision: str = "float32", seed: int = 0):
    """The VGG16 convolutional base (``build("vgg16", ...)``)."""
    return build(BACKBONE, input_size, precision, seed)


def preprocess(pixels, backbone: str = BACKBONE):
    """``keras.applications.<family>.preprocess_input`` of ``backbone`` as graph ops on RGB pixels 0..255, float32.

    ``caffe``: RGB->BGR and mean subtraction; ``tf``: ``x / 127.5 - 1`` (division then
    subtraction, the same float32 operations as Keras's, so the values are identical).
    """
    import tensorflow as tf

    x = tf.cast(pixels, tf.float32)
    mode = get_spec(backbone).mode
    if mode == "caffe":
        return x[..., ::-1] - tf.constant(BGR_MEANS, dtype=tf.float32)
    return x / 127.5 - 1.0


def count_macs(model) -> int:
    """Multiply-accumulates of one image through ``model``'s convolution and dense layers (counted from the layers, batch 1).

    Conv2D: output pixels x output channels x kernel area x input channels / groups;
    DepthwiseConv2D: output pixels x channels x depth multiplier x kernel area; Dense:
    inputs x units per position. Other layers (normalisation, pooling, activations, adds)
    are not counted: their cost is small beside these.
    """
    import keras

    total = 0
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            out = layer.output.shape
            kh, kw = layer.kernel_size
            total += out[1] * out[2] * out[3] * kh * kw
        elif isinstance(layer, keras.layers.Conv2D):
            out, cin = layer.output.shape, layer.input.shape[-1]
            kh, kw = layer.kernel_size
            total += out[1] * out[2] * out[3] * kh * kw * cin // layer.groups
        elif isinstance(layer, keras.layers.Dense):
            out = layer.output.shape
            total += int(np.prod(out[1:-1] or [1])) * layer.input.shape[-1] * out[-1]
    return int(total)


def _all_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)
        else:
            yield layer


class Backbone:
    """A backbone with its weights loaded, called on uint8 RGB batches of up to ``batch_size`` rows.

    A short last batch runs at its own size rather than padded: padding a 1-image tail to 32
    would cost 31 images of compute. Per-image results depend on the batch size only in their
    last bits (oneDNN on AVX2 CPUs and GPUs pick kernels by batch shape): equal within float
    tolerance, not bit for bit.
    """

    def __init__(self, input_size: int, weights, precision: str = "float32", batch_size: int = 32, jit: bool | None = None, backbone: str | None = None):
        import tensorflow as tf

        from pipeline.extraction.weights import load_weights

        self.backbone = backbone or weights.backbone
        self.input_size = input_size
        self.precision = precision
        self.batch_size = batch_size
        self.model = build(self.backbone, input_size, precision)
        self.weights_checksum = load_weights(self.model, weights)
        self.output_shape = feature_shape(input_size, self.backbone)
        model, name = self.model, self.backbone

        def _forward(pixels):
            return tf.cast(model(preprocess(pixels, name), training=False), tf.float32)

        # XLA fuses the preprocessing into the first convolution on a GPU; on the CPU,
        # oneDNN's kernels are already fused and XLA only adds compile time.
        if jit is None:
            jit = bool(tf.config.list_physical_devices("GPU"))
        # Trace once, for any batch size, before the first batch: tracing must not be
        # billed to the first images, and a short last batch must not trigger a retrace.
        spec = tf.TensorSpec([None, input_size, input_size, 3], tf.uint8)
        self._forward = tf.function(_forward, jit_compile=jit, input_signature=[spec]).get_concrete_function()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Features (n, h, w, channels) as float32 for uint8 RGB pixels (n, size, size, 3)."""
        import tensorflow as tf

        n = len(pixels)
        if n == 0:
            return np.zeros((0, *self.output_shape), np.float32)
        out = [self._forward(tf.convert_to_tensor(pixels[i : i + self.batch_size])).numpy() for i in range(0, n, self.batch_size)]
        return np.concatenate(out)
