"""Streaming the linear models: feature-file chunks read and decompressed on a thread pool ahead of the math, batches of random chunks, and the engine's search over them (out of core) or over an in-memory matrix.

Out of core, every C learns from the same batches, at least twice: heads that each leave out a
group of rows, to choose C, and a head on every row, which is the model kept for the chosen C:
no second streaming fit. On small files, where the polish runs (``polish.passes_for``), the
groups are the in-memory search's ``cv`` folds and the fold heads are polished before they
are scored, so C is chosen as in memory. On large files one hold-out share (``1/cv`` of the
training rows of each class) is scored with the SGD heads, a pass over the chunks holding
them (about the whole file). In memory, the heads are every (C, fold) of a ``cv``-fold search
plus one head per C on every row, so the search costs ``epochs`` passes over the matrix
whatever the grid, linear in the rows.

Row order: the folds and the hold-out share are drawn from the training rows in path order
(``row_groups``), so they are the same rows whatever order the file stores them in. What the
SGD sees is not: a batch is a run of whole stored chunks, and the preconditioner's sample a
few stored chunks, so another storage order gives other batches and another SGD path (to
read single rows at random would decompress a chunk per row). Where the polish runs, it
brings each head to its optimum and the choice of C back to the in-memory one.
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline.rows.engine import SAMPLE_ROWS, Heads, Preconditioner
from pipeline.rows.pooling import check_finite, pool_features, pooled_dim, progress_bar, scale_batch
from pipeline.core.signals import stop_if_terminated
from pipeline.core.errors import PipelineError
from pipeline.core.splits import fold_ids, split_indices
from pipeline.featurefile.chunks import decompress, layout_of, threads
from pipeline.featurefile.store import FeatureFile

#: Rows per step: about 100 steps over all epochs, within these bounds (CPU; a GPU takes larger batches).
BATCH_ROWS = {"cpu": (128, 2048), "gpu": (512, 8192)}


class ChunkReader:
    """The chunks of a feature file, read and decompressed on a thread pool ahead of their use (zlib releases the GIL).

    Chunks stored as plain gzip blocks of whole rows are read raw (in the calling thread)
    and decompressed off the HDF5 library; other layouts (merged files, other filters) are
    read through h5py, which serialises them (``direct`` says which). The workers also
    check, pool and ``transform`` (e.g. scale) each chunk's rows.
    """

    def __init__(self, ff: FeatureFile, pool: str, workers: int | None = None, transform=None):
        self.ff, self.pool, self.ds, self.transform = ff, pool, ff.db["features"], transform
        self.layout = layout_of(self.ds)
        self.direct = self.layout is not None
        self.step = ff.chunk_rows()
        self.workers = workers or threads()

    def _raw(self, start: int):
        """The chunk's stored bytes (read here, in the calling thread: HDF5 calls stay in one thread), or its rows."""
        count = min(self.step, len(self.ff) - start)
        if self.direct:
            mask, data = self.ds.id.read_direct_chunk((start,) + (0,) * (self.ds.ndim - 1))
            return start, count, mask, data
        return start, count, None, self.ds[start : start + count]

    def _load(self, start: int, count: int, mask, data, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if mask is None:
            raw = data
        elif mask & 1:  # the deflate filter was skipped for this chunk: stored as it is
            raw = np.frombuffer(data, self.layout.dtype).reshape(self.layout.chunk_shape)[:count]
        else:
            raw = decompress(data, self.layout, count)
        sel = keep[start : start + count]
        rows = start + np.flatnonzero(sel)
        block = raw[sel]
        check_finite(self.ff, block, rows)
        x = pool_features(block, self.pool)
        return rows, x if self.transform is None else self.transform(x)

    def blocks(self, starts, keep: np.ndarray):
        """``(row indices, pooled float32 rows)`` of the rows in ``keep``, chunk by chunk in the order of ``starts``."""
        ex = ThreadPoolExecutor(self.workers, thread_name_prefix="read")
        window: collections.deque = collections.deque()
        try:
            for s in starts:
                window.append(ex.submit(self._load, *self._raw(int(s)), keep))
                while len(window) > 2 * self.workers:
                    stop_if_terminated()
                    yield window.popleft().result()
            while window:
                stop_if_terminated()
                yield window.popleft().result()
        finally:
            ex.shutdown(wait=True, cancel_futures=True)


def batch_rows(n: int, epochs: int, chunk: int, device: str, cap_rows: int | None = None) -> int:
    """Rows per step: about 100 steps in all, within ``BATCH_ROWS[device]``, at most ``cap_rows`` but no fewer than the lower bound, in whole chunks."""
    lo, hi = BATCH_ROWS[device]
    b = int(np.clip(n * epochs // 100, lo, hi))
    if cap_rows is not None:
        b = max(lo, min(b, cap_rows))  # smaller batches: noisier steps, and the fixed cost of a step (the preconditioner) dominates
    return max(chunk, -(-b // chunk) * chunk)


def chunk_starts(rows: np.ndarray, step: int) -> np.ndarray:
    return np.unique(rows // step) * step


def row_groups(train_rows: np.ndarray, labels: np.ndarray, size: int, kind: str, cv: int, seed: int, same: np.ndarray | None = None) -> np.ndarray:
    """Per row of a file of ``size`` rows, the group a head may leave out: ``kind`` ``cv``, its fold (``cv_folds``); ``holdout``, 0 for
    the hold-out share (``1/cv`` of ``train_rows`` per class, ``core.splits.split_indices``) and 1 elsewhere; ``none``, 1 everywhere.

    Rows, not chunks: which rows share a chunk depends on the order the file stores them in, and
    ``train_rows`` come in path order (``classical.train.plan_fit``), so the groups are a function of
    the set of rows. Rows outside ``train_rows`` get ``cv`` (``cv`` kind) or 1.
    """
    if kind == "cv":
        return cv_folds(train_rows, labels, size, cv, seed, same)
    group = np.ones(size, np.int64)
    if kind == "holdout":
        group[train_rows[split_indices(labels[train_rows], 1.0 / cv, seed, groups=None if same is None else same[train_rows])[1]]] = 0
    return group


def train_engine(engine, batches, epochs: int, n: int, desc: str, quiet: bool) -> None:
    """``epochs`` passes: ``batches(epoch)`` yields ``(x, y, groups)``; the bar shows rows/s and the epoch."""
    with progress_bar(n * epochs, desc, quiet) as bar:
        for e in range(epochs):
            bar.set_description(f"{desc}, epoch {e + 1}/{epochs}")
            for x, y, g in batches(e):
                stop_if_terminated()
                engine.step(x, y, g)
                bar.update(len(y))


def polish_stream(engine, heads, passes, n: int, quiet: bool, desc: str, rows=None) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """``polish.polish`` of ``engine``'s ``heads`` (a list) on whole passes of the rows, as many as ``polish.passes_for`` allows (none on large files).

    ``rows``: ``(x, y, groups)``, every training row when they are in memory already; with fewer rows
    than features the polish then runs on their row-space coordinates (``span.RowSpaceHeads``).

    Returns:
        ``((coef (h, k, d), intercept (h, k)), stats)``: the heads' models on uncentred scaled rows, and the polish's passes.
    """
    from pipeline.rows.polish import ROW_SPACE_PASSES, ROW_SPACE_RTOL, Subset, passes_for, polish
    from pipeline.rows.span import RowSpaceHeads

    sub = Subset(engine, heads)
    d = len(engine.pre.mu)
    stats = {"passes": 0, "converged": 0}
    if rows is not None and 2 * n <= d and passes_for(n, d):
        span = RowSpaceHeads(sub, rows[0])
        budget = passes_for(n, span.Z.shape[1], cap=ROW_SPACE_PASSES)
        with progress_bar(budget, desc + " in row space", quiet, unit="pass") as bar:
            stats = polish(span, lambda: [(span.Z, rows[1], rows[2])], budget, bar, ROW_SPACE_RTOL)
        sub.set_averages(*span.lift())
        stats["row_space"] = int(span.Z.shape[1])
    elif passes_for(n, d):
        budget = passes_for(n, d)
        with progress_bar(budget, desc, quiet, unit="pass") as bar:
            stats = polish(sub, passes, budget, bar)
    return sub.weights(), stats


def cv_folds(train_rows: np.ndarray, labels: np.ndarray, size: int, cv: int, seed: int, same: np.ndarray | None = None) -> np.ndarray:
    """Per row of a file of ``size`` rows, its fold among ``train_rows`` (``cv`` elsewhere): the in-memory search's folds
    (``core.splits.fold_ids`` over ``labels[train_rows]``, in that order: the plan's path order; ``same``, per row of the file,
    its group of identical images, kept in one fold), so both fits choose C on the same rows."""
    fold = np.full(size, cv, np.int64)
    fold[train_rows] = fold_ids(labels[train_rows], cv, seed, None if same is None else same[train_rows])
    return fold


def fold_scores(coef: np.ndarray, intercept: np.ndarray, held_out: np.ndarray, passes, k: int) -> np.ndarray:
    """Accuracy of each head on the rows of the group it held out, over one pass of ``(x, y, groups)`` batches."""
    from pipeline.rows.engine import decisions, stacked

    W, c = stacked(coef, intercept)
    correct, total = np.zeros(len(held_out)), np.zeros(len(held_out))
    for x, y, g in passes:
        stop_if_terminated()
        mine = g[:, None] == held_out[None, :]
        correct += np.sum((decisions(W, c, x, k).argmax(2) == y[:, None]) & mine, axis=0)
        total += mine.sum(0)
    return correct / np.maximum(total, 1)


def search_stream(ff: FeatureFile, train_rows: np.ndarray, labels: np.ndarray, Cs: list[float], *, loss: str, pool: str, scaling: str, scaler,
                  cv: int, seed: int, epochs: int, quiet: bool, budget_rows: int, backend: str, same: np.ndarray | None = None) -> dict:  # fmt: skip
    """Out of core: the scaler pass (``standard``), a preconditioner sample, ``epochs`` passes training every head, the C choice, the kept model's polish.

    Where the polish runs (small files, ``polish.passes_for``) and there are several C, they are
    chosen as in memory: a head per (C, fold) of the in-memory search's ``cv`` folds, polished,
    scored on its fold, C by the mean over folds. Elsewhere (large files) on one hold-out share
    of ``1/cv`` of the training rows, scored with the SGD heads (a pass over the chunks holding them).
    ``train_rows`` in path order (the plan's): the folds and the share are then the same rows whatever the storage order.
    ``same``: per row of ``ff``, its group of identical images (kept in one fold, on one side of the share), or None.

    Returns:
        dict with ``coef``/``intercept`` (the full head of the chosen C, on scaled rows),
        ``C``, ``n``, ``classes``, ``results`` (per C its fold or hold-out accuracy, or None for one C),
        ``kind`` (``cv``, ``holdout`` or ``none``) and ``space`` (what ran).

    Raises:
        PipelineError: several C values but no training row in the hold-out chunks, or fewer rows of a class than ``cv``.
    """
    from pipeline.rows.device import make_engine
    from pipeline.rows.polish import passes_for

    reader = ChunkReader(ff, pool)
    step, n = reader.step, len(train_rows)
    classes = np.unique(labels[train_rows])
    y_all = np.searchsorted(classes, labels)
    keep = np.zeros(len(ff), bool)
    keep[train_rows] = True
    starts = chunk_starts(train_rows, step)
    rng = np.random.default_rng([seed, 1])
    kind = "none" if len(Cs) == 1 else "cv" if passes_for(n, pooled_dim(ff.row_shape, pool)) else "holdout"
    lead = train_rows if same is None else train_rows[np.unique(same[train_rows], return_index=True)[1]]  # one row per group of identical images
    distinct = np.bincount(y_all[lead], minlength=len(classes))
    if kind == "cv" and distinct.min() < cv:  # as in memory (``plan_fit``): every class in every fold, each group of twins in one
        worst = int(np.argmin(distinct))
        raise PipelineError(f"{ff.path}: class {ff.label_names[int(classes[worst])]!r} has {distinct[worst]} distinct training images but --cv {cv} "
                            f"needs at least {cv} per class for the C search; lower --cv, pass a single --C, or add rows")  # fmt: skip
    group = row_groups(train_rows, labels, len(ff), kind, cv, seed, same)
    n_val = 0
    if kind == "cv":
        heads = Heads.grid(Cs, cv)
    elif kind == "holdout":
        val_starts = chunk_starts(train_rows[group[train_rows] == 0], step)  # about every chunk: the share is of rows
        n_val = int(np.sum(keep & (group == 0)))
        if n_val == 0 or n_val == n:
            raise PipelineError(f"{ff.path}: too few training rows ({n}) to hold out a validation share for the C search; pass a single --C")
        heads = Heads.grid(Cs, 1)
    else:
        heads = Heads.grid(Cs, 0)
    n_rows = np.array([n if g < 0 else int(np.sum(keep & (group != g))) for g in heads.held_out])
    if scaling == "standard":
        with progress_bar(n, "fit scaler", quiet) as bar:
            for _, x in reader.blocks(starts, keep):
                scaler.partial_fit(x)
                bar.update(len(x))
    sample = [(r, scale_batch(x, scaling, scaler)) for r, x in reader.blocks(rng.permutation(starts)[: -(-SAMPLE_ROWS // step)], keep)]
    pre = Preconditioner.from_sample(np.concatenate([x for _, x in sample])[:SAMPLE_ROWS])
    reader.transform = lambda x: scale_batch(x, scaling, scaler)  # rows are scaled in the workers from here on
    engine, device = make_engine(backend, ff.row_shape, pool, len(classes), heads, n_rows, loss, pre)
    b = batch_rows(n, epochs, step, device, budget_rows)
    engine.plan(epochs * -(-n // b), -(-n // b) if epochs > 1 else 0)
    sample_streamed = sum(len(r) for r, _ in sample) < n
    if sample_streamed:
        del sample  # a share of the rows: the polish streams them

        def passes():
            return _batches(reader.blocks(starts, keep), b, y_all, group)
    else:  # every row is in the preconditioner's sample already (at most SAMPLE_ROWS): the polish reads nothing
        xs = _batch(sample, y_all, group)
        del sample

        def passes():
            return [xs]

    rows = None if sample_streamed else xs

    def batches(epoch):
        return _batches(reader.blocks(rng.permutation(starts), keep), b, y_all, group)

    t0 = time.perf_counter()
    train_engine(engine, batches, epochs, n, f"fit {loss} ({len(heads)} models)", quiet)
    t_sgd = time.perf_counter() - t0
    nC, folds_polished, results = len(Cs), 0, None
    if kind == "cv":
        # The in-memory search's choice: each (C, fold) head polished to its optimum, scored on its fold (measured, issue 24: SGD heads
        # on one hold-out share favoured the smallest C, 1.4 points below the in-memory fit on the default data).
        (coef, intercept), stats = polish_stream(engine, list(range(cv * nC)), passes, n, quiet, f"polish {loss} ({cv * nC} fold models)", rows)
        folds_polished = stats["passes"]
        scores = fold_scores(coef, intercept, heads.held_out[: cv * nC], passes(), len(classes)).reshape(cv, nC)
        mean = scores.mean(0)
        best = int(np.argmax(mean))  # the first maximum: the smaller C on ties
        results = [{"params": {"C": C}, "mean": float(mean[i]), "std": float(scores[:, i].std()), "scores": scores[:, i].tolist()} for i, C in enumerate(Cs)]
    elif kind == "holdout":
        coef, intercept = engine.weights()
        # Batches, not chunks: a 16-row product on two BLAS threads next to the reader's costs ten times one thread's (measured).
        acc = fold_scores(coef[:nC], intercept[:nC], heads.held_out[:nC], _batches(reader.blocks(val_starts, keep & (group == 0)), b, y_all, group), len(classes))
        best = int(np.argmax(acc))
        results = [{"params": {"C": C}, "mean": float(a), "std": 0.0, "scores": [float(a)]} for C, a in zip(Cs, acc)]
    else:
        best = 0
    full = len(heads) - nC + best
    (coef, intercept), polished = polish_stream(engine, [full], passes, n, quiet, f"polish {loss} (C={Cs[best]:g})", rows)
    space = {"kind": "engine-stream", "dims": int(coef.shape[2]), "epochs": epochs, "batch_rows": b, "models": len(heads), "device": device,
             "reader": "direct-chunks" if reader.direct else "h5py", "workers": reader.workers, "rank": int(pre.V.shape[1]),
             "holdout_rows": n_val, "folds": cv if kind == "cv" else 0, "fold_polish_passes": folds_polished, "polish_passes": polished["passes"], "polish_row_space": polished.get("row_space", 0),
             "sgd_seconds": round(t_sgd, 3), "train_seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    return {"coef": coef[0], "intercept": intercept[0], "C": Cs[best], "n": n, "classes": classes, "results": results, "kind": kind, "space": space}


def _batches(blocks, b: int, y_all, group):
    """``(rows, labels, groups)`` of at least ``b`` rows (the last may be short) from ``ChunkReader.blocks``."""
    xs, held = [], 0
    for rows, x in blocks:
        xs.append((rows, x))
        held += len(rows)
        if held >= b:
            yield _batch(xs, y_all, group)
            xs, held = [], 0
    if held:
        yield _batch(xs, y_all, group)


def _batch(xs, y_all, group):
    rows = np.concatenate([r for r, _ in xs])
    return np.concatenate([x for _, x in xs]), y_all[rows], group[rows]


def search_matrix(X: np.ndarray, y: np.ndarray, Cs: list[float], *, loss: str, cv: int, seed: int, epochs: int, quiet: bool, backend: str,
                  same: np.ndarray | None = None) -> dict:  # fmt: skip
    """In memory: every (C, fold) head and one full head per C, trained on the scaled rows ``X`` in ``epochs`` shuffled passes
    (``same``: per row, its group of identical images, kept in one fold).

    Returns:
        dict as ``search_stream``'s, ``results`` holding each C's fold scores.
    """
    from pipeline.rows.device import make_engine
    from pipeline.rows.engine import decisions, stacked

    n, d = X.shape
    classes = np.unique(y)
    yi = np.searchsorted(classes, y)
    fold = fold_ids(yi, cv, seed, same)
    heads = Heads.grid(Cs, cv)
    n_rows = np.array([n if g < 0 else int(np.sum(fold != g)) for g in heads.held_out])
    rng = np.random.default_rng([seed, 1])
    pre = Preconditioner.from_sample(X[np.sort(rng.permutation(n)[:SAMPLE_ROWS])])
    engine, device = make_engine(backend, (d,), "flatten", len(classes), heads, n_rows, loss, pre)
    b = batch_rows(n, epochs, 1, device)
    engine.plan(epochs * -(-n // b), -(-n // b) if epochs > 1 else 0)

    def batches(epoch):
        order = rng.permutation(n)
        for s in range(0, n, b):
            sel = np.sort(order[s : s + b])
            yield X[sel], yi[sel], fold[sel]

    train_engine(engine, batches, epochs, n, f"search {loss} ({len(heads)} models)", quiet)
    coef, intercept = engine.weights()
    scores = np.zeros((cv, len(Cs)))
    for f in range(cv):
        rows = np.flatnonzero(fold == f)
        W, c = stacked(coef[f * len(Cs) : (f + 1) * len(Cs)], intercept[f * len(Cs) : (f + 1) * len(Cs)])
        for s in range(0, len(rows), 2048):
            r = rows[s : s + 2048]
            scores[f] += np.sum(decisions(W, c, X[r], len(classes)).argmax(2) == yi[r][:, None], axis=0)
        scores[f] /= len(rows)
    mean = scores.mean(0)
    best = int(np.argmax(mean))
    results = [{"params": {"C": C}, "mean": float(mean[i]), "std": float(scores[:, i].std()), "scores": scores[:, i].tolist()} for i, C in enumerate(Cs)]
    full = len(heads) - len(Cs) + best
    space = {"kind": "engine", "dims": d, "epochs": epochs, "batch_rows": b, "models": len(heads), "device": device, "rank": int(pre.V.shape[1])}
    return {"coef": coef[full], "intercept": intercept[full], "C": Cs[best], "n": n, "classes": classes, "results": results, "space": space}
