"""Where the linear-model engine runs: numpy on the CPU, or the same engine in TensorFlow on a GPU when one is present (or on TensorFlow's CPU, asked for by name).

``--engine``-style choices (``backend``): ``auto`` = TensorFlow when it sees a GPU, numpy
otherwise; ``numpy``; ``tensorflow`` (its GPU if any, else its CPU: what the tests run).
TensorFlow is imported only when a GPU may be present (an NVIDIA device node or
``nvidia-smi``) or when asked for: its import costs seconds. On a GPU the batches are larger
(``stream.BATCH_ROWS``) and travel as float16, the storage precision of feature files,
halving the host-to-device copy; the weights and the arithmetic stay float32.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from pipeline.rows.engine import Engine, Heads, Preconditioner, intercept_penalty, rates, uncentred
from pipeline.rows.pooling import pooled_dim
from pipeline.core.errors import PipelineError

BACKENDS = ("auto", "numpy", "tensorflow")


def _gpu_possible() -> bool:
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def _tf_device() -> tuple[object, str]:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return tf, ("/GPU:0" if gpus else "/CPU:0")


def make_engine(backend: str, row_shape, pool: str, k: int, heads: Heads, n_rows: np.ndarray, loss: str, pre: Preconditioner):
    """The engine for ``backend`` and the kind of device it runs on (``cpu`` or ``gpu``).

    Raises:
        PipelineError: an unknown backend.
    """
    if backend not in BACKENDS:
        raise PipelineError(f"engine backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    d = pooled_dim(tuple(row_shape), pool)
    if backend == "tensorflow" or backend == "auto" and _gpu_possible():
        tf, device = _tf_device()
        if backend == "tensorflow" or device.startswith("/GPU"):
            return TFEngine(tf, device, d, k, heads, n_rows, loss, pre), "gpu" if device.startswith("/GPU") else "cpu"
    return Engine(d, k, heads, n_rows, loss, pre), "cpu"


class TFEngine:
    """``engine.Engine``'s step in TensorFlow on ``device``: same heads, preconditioner, schedule and averaging."""

    def __init__(self, tf, device: str, d: int, k: int, heads: Heads, n_rows: np.ndarray, loss: str, pre: Preconditioner):
        self.tf, self.device, self.k, self.heads, self.loss, self.pre, self.n_rows = tf, device, k, heads, loss, pre, np.asarray(n_rows)
        self.wire = np.float16 if device.startswith("/GPU") else np.float32
        lam, eta = rates(heads, n_rows, k, loss, pre.delta)
        hk = len(heads) * k
        with tf.device(device):
            const = lambda a: tf.constant(np.asarray(a, np.float32))  # noqa: E731
            self.lam, self.eta, self.mu, self.V, self.shrink = const(lam), const(eta), const(pre.mu), const(pre.V), const(pre.shrink[:, None])
            self.lam_b = const(intercept_penalty(lam, loss, pre))
            self.held = tf.constant(heads.held_out)
            self.W, self.c = tf.Variable(tf.zeros((d, hk))), tf.Variable(tf.zeros(hk))
            self.Wa, self.ca = tf.Variable(tf.zeros((d, hk))), tf.Variable(tf.zeros(hk))
        self._step = tf.function(self._math)
        self.plan(1, 0)

    def plan(self, steps: int, average_from: int) -> None:
        self.t, self.steps, self.average_from, self.averaged = 0, max(1, steps), average_from, 0

    def _math(self, x, y, groups, scale, avg):
        tf, H, k = self.tf, len(self.heads), self.k
        x = tf.cast(x, tf.float32)
        m = tf.cast(groups[:, None] != self.held[None, :], tf.float32)
        counts = tf.reduce_sum(m, 0)
        b = self.c - tf.linalg.matvec(self.W, self.mu, transpose_a=True)
        S = tf.reshape(tf.matmul(x, self.W) + b, (-1, H, k))
        onehot = tf.one_hot(y, k)[:, None, :]
        if self.loss == "lr":
            R = tf.nn.softmax(S, axis=2) - onehot
        else:
            Y = 2.0 * onehot - 1.0
            R = -2.0 * Y * tf.nn.relu(1.0 - Y * S)
        R = tf.reshape(R * (m / tf.maximum(counts, 1.0))[:, :, None], (-1, H * k))
        r_sum = tf.reduce_sum(R, 0) + self.lam_b * b  # as Engine.step: the svm intercept's penalty
        G = tf.matmul(x, R, transpose_a=True) - self.mu[:, None] * r_sum[None, :] + self.lam * self.W  # centred rows, as Engine.step
        if self.V.shape[1]:
            G -= tf.matmul(self.V, self.shrink * tf.matmul(self.V, G, transpose_a=True))
        eta = self.eta * scale * tf.repeat(tf.cast(counts > 0, tf.float32), k)
        self.W.assign_sub(eta * G)
        self.c.assign_sub(eta * r_sum)
        self.Wa.assign_add(avg * (self.W - self.Wa))
        self.ca.assign_add(avg * (self.c - self.ca))

    def step(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> None:
        """One step, as ``Engine.step`` (``x`` is not modified)."""
        self.t += 1
        avg = 0.0
        if self.t > self.average_from:
            self.averaged += 1
            avg = 1.0 / self.averaged
        scale = 1.0 / (1.0 + 4.0 * (self.t - 1) / self.steps)
        tf = self.tf
        with tf.device(self.device):
            wire = self.wire if np.abs(x).max(initial=0.0) < 6e4 else np.float32  # float16 holds up to 65504
            self._step(x.astype(wire), tf.constant(y, tf.int32), tf.constant(groups, tf.int64), tf.constant(scale, tf.float32), tf.constant(avg, tf.float32))

    def averages(self) -> tuple[np.ndarray, np.ndarray]:
        """As ``Engine.averages`` (copied to the host)."""
        W, c = (self.Wa, self.ca) if self.averaged else (self.W, self.c)
        return W.numpy(), c.numpy()

    def set_averages(self, W: np.ndarray, c: np.ndarray) -> None:
        """As ``Engine.set_averages``."""
        self.Wa.assign(np.asarray(W, np.float32))
        self.ca.assign(np.asarray(c, np.float32))
        self.averaged = max(1, self.averaged)

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """As ``Engine.weights``."""
        return uncentred(*self.averages(), self.pre.mu, len(self.heads), self.k)
