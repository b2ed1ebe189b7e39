"""Rows' coordinates in their span: the row-space basis (``Z = U s``, ``Z Z^T = X X^T``), weights lifted back to the features, and engine heads re-expressed on it for the polish.

With fewer rows ``n`` than features ``d``, an L2-penalised linear model's weights lie in the
span of the rows (the representer theorem; the rows' mean too lies in it), so fitting on ``Z``
(``n x r``, ``r <= n``) is fitting on ``X``: the same objective, at ``r/d`` of the arithmetic
per pass.
"""

from __future__ import annotations

import numpy as np

from pipeline.rows.engine import Preconditioner


def row_space(X: np.ndarray, rtol: float = 1e-9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates of the rows of ``X`` (n x d, n < d) in an orthonormal basis of their span.

    Returns ``(Z, U, s)`` with ``Z = U * s`` (n x r): ``Z @ Z.T == X @ X.T``, so any
    L2-penalised linear model fits the same on ``Z`` as on ``X``. The Gram matrix is
    accumulated in float64 over column blocks (no float64 copy of ``X``); directions
    with eigenvalue below ``rtol`` times the largest are dropped (numerically empty).
    """
    n, d = X.shape
    gram = np.zeros((n, n))
    step = max(16, (64 << 20) // (8 * max(n, 1)))
    for s in range(0, d, step):
        b = X[:, s : s + step].astype(np.float64)
        gram += b @ b.T
    lam, u = np.linalg.eigh(gram)
    keep = lam > max(lam[-1], 0.0) * rtol
    u, s = u[:, keep], np.sqrt(lam[keep])
    return u * s, u, s


def lift_coef(coef_z: np.ndarray, U: np.ndarray, s: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Map row-space weights back to the features: ``w = X.T @ U @ diag(1/s) @ a`` (k x d, float64)."""
    a = (coef_z / s) @ U.T  # (k, n)
    out = np.empty((len(coef_z), X.shape[1]))
    step = max(16, (64 << 20) // (8 * max(len(X), 1)))
    for c in range(0, X.shape[1], step):
        out[:, c : c + step] = a @ X[:, c : c + step].astype(np.float64)
    return out


class RowSpaceHeads:
    """Heads (an ``engine``, ``Subset``...) re-expressed on the row-space coordinates ``Z`` of in-memory scaled rows ``X``, as ``polish`` takes them.

    The weights ``W = Q B`` with ``Q = X^T U diag(1/s)`` (orthonormal, ``d x r``): ``X W = Z B`` and
    ``|W| = |B|``, so every head's objective is the same on ``(Z, B)``; the centred intercepts
    carry over as they are (the rows' mean is ``Q`` times ``Z``'s). ``lift`` maps ``B`` back.
    """

    def __init__(self, heads, X: np.ndarray):
        self.X = X
        Z, self.U, self.s = row_space(X)
        self.Z = np.ascontiguousarray(Z, np.float32)
        self.heads, self.n_rows, self.k, self.loss = heads.heads, heads.n_rows, heads.k, heads.loss
        self.pre = Preconditioner.from_sample(self.Z)
        W, c = heads.averages()
        self.W = ((self.U / self.s).T @ (X @ W).astype(np.float64)).astype(np.float32)  # Q^T W
        self.c = np.array(c, np.float32)

    def averages(self) -> tuple[np.ndarray, np.ndarray]:
        return self.W, self.c

    def set_averages(self, W: np.ndarray, c: np.ndarray) -> None:
        self.W, self.c = W, c

    def lift(self) -> tuple[np.ndarray, np.ndarray]:
        """The weights on the features, centred: ``W (d, heads*k)`` and ``c (heads*k,)``, float32 (for ``set_averages``)."""
        return lift_coef(self.W.T.astype(np.float64), self.U, self.s, self.X).T.astype(np.float32), self.c
