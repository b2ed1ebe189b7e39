"""The backbones as networks: building each headless ImageNet network of the registry, its exact preprocessing, counting its MACs, and the precision policy: arrays in, features out, no files."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np

from pipeline.backbones.registry import BACKBONE, feature_shape, get_spec

#: ImageNet BGR channel means used by ``preprocess_input`` in ``caffe`` mode (VGG, ResNet50).
BGR_MEANS = (103.939, 116.779, 123.68)
#: ``--precision`` name -> Keras dtype policy.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
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

        from pipeline.backbones.weights import load_weights

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
