"""The cross-validated grid search: stratified folds in parallel threads, warm-start paths, convergence counted instead of printed."""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import numpy as np

from pipeline.rows.pooling import progress_bar
from pipeline.core.signals import stop_if_terminated
from pipeline.core.splits import fold_ids
from pipeline.classical.models import MODELS, ModelFamily


@dataclass
class SearchResult:
    """Outcome of a grid search: the best parameters and every candidate's scores."""

    best_params: dict
    best_score: float
    best_std: float
    results: list[dict]
    kind: str  # "cv", "holdout" or "none"
    convergence_warnings: int = 0


def candidates(family: ModelFamily, grid: dict[str, list]) -> list[list[dict]]:
    """Group the grid into warm-start paths: one path per combination of the other parameters, path parameter ascending."""
    from sklearn.model_selection import ParameterGrid

    path = family.path_param if family.path_param in grid else None
    others = {k: v for k, v in grid.items() if k != path}
    groups = []
    for fixed in ParameterGrid(others) if others else [{}]:
        if path:
            groups.append([{**fixed, path: v} for v in sorted(grid[path])])
        else:
            groups.append([dict(fixed)])
    return groups


def blas_limit(small: bool):
    """One BLAS thread for small matrices (a no-op context otherwise)."""
    # BLAS threads cost more than they save on small matrices (measured: 4x slower
    # lbfgs on 1000 x 1000 with two threads than with one).
    if not small:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def hit_max_iter(est) -> bool:
    """Whether a fit stopped at ``max_iter`` (what sklearn's ConvergenceWarning says, counted instead of printed)."""
    n_iter = getattr(est, "n_iter_", None)
    max_iter = est.get_params().get("max_iter")
    return n_iter is not None and max_iter is not None and int(np.max(n_iter)) >= max_iter


@contextlib.contextmanager
def quiet_convergence():
    """Silence scikit-learn's ConvergenceWarning (``hit_max_iter`` counts them for the metrics)."""
    # Installed by the calling thread around the whole search: warnings filters are
    # process-global, so the worker threads see it; the counts go to the metrics.
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        yield


def _fit_path(model: str, path: list[dict], X, y, train, test, seed: int, n_jobs: int, fixed: dict) -> tuple[list[float], int]:
    """Fit one warm-start path on one fold (``fixed``: the family's ``data_params``); return the held-out accuracy of each step and how many fits hit max_iter."""
    family = MODELS[model]
    est = family.build({**path[0], **fixed}, seed, n_jobs)
    if len(path) > 1 and "warm_start" in est.get_params():
        est.set_params(warm_start=True)
    x_fit, y_fit, x_val, y_val = X[train], y[train], X[test], y[test]
    scores, n_warn = [], 0
    for params in path:
        est.set_params(**params)
        est.fit(x_fit, y_fit)
        n_warn += hit_max_iter(est)
        scores.append(float(np.mean(est.predict(x_val) == y_val)))
    return scores, n_warn


def _outer_jobs(n_jobs: int) -> int:
    return (os.cpu_count() or 1) if n_jobs == -1 else n_jobs


def search(family: ModelFamily, X: np.ndarray, y: np.ndarray, grid: dict[str, list], *, cv: int, seed: int, n_jobs: int, quiet: bool,
           same: np.ndarray | None = None) -> SearchResult:
    """Stratified ``cv``-fold grid search by accuracy, folds in parallel, warm-start paths.

    Args:
        family: the model family.
        X, y: training rows (already scaled / in row space for linear models) and labels.
        grid: parameter -> candidate values.
        cv, seed: folds (``core.splits.fold_ids``: ``StratifiedKFold``, shuffled with ``seed``).
        same: per row, its group of identical images (kept in one fold), or None.
        n_jobs: parallel workers; ``rf`` parallelises inside the forest instead.
        quiet: no progress bar.

    Returns:
        The SearchResult (best = highest mean accuracy; ties go to the first candidate
        in path order, i.e. the smaller C or the fewer trees).
    """
    from joblib import Parallel, delayed
    fold = fold_ids(y, cv, seed, same)
    folds = [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(cv)]
    groups = candidates(family, grid)
    # A forest parallelises over trees (threads, no data copies); linear fits over folds.
    outer = 1 if not family.linear else _outer_jobs(n_jobs)
    inner = n_jobs if not family.linear else 1
    small = X.size <= 4_000_000
    fixed = family.data_params(X)
    tasks = [(f, g) for f in range(len(folds)) for g in range(len(groups))]
    scores: dict[tuple[int, int], list[float]] = {}
    n_warn = 0
    # Threads, not processes: the fits spend their time in BLAS/liblinear/tree code that
    # releases the GIL, and threads share X instead of copying it to each worker.
    with progress_bar(len(tasks), f"search {family.name}", quiet, unit="fit") as bar, blas_limit(small), quiet_convergence():
        runner = Parallel(n_jobs=min(outer, len(tasks)), backend="threading", return_as="generator")
        calls = (delayed(_fit_path)(family.name, groups[g], X, y, folds[f][0], folds[f][1], seed, inner, fixed) for f, g in tasks)
        for (f, g), (s, w) in zip(tasks, runner(calls)):
            stop_if_terminated()
            scores[f, g] = s
            n_warn += w
            bar.update(1)
    results = []
    for g, path in enumerate(groups):
        for step, params in enumerate(path):
            per_fold = [scores[f, g][step] for f in range(len(folds))]
            results.append({"params": params, "mean": float(np.mean(per_fold)), "std": float(np.std(per_fold)), "scores": per_fold})
    best = results[0]
    for r in results[1:]:
        if r["mean"] > best["mean"] + 1e-12:
            best = r
    return SearchResult(dict(best["params"]), best["mean"], best["std"], results, "cv", n_warn)
