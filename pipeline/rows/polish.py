"""The engine's full-batch polish: L-BFGS from the averaged SGD weights to the exact optimum of stacked heads, one pass over the rows per iteration.

Why (measured, issue 24): on small files the engine takes few steps (about 100 in all, 25 at
600 rows), and averaged SGD stops short of the optimum: the streamed model agreed with the
exact in-memory fit on 91-96% of the test rows. The objective being the same, what is missing
is optimisation. L-BFGS on whole-pass gradients converges to that optimum; it starts from the
averaged weights and uses the engine's preconditioner as its initial inverse Hessian, so a
few tens of passes reach it where more SGD epochs crawl (``O(1/t)``). Each pass reads the
rows once: cheap on small files, not on large ones, hence ``passes_for`` (a budget in values
read, rows x features).

Every head is its own problem: the curvature pairs, the step and the line search are per
head (a head whose trial point fails the Armijo test halves its step at the next pass while
the others move on); the arithmetic stays stacked (one product for all heads, as the engine's).
"""

from __future__ import annotations

import numpy as np

from pipeline.core.signals import stop_if_terminated
from pipeline.rows.engine import Heads, intercept_penalty, rates, residual, uncentred

#: Values (rows x features) the polish may read in all: 60,000 VGG16 rows of 7x7x512, about
#: 12 s of reading on 2 cores. ``passes_for`` caps the passes at ``MAX_PASSES`` and skips the
#: polish below ``MIN_PASSES`` (a few L-BFGS steps from the SGD average do not pay for their
#: reads; large files get enough SGD steps). Measured: see the report of issue 24.
POLISH_VALUES = 60_000 * 25_088
MAX_PASSES = 100
#: The cap when the rows are in memory and the polish runs on their row-space coordinates
#: (``span.RowSpaceHeads``, ``r <= n`` values a row): passes cost ``r/d`` of the features', and
#: weakly penalised heads (large C) need hundreds to reach the exact fit (measured, issue 24).
ROW_SPACE_PASSES = 1000
#: The stop there, tighter (passes are cheap; measured: at ``RTOL`` the fold models of C=10 stopped short of the exact fits' scores).
ROW_SPACE_RTOL = 1e-8
MIN_PASSES = 8
#: Curvature pairs kept per head (each is two ``d x heads*k`` float32 arrays).
MEMORY = 5
#: A head stops when a pass lowers its objective by less than this share of it.
RTOL = 1e-5
ARMIJO = 1e-4


def passes_for(n: int, d: int, values: int | None = None, cap: int | None = None) -> int:
    """Polish passes for ``n`` training rows of ``d`` features: ``values // (n d)`` (default ``POLISH_VALUES``) capped at ``cap`` (default ``MAX_PASSES``), 0 below ``MIN_PASSES``."""
    p = min(MAX_PASSES if cap is None else cap, (POLISH_VALUES if values is None else values) // max(n * d, 1))
    return p if p >= MIN_PASSES else 0


class Objective:
    """Each head's objective on centred rows, the engine's: mean loss over the rows it learns from, plus ``lam/2 |W|^2`` (and the svm intercept's penalty), and its gradient.

    Args:
        engine: an ``Engine`` or ``TFEngine`` (its heads, classes, loss, preconditioner and rows per head).
    """

    def __init__(self, engine):
        self.heads, self.k, self.loss, self.mu = engine.heads, engine.k, engine.loss, engine.pre.mu
        self.lam, self.eta = rates(engine.heads, engine.n_rows, engine.k, engine.loss, engine.pre.delta)
        self.lam_b = intercept_penalty(self.lam, engine.loss, engine.pre)
        self.inv_rows = (1.0 / np.maximum(np.asarray(engine.n_rows, np.float64), 1.0)).astype(np.float32)

    def __call__(self, W: np.ndarray, c: np.ndarray, batches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(f (heads,), dW, dc)`` at ``(W, c)`` over one pass of ``batches`` (``(x, y, groups)`` of scaled rows)."""
        H, k = len(self.heads), self.k
        f, G, gc = np.zeros(H), np.zeros_like(W), np.zeros_like(c)
        shift = c - self.mu @ W
        for x, y, groups in batches:
            stop_if_terminated()
            m = self.heads.members(groups) * self.inv_rows
            S = x @ W + shift
            f += np.einsum("ij,ij->j", self.losses(S, y), m)
            R = residual(S, y, self.loss, H) * np.repeat(m, k, axis=1)
            G += x.T @ R
            gc += R.sum(0)
        gc += self.lam_b * shift
        G -= np.outer(self.mu, gc)
        G += self.lam * W
        f += 0.5 * (np.einsum("ij,ij->j", W, W, dtype=np.float64) * self.lam + self.lam_b * shift.astype(np.float64) ** 2).reshape(H, k).sum(1)
        return f, G, gc

    def losses(self, S: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``(rows, heads)`` loss of each row under each head (float64): softmax cross-entropy, or the one-vs-rest squared hinge summed over classes."""
        b, H = len(y), len(self.heads)
        S = S.reshape(b, H, self.k).astype(np.float64)
        if self.loss == "lr":
            top = S.max(2)
            return top + np.log(np.exp(S - top[:, :, None]).sum(2)) - S[np.arange(b), :, y]
        Y = np.full_like(S, -1.0)
        Y[np.arange(b), :, y] = 1.0
        return (np.maximum(0.0, 1.0 - Y * S) ** 2).sum(2)


class Subset:
    """Some heads of a trained engine, as ``polish`` takes an engine: their averaged weights copied out and polished apart (e.g. the one model kept)."""

    def __init__(self, engine, heads):
        idx = np.asarray(heads, np.int64)
        self.heads = Heads(engine.heads.C[idx], engine.heads.held_out[idx])
        self.n_rows, self.k, self.loss, self.pre = np.asarray(engine.n_rows)[idx], engine.k, engine.loss, engine.pre
        cols = (idx[:, None] * self.k + np.arange(self.k)).ravel()
        W, c = engine.averages()
        self.W, self.c = np.ascontiguousarray(W[:, cols]), c[cols].copy()

    def averages(self) -> tuple[np.ndarray, np.ndarray]:
        return self.W, self.c

    def set_averages(self, W: np.ndarray, c: np.ndarray) -> None:
        self.W, self.c = W, c

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """As ``Engine.weights``, for these heads."""
        return uncentred(self.W, self.c, self.pre.mu, len(self.heads), self.k)


class _Pairs:
    """Per-head L-BFGS memory: pairs ``(s, y, rho)``, with ``rho = 0`` for heads whose pair failed the curvature test (they skip it)."""

    def __init__(self, H: int, k: int):
        self.H, self.k, self.items = H, k, []

    def dot(self, a: tuple, b: tuple) -> np.ndarray:
        """Per-head inner products of two ``(dW, dc)`` pairs."""
        cols = np.einsum("ij,ij->j", a[0], b[0], dtype=np.float64) + a[1].astype(np.float64) * b[1]
        return cols.reshape(self.H, self.k).sum(1)

    def cols(self, per_head: np.ndarray) -> np.ndarray:
        return np.repeat(per_head, self.k).astype(np.float32)

    def add(self, s: tuple, y: tuple) -> np.ndarray:
        """Keep the pair; returns its per-head ``s.y`` (positive where it counts)."""
        sy = self.dot(s, y)
        rho = np.where(sy > 1e-12 * np.sqrt(self.dot(s, s) * self.dot(y, y)), 1.0 / np.where(sy > 0, sy, 1.0), 0.0)
        self.items = (self.items + [(s, y, rho)])[-MEMORY:]
        return sy

    def drop(self, heads: np.ndarray) -> None:
        """Forget the pairs of ``heads`` (a bool mask): their next direction is the preconditioned gradient."""
        for _, _, rho in self.items:
            rho[heads] = 0.0

    def direction(self, g: tuple, h0) -> tuple[np.ndarray, np.ndarray]:
        """``-H g`` per head by the two-loop recursion, ``h0`` the initial inverse Hessian."""
        qW, qc = g[0].copy(), g[1].copy()
        alphas = []
        for s, y, rho in reversed(self.items):
            a = rho * self.dot(s, (qW, qc))
            alphas.append(a)
            qW -= self.cols(a) * y[0]
            qc -= self.cols(a) * y[1]
        zW, zc = h0(qW, qc)
        for (s, y, rho), a in zip(self.items, reversed(alphas)):
            beta = rho * self.dot(y, (zW, zc))
            zW += self.cols(a - beta) * s[0]
            zc += self.cols(a - beta) * s[1]
        return -zW, -zc


def polish(engine, passes, max_passes: int, bar=None, rtol: float = RTOL) -> dict:
    """Run L-BFGS on every head of ``engine`` from its averaged weights, then store the result back (``engine.set_averages``).

    Args:
        engine: a trained ``Engine``, ``TFEngine`` or ``Subset``.
        passes: ``passes()`` yields one whole pass of ``(x, y, groups)`` scaled batches.
        max_passes: passes at most (the first evaluates the starting point).
        bar: a progress bar, advanced by one per pass.
        rtol: a head stops when a pass lowers its objective by less than this share of it.

    Returns:
        ``{"passes": passes read, "converged": heads that stopped on ``RTOL``}``.
    """
    objective = Objective(engine)
    V, shrink = engine.pre.V, engine.pre.shrink[:, None]
    H, k = len(engine.heads), engine.k
    pairs = _Pairs(H, k)
    gamma = objective.eta.copy()  # per column: the engine's first step, then s.y / y.y per head

    def h0(qW, qc):
        if V.shape[1]:
            qW = qW - V @ (shrink * (V.T @ qW))
        return gamma * qW, gamma * qc

    x = engine.averages()
    x = (np.array(x[0], np.float32), np.array(x[1], np.float32))
    f, *g = objective(*x, passes())
    used, done = 1, np.zeros(H, bool)
    step = np.ones(H)
    p = pairs.direction(tuple(g), h0)
    if bar is not None:
        bar.update(1)
    while used < max_passes and not done.all():
        slope = pairs.dot(tuple(g), p)
        bad = slope >= 0  # not a descent direction (numerically): restart those heads from the gradient
        if bad.any():
            pairs.drop(bad)
            p = pairs.direction(tuple(g), h0)
            slope = pairs.dot(tuple(g), p)
        move = pairs.cols(np.where(done, 0.0, step))
        trial = (x[0] + move * p[0], x[1] + move * p[1])
        ft, *gt = objective(*trial, passes())
        used += 1
        if bar is not None:
            bar.update(1)
        ok = ~done & (ft <= f + ARMIJO * step * slope)
        if ok.any():
            sel = pairs.cols(ok.astype(np.float64))
            s = (sel * (trial[0] - x[0]), sel * (trial[1] - x[1]))
            y = (sel * (gt[0] - g[0]), sel * (gt[1] - g[1]))
            sy = pairs.add(s, y)
            yy = pairs.dot(y, y)
            gamma = np.where(pairs.cols(ok & (sy > 0) & (yy > 0)) > 0, pairs.cols(sy / np.where(yy > 0, yy, 1.0)), gamma).astype(np.float32)
            done |= ok & (f - ft <= rtol * np.maximum(np.abs(f), 1e-12))
            x = (np.where(sel > 0, trial[0], x[0]), np.where(sel > 0, trial[1], x[1]))
            g = [np.where(sel > 0, gt[0], g[0]), np.where(sel > 0, gt[1], g[1])]
            f = np.where(ok, ft, f)
        fail = ~done & ~ok
        step = np.where(ok, 1.0, np.where(fail, step * 0.5, step))
        done |= fail & (step < 1e-6)  # no decrease along a descent direction: at the optimum to float32 precision
        p = pairs.direction(tuple(g), h0)
    engine.set_averages(*x)
    return {"passes": used, "converged": int(done.sum())}
