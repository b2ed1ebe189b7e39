"""Pooled rows from a feature file: pooling, unit-RMS and standard scaling, and chunked or streamed reading of the pooled rows, refusing non-finite values as they are read."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from pipeline.core.signals import stop_if_terminated
from pipeline.core.errors import PipelineError
from pipeline.featurefile.store import FeatureFile

#: Pooling of a backbone's features into one row: ``train --pool`` and the head of ``finetune --pool``.
POOLS = ("flatten", "avg", "max")
SCALINGS = ("l2", "standard")


# ---------------------------------------------------------------------------
# Pooling


def pooled_dim(row_shape: tuple[int, ...], pool: str) -> int:
    """Length of one pooled row: ``h*w*c`` for ``flatten``, ``c`` for ``avg``/``max``."""
    if pool == "flatten":
        return int(np.prod(row_shape))
    if pool in ("avg", "max"):
        return int(row_shape[-1])
    raise PipelineError(f"pool {pool!r}: choose one of {', '.join(POOLS)}")


def pool_features(block: np.ndarray, pool: str) -> np.ndarray:
    """Pool ``(k, h, w, c)`` features into ``(k, d)`` float32 rows.

    ``flatten`` keeps every value (a view when the block is float32 and contiguous);
    ``avg``/``max`` reduce over the spatial axes, leaving one value per channel.

    Raises:
        PipelineError: unknown pooling.
    """
    block = np.asarray(block)
    if block.dtype != np.float32:
        block = block.astype(np.float32)
    k = len(block)
    if pool == "flatten":
        return block.reshape(k, -1)
    axes = tuple(range(1, block.ndim - 1))
    if pool == "avg":
        return block.mean(axis=axes, dtype=np.float32) if axes else block
    if pool == "max":
        return block.max(axis=axes) if axes else block
    raise PipelineError(f"pool {pool!r}: choose one of {', '.join(POOLS)}")


# ---------------------------------------------------------------------------
# Scaling


def unit_rms_(x: np.ndarray) -> np.ndarray:
    """Scale each row in place to unit RMS (L2 norm sqrt(d)); all-zero rows stay zero."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    factor = np.divide(np.sqrt(x.shape[1]), norms, out=np.zeros_like(norms), where=norms > 0)
    x *= factor.astype(np.float32)[:, None]
    return x


def make_scaler(scaling: str, d: int):
    """The stored scaling step: a ``Normalizer`` (unit norm; ``l2``) or an unfitted ``StandardScaler`` (``standard``)."""
    if scaling == "l2":
        from sklearn.preprocessing import Normalizer

        return Normalizer(norm="l2").fit(np.zeros((1, d), np.float32))
    from sklearn.preprocessing import StandardScaler

    return StandardScaler()


def scale_rows_(X: np.ndarray, scaling: str, scaler) -> None:
    """Scale training rows in place, in blocks of about 32 MB (temporaries stay block-sized).

    ``l2`` scales to unit RMS (the coefficients are folded back to unit norm later);
    ``standard`` applies the fitted ``scaler``'s mean and scale.
    """
    step = max(1, (32 << 20) // (4 * max(1, X.shape[1])))
    if scaling == "l2":
        for s in range(0, len(X), step):
            unit_rms_(X[s : s + step])
        return
    mean = scaler.mean_.astype(np.float32)
    inv = (1.0 / scaler.scale_).astype(np.float32)
    for s in range(0, len(X), step):
        blk = X[s : s + step]
        blk -= mean
        blk *= inv


def scale_batch(x: np.ndarray, scaling: str, scaler) -> np.ndarray:
    """Scale a freshly read batch (in place when it is already a float32 C-contiguous array)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    scale_rows_(x, scaling, scaler)
    return x


# ---------------------------------------------------------------------------
# Reading


def check_finite(ff: FeatureFile, block: np.ndarray, rows: np.ndarray) -> None:
    """Refuse a block of ``ff`` that holds NaN or an infinity; ``rows`` are its rows' indices in the file.

    Every reader below calls this on each chunk it reads, so the check costs no extra
    pass. Only when a bad value is found is the file read again up to that row, so the
    message names the first bad row of the file, whichever chunk was read first.

    Raises:
        PipelineError: ``FILE: row N (image 'PATH') holds a non-finite feature value ...``.
    """
    if np.isfinite(block).all():
        return
    row = first_non_finite_row(ff, int(rows[_first_bad(block)]))
    raw = ff.db["paths"][row]
    image = os.fsdecode(raw) if isinstance(raw, bytes) else str(raw)
    raise PipelineError(
        f"{ff.path}: row {row} (image {image!r}) holds a non-finite feature value (NaN or infinity); "
        "no model can be trained or scored on it: re-extract the file (verify reports such rows)"
    )


def _first_bad(block: np.ndarray) -> int:
    return int(np.argmin(np.isfinite(block.reshape(len(block), -1)).all(axis=1)))


def first_non_finite_row(ff: FeatureFile, found: int) -> int:
    """The first row of ``ff`` with a non-finite value, given that row ``found`` has one (reads rows before ``found`` only)."""
    for start, block in ff.iter_chunks():
        if start > found:
            break
        if not np.isfinite(block).all():
            return min(found, start + _first_bad(block))
    return found


def progress_bar(total: int, desc: str, quiet: bool, unit: str = "row"):
    """A tqdm bar on stderr that leaves no line behind (disabled when ``quiet``)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, dynamic_ncols=True, leave=False)


def read_groups(ff: FeatureFile, groups: list[np.ndarray], pool: str, scaler=None, quiet: bool = True) -> list[np.ndarray]:
    """One sequential pass over ``ff``: the pooled float32 rows of each group of row indices, in the group's order.

    A group may list its rows in any order (e.g. by path, ``core.splits.canonical_order``):
    each pooled row is written straight to its place, so no reordering copy is made.
    ``scaler.partial_fit`` sees the rows of the first group chunk by chunk, in file order
    (its float64 temporaries stay chunk-sized).
    """
    d = pooled_dim(ff.row_shape, pool)
    outs = [np.empty((len(g), d), np.float32) for g in groups]
    orders = [np.argsort(g, kind="stable") for g in groups]
    ranked = [np.asarray(g)[o] for g, o in zip(groups, orders)]
    with progress_bar(len(ff), f"read {ff.path.name}", quiet) as bar:
        for start, block in ff.iter_chunks():
            stop_if_terminated()
            stop = start + len(block)
            check_finite(ff, block, np.arange(start, stop))
            pooled = pool_features(block, pool)
            for i, (g, o, out) in enumerate(zip(ranked, orders, outs)):
                lo, hi = np.searchsorted(g, [start, stop])
                if hi > lo:
                    out[o[lo:hi]] = pooled[g[lo:hi] - start]
                    if i == 0 and scaler is not None:
                        scaler.partial_fit(out[o[lo:hi]])
            bar.update(len(block))
    return outs


def stream_rows(ff: FeatureFile, rows: np.ndarray, pool: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(row indices, pooled float32 block)`` for sorted ``rows``, in file order (non-finite values refused)."""
    for start, block in ff.iter_chunks(indices=rows):
        stop_if_terminated()
        got = rows[start : start + len(block)]
        check_finite(ff, block, got)
        yield got, pool_features(block, pool)
