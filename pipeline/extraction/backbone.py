"""The headless VGG16 network and its exact preprocessing: RGB pixels in, bottleneck features out, no files."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BACKBONE = "vgg16"
LAYER = "block5_pool"
PREPROCESSING = "keras.applications.vgg16.preprocess_input (caffe: RGB->BGR, minus ImageNet channel means, no scaling)"
#: ImageNet BGR channel means used by ``keras.applications.vgg16.preprocess_input``.
BGR_MEANS = (103.939, 116.779, 123.68)
#: ``--precision`` name -> Keras dtype policy.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def feature_shape(input_size: int) -> tuple[int, int, int]:
    """Shape of one image's features: five 2x2 poolings of the input, 512 channels."""
    side = input_size
    for _ in range(5):
        side //= 2
    return (side, side, 512)


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


def build_vgg16(input_size: int, precision: str = "float32", seed: int = 0):
    """The VGG16 convolutional base (no classifier head), for ``precision``.

    Initialised from ``seed``, so ``--weights none`` gives the same network in every
    process (a resumed run must compute the same features as the one it continues).
    """
    import keras

    keras.utils.set_random_seed(seed)
    with _dtype_policy(POLICIES[precision]):
        return keras.applications.VGG16(include_top=False, weights=None, input_shape=(input_size, input_size, 3))


def preprocess(pixels):
    """``keras.applications.vgg16.preprocess_input`` as graph ops: RGB->BGR and mean subtraction, float32."""
    import tensorflow as tf

    x = tf.cast(pixels, tf.float32)
    return x[..., ::-1] - tf.constant(BGR_MEANS, dtype=tf.float32)


class Backbone:
    """VGG16 base with weights loaded, called on uint8 RGB batches of up to ``batch_size`` rows.

    A short last batch runs at its own size rather than padded: padding a 1-image tail to 32
    would cost 31 images of compute. Per-image results depend on the batch size only in their
    last bits (oneDNN on AVX2 CPUs and GPUs pick kernels by batch shape): equal within float
    tolerance, not bit for bit.
    """

    def __init__(self, input_size: int, weights, precision: str = "float32", batch_size: int = 32, jit: bool | None = None):
        import tensorflow as tf

        from pipeline.extraction.weights import load_weights

        self.input_size = input_size
        self.precision = precision
        self.batch_size = batch_size
        self.model = build_vgg16(input_size, precision)
        self.weights_checksum = load_weights(self.model, weights)
        self.output_shape = feature_shape(input_size)
        model = self.model

        def _forward(pixels):
            return tf.cast(model(preprocess(pixels), training=False), tf.float32)

        # XLA fuses the preprocessing into the first convolution on a GPU; on the CPU,
        # oneDNN's kernels are already fused and XLA only adds compile time.
        if jit is None:
            jit = bool(tf.config.list_physical_devices("GPU"))
        # Trace once, for any batch size, before the first batch: tracing must not be
        # billed to the first images, and a short last batch must not trigger a retrace.
        spec = tf.TensorSpec([None, input_size, input_size, 3], tf.uint8)
        self._forward = tf.function(_forward, jit_compile=jit, input_signature=[spec]).get_concrete_function()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Features (n, h, w, 512) as float32 for uint8 RGB pixels (n, size, size, 3)."""
        import tensorflow as tf

        n = len(pixels)
        if n == 0:
            return np.zeros((0, *self.output_shape), np.float32)
        out = [self._forward(tf.convert_to_tensor(pixels[i : i + self.batch_size])).numpy() for i in range(0, n, self.batch_size)]
        return np.concatenate(out)
