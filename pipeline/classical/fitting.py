"""Fitting a model family on pooled rows: in memory (row space, scale folding, or the engine above a size) or out of core (the engine on a stream); the fitted estimator takes unscaled pooled rows.

How the linear models (``lr``, ``svm``) are fitted, and why:

* Scaling. By default every pooled row is scaled to unit RMS (L2 norm ``sqrt(d)``):
  stateless, so nothing is fitted on the training rows and cross-validation cannot leak.
  On VGG16 features it beat ``StandardScaler`` (which blows up rarely-active ReLU
  channels) in cross-validation for every pooling, and the same ``--C`` grid fits
  every pooling. ``--scaling standard`` uses a ``StandardScaler`` instead (fitted chunk
  by chunk with ``partial_fit``, never on a float64 copy of the matrix). ``--C`` refers
  to the scaled rows; the stored pipeline is ``Normalizer`` (unit norm) + classifier,
  with the ``sqrt(d)`` folded into the coefficients (and ``C``/``alpha``).
* Row space, up to ``ROW_SPACE_MAX_ROWS`` rows. With fewer training rows ``n`` than
  features ``d``, an L2-penalised linear model's weights lie in the span of the rows
  (representer theorem), so the search fits on ``Z = U sqrt(L)`` (``n x n``, from the
  eigendecomposition of the Gram matrix): the same models as on ``X`` (exact, lbfgs or
  liblinear), mapped back to the ``d`` features. Its cost grows as ``n^2 d`` (the Gram
  matrix), ``n^3`` (its eigendecomposition) and ``n^2`` per solver iteration, with more
  iterations for the weakly regularised C as ``n`` grows.
* The engine, above that (``engine``, ``stream``): every (C, fold) candidate and one model
  per C on all rows, stacked in one weight matrix and trained together by preconditioned
  minibatch SGD in ``epochs`` passes: cost linear in the rows, whatever the grid.
* Memory. ``--memory-budget`` bounds the float32 training matrix. In memory, expect a
  peak of about twice that (the test rows, fold copies, the row-space Gram matrix);
  no float64 copy of the matrix is made.
* Out of core. When the float32 training matrix exceeds ``--memory-budget``, ``lr``/``svm``
  are fitted by the engine on batches of random chunks, read and decompressed on a
  thread pool ahead of the math (``stream``): every C on the rows outside each group held
  out, scored on those, and on every row; the latter is the model kept. Small files (where
  ``polish`` runs) hold out the in-memory search's ``cv`` folds and score polished models,
  as in memory; large ones hold out ``1/cv`` of the rows once. Batches take at
  most a quarter of the budget; the models, the preconditioner and a sample of
  ``engine.SAMPLE_ROWS`` rows do not grow with the rows. ``rf`` cannot be streamed: the
  train stage refuses it with a message asking for ``--pool avg``/``max`` or a larger
  budget (a silent subsample would change the result without saying so).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from pipeline.rows.engine import classifier
from pipeline.rows.span import lift_coef, row_space
from pipeline.rows.pooling import make_scaler, pooled_dim, read_groups, scale_rows_, stream_rows
from pipeline.core.signals import stop_if_terminated
from pipeline.classical.models import MODELS
from pipeline.classical.search import SearchResult, blas_limit, hit_max_iter, quiet_convergence, search
from pipeline.rows.stream import search_matrix, search_stream
from pipeline.featurefile.store import FeatureFile

#: Above this many training rows the in-memory search runs on the engine (measured: see ``bench --train``).
ROW_SPACE_MAX_ROWS = 2048

# ---------------------------------------------------------------------------
# Linear-model helpers: row space and scale folding


def _set_input_dim(clf, coef: np.ndarray) -> None:
    clf.coef_ = np.ascontiguousarray(coef)
    clf.n_features_in_ = coef.shape[1]


def fold_unit_rms(clf, d: int) -> None:
    """Turn a classifier fitted on unit-RMS rows into one for unit-norm rows (what ``Normalizer`` gives)."""
    clf.coef_ = clf.coef_ * np.sqrt(d)
    params = clf.get_params()
    # Same objective on the rescaled rows: C grows with the squared scale, alpha shrinks.
    if "C" in params:
        clf.set_params(C=params["C"] * d)
    elif "alpha" in params:
        clf.set_params(alpha=params["alpha"] / d)


def scale_note(estimator, best_params: dict) -> str:
    """What the summary adds when the saved estimator's C differs from the search's: the same model, its C restated for unit-norm rows (``fold_unit_rms``)."""
    clf = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    saved = clf.get_params().get("C")
    if "C" not in best_params or saved is None or saved == best_params["C"]:
        return ""
    return f" (searched on unit-RMS rows; the saved estimator holds the same model as C={saved:g} on unit-norm rows)"


def _pipeline(prep, clf):
    from sklearn.pipeline import Pipeline

    return Pipeline([("scale", prep), ("clf", clf)] if prep is not None else [("clf", clf)])


# ---------------------------------------------------------------------------
# In memory


@dataclass
class Fitted:
    """A fitted estimator (pooled features in, labels out) and how it was found."""

    estimator: object
    search: SearchResult
    mode: str
    space: dict
    fit_seconds: float
    read_seconds: float


def fit_matrix(
    X: np.ndarray,
    y: np.ndarray,
    *,
    model: str = "lr",
    grid: dict | None = None,
    scaling: str = "l2",
    cv: int = 3,
    seed: int = 0,
    n_jobs: int = 2,
    quiet: bool = True,
    scaler=None,
    memory_budget_mb: float = 2048,
    epochs: int = 5,
    backend: str = "auto",
    row_space_max_rows: int = ROW_SPACE_MAX_ROWS,
    same: np.ndarray | None = None,
) -> tuple[object, SearchResult, dict]:
    """Search and fit ``model`` on an in-memory matrix of pooled features.

    Args:
        X: float32 pooled training rows (n x d). Linear models scale it IN PLACE
            (pass a copy to keep it); no float64 copy of it is ever made.
        y: integer labels.
        model: a key of ``MODELS``.
        grid: full search grid (default: the model's default grid).
        scaling: ``l2`` or ``standard`` (linear models only).
        cv, seed, n_jobs, quiet: as in the train stage's config.
        scaler: for ``standard``, a StandardScaler already fitted on ``X`` (e.g. chunk by
            chunk while reading); fitted here, chunk by chunk, when None.
        memory_budget_mb: the row-space search is used when ``n <= d/2``, ``n <=
            row_space_max_rows`` and its ``n x n`` float64 Gram matrix fits in this budget.
        epochs, backend: the engine's passes and device (``device.BACKENDS``), for linear
            models above ``row_space_max_rows`` rows (``bench --train`` raises it to time
            the exact search on more rows).
        same: per row, its group of identical images, kept in one fold of the search (None: every row distinct).

    Returns:
        ``(estimator, search result, space)``: the estimator takes unscaled pooled rows
        (a Pipeline: scaling + classifier); ``space`` says where the search ran
        (``features``, ``row-space`` or ``engine``, and its dimension).
    """
    family = MODELS[model]
    grid = {k: list(v) for k, v in (grid or family.grid).items()}
    n, d = X.shape
    space = {"kind": "features", "dims": d}
    if not family.linear:
        result = search(family, X, y, grid, cv=cv, seed=seed, n_jobs=n_jobs, quiet=quiet, same=same)
        stop_if_terminated()
        clf = family.build(result.best_params, seed, n_jobs).fit(X, y)
        return _pipeline(None, clf), result, space
    if scaling == "standard" and scaler is None:
        scaler = make_scaler("standard", d)
        step = min(1024, max(1, (64 << 20) // (8 * d)))  # float64 temporaries of at most 64 MB
        for s0 in range(0, n, step):
            scaler.partial_fit(X[s0 : s0 + step])
    prep = scaler if scaling == "standard" else make_scaler("l2", d)
    scale_rows_(X, scaling, prep)
    if n and not X.any():  # a random backbone at a small input size gave nothing (mobilenetv2, --weights none, 32 px)
        print("warning: every feature value of the training rows is 0: the model can only predict its most frequent class", file=sys.stderr)
    if n > row_space_max_rows:
        fit = search_matrix(X, y, sorted(grid["C"]), loss=model, cv=cv, seed=seed, epochs=epochs, quiet=quiet, backend=backend, same=same)
        return _pipeline(prep, _engine_model(fit, model, scaling, d)), _engine_result(fit, "cv"), fit["space"]
    use_row_space = n <= d // 2 and 8 * n * n <= memory_budget_mb * (1 << 20)
    if use_row_space:
        Z, U, sv = row_space(X)
        space = {"kind": "row-space", "dims": int(Z.shape[1])}
        use_row_space = Z.shape[1] > 0  # rows all zero span nothing (an empty matrix was a scikit-learn traceback): fitted on the rows
    if not use_row_space:
        Z, space = X, {"kind": "features", "dims": d}
    result = search(family, Z, y, grid, cv=cv, seed=seed, n_jobs=n_jobs, quiet=quiet, same=same)
    stop_if_terminated()
    clf = family.build({**result.best_params, **family.data_params(Z)}, seed, 1)
    with blas_limit(Z.size <= 4_000_000), quiet_convergence():
        clf.fit(Z, y)
    result.convergence_warnings += hit_max_iter(clf)
    if use_row_space:
        _set_input_dim(clf, lift_coef(clf.coef_, U, sv, X))
    if scaling == "l2":
        fold_unit_rms(clf, d)
    return _pipeline(prep, clf), result, space


def _engine_model(fit: dict, model: str, scaling: str, d: int):
    clf = classifier(model, fit["coef"], fit["intercept"], fit["classes"], fit["C"], fit["n"])
    if scaling == "l2":
        fold_unit_rms(clf, d)
    return clf


def _engine_result(fit: dict, kind: str) -> SearchResult:
    if fit["results"] is None:
        return SearchResult({"C": fit["C"]}, float("nan"), float("nan"), [], "none")
    best = next(r for r in fit["results"] if r["params"]["C"] == fit["C"])
    return SearchResult({"C": fit["C"]}, best["mean"], best["std"], fit["results"], kind)


@dataclass(frozen=True)
class FitSettings:
    """The keywords both fits of a feature file take (``fit_in_memory``, ``fit_out_of_core``), as in the train stage's config.

    Attributes:
        model, pool, scaling, cv, seed, quiet: the family, pooling, scaling, folds (out of core on
            large files, ``1/cv`` of the rows held out once), seed and silence.
        memory_budget_mb: as ``fit_matrix``'s (in memory) or the bound on a batch (out of core).
        epochs: the engine's passes.
        n_jobs: parallel fits of the in-memory search (out of core: unused).
        backend: the engine's device (``device.BACKENDS``; out of core).
    """

    model: str
    pool: str
    scaling: str
    cv: int
    seed: int
    quiet: bool
    memory_budget_mb: float
    epochs: int = 5
    n_jobs: int = 2
    backend: str = "auto"


def fit_in_memory(ff: FeatureFile, train_rows: np.ndarray, extra_groups: list[np.ndarray], labels: np.ndarray, grid: dict, same: np.ndarray | None = None,
                  **settings) -> tuple[Fitted, list[np.ndarray]]:  # fmt: skip
    """Read the training rows (and ``extra_groups`` of the same file) in one pass, then ``fit_matrix``; ``settings``: ``FitSettings``'s fields.

    ``same``: per row of ``ff``, its group of identical images (kept in one fold of the search), or None.

    The matrix holds the rows in the order of ``train_rows`` (the plan's path order), and
    everything order-sensitive (the standard scaler's blocks, the folds, the solvers, the
    engine's shuffles) runs on it, so the fit does not depend on the order ``ff`` stores them in.

    Returns:
        ``(fitted, extras)``: the Fitted model and the pooled rows of each extra group.
    """
    o = FitSettings(**settings)
    t0 = time.perf_counter()
    X, *extras = read_groups(ff, [train_rows, *extra_groups], o.pool, None, o.quiet)
    read_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    estimator, result, space = fit_matrix(  # a standard scaler is fitted there, on the matrix in its order (not in the file's)
        X, labels[train_rows], model=o.model, grid=grid, scaling=o.scaling, cv=o.cv, seed=o.seed, n_jobs=o.n_jobs,
        quiet=o.quiet, memory_budget_mb=o.memory_budget_mb, epochs=o.epochs, same=None if same is None else same[train_rows],
    )  # fmt: skip
    return Fitted(estimator, result, "in-memory", space, time.perf_counter() - t0, read_seconds), extras


# ---------------------------------------------------------------------------
# Out of core


def fit_out_of_core(ff: FeatureFile, train_rows: np.ndarray, labels: np.ndarray, grid: dict, same: np.ndarray | None = None, **settings) -> Fitted:
    """The engine on a stream of ``ff``'s training rows: scaler pass (``standard``), every C at once, a cv or hold-out choice (``stream.search_stream``); ``settings``: ``FitSettings``'s fields.

    ``same``: per row of ``ff``, its group of identical images (one fold, one side of the hold-out share), or None.

    Raises:
        PipelineError: several C values but too few training rows to hold out a validation share or to fill the folds.
    """
    o = FitSettings(**settings)
    d = pooled_dim(ff.row_shape, o.pool)
    budget_rows = int(o.memory_budget_mb * (1 << 20) / 4 // (4 * d))
    scaler = make_scaler(o.scaling, d)
    t0 = time.perf_counter()
    fit = search_stream(ff, train_rows, labels, sorted(grid["C"]), loss=o.model, pool=o.pool, scaling=o.scaling, scaler=scaler, cv=o.cv, seed=o.seed,
                        epochs=o.epochs, quiet=o.quiet, budget_rows=budget_rows, backend=o.backend, same=same)  # fmt: skip
    estimator = _pipeline(scaler, _engine_model(fit, o.model, o.scaling, d))
    return Fitted(estimator, _engine_result(fit, fit["kind"]), "out-of-core", fit["space"], time.perf_counter() - t0, 0.0)


# ---------------------------------------------------------------------------
# Predicting test rows


def predict_matrix(estimator, X: np.ndarray, rows: int = 2048) -> np.ndarray:
    """Labels of in-memory pooled rows, ``rows`` at a time (the estimator's temporaries stay small)."""
    return np.concatenate([estimator.predict(X[s : s + rows]) for s in range(0, len(X), rows)]) if len(X) else np.zeros(0, np.int64)


def predict_stream(estimator, ff: FeatureFile, rows: np.ndarray, pool: str) -> np.ndarray:
    """Labels of the sorted ``rows`` of ``ff``, read and pooled chunk by chunk."""
    return np.concatenate([estimator.predict(x) for _, x in stream_rows(ff, rows, pool)] or [np.zeros(0, np.int64)])
