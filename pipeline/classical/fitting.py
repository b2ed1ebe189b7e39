"""Fitting a model family on pooled rows: in memory (row space, scale folding) or out of core (SGD on a shuffled stream); the fitted estimator takes unscaled pooled rows.

How the linear models (``lr``, ``svm``) are fitted, and why:

* Scaling. By default every pooled row is scaled to unit RMS (L2 norm ``sqrt(d)``):
  stateless, so nothing is fitted on the training rows and cross-validation cannot leak.
  On VGG16 features it beat ``StandardScaler`` (which blows up rarely-active ReLU
  channels) in cross-validation for every pooling, and the same ``--C`` grid fits
  every pooling. ``--scaling standard`` uses a ``StandardScaler`` instead (fitted chunk
  by chunk with ``partial_fit``, never on a float64 copy of the matrix). ``--C`` refers
  to the scaled rows; the stored pipeline is ``Normalizer`` (unit norm) + classifier,
  with the ``sqrt(d)`` folded into the coefficients (and ``C``/``alpha``).
* Row space. With fewer training rows ``n`` than features ``d`` (25088 for
  ``flatten``), an L2-penalised linear model's weights lie in the span of the training
  rows (representer theorem), so the search fits on ``Z = U sqrt(L)`` (``n x n``, from
  the eigendecomposition of the Gram matrix) instead of ``n x d``: the same models, up
  to solver tolerance, at a fraction of the cost. The chosen model's weights are
  mapped back to the ``d`` features, so the stored estimator takes pooled features.
  On 1000 Fashion-MNIST images (7x7x512 features) the default ``lr`` search takes
  about 2 s against 48 s for ``GridSearchCV(LogisticRegression(), C in 0.1..1e4, cv=3)``
  on the raw features, with test accuracy 0.900 against 0.896.
* Search. Stratified ``--cv`` folds (seeded) on ``--n-jobs`` threads (the fits run in
  BLAS/liblinear/tree code that releases the GIL; threads share the data), and ``lr``
  walks its C grid upwards with warm starts; ``rf`` grows each forest through its
  ``n_estimators`` grid with warm starts (one forest per fold and ``max_features``)
  and parallelises over trees. Ties go to the stronger regularisation / fewer trees.
* Memory. ``--memory-budget`` bounds the float32 training matrix. In memory, expect a
  peak of about twice that (the test rows, fold copies, the row-space Gram matrix);
  no float64 copy of the matrix is made.
* Out of core. When the float32 training matrix exceeds ``--memory-budget``,
  ``lr``/``svm`` are fitted with ``SGDClassifier.partial_fit`` (log or hinge loss)
  on seeded, shuffled chunks streamed from the HDF5 file for ``--epochs`` epochs. With
  more than one C, every candidate learns from the same stream on ``(cv-1)/cv`` of the
  training rows, the best on the held-out rest is chosen, then refitted on all of them.
  ``rf`` cannot be streamed: the train stage refuses it with a message asking for
  ``--pool avg``/``max`` or a larger budget (a silent subsample would change the result
  without saying so).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from pipeline.classical.features import (
    STREAM_BATCH_ROWS,
    make_scaler,
    pooled_dim,
    progress_bar,
    read_groups,
    scale_batch,
    scale_rows_,
    shuffled_batches,
    stream_rows,
)
from pipeline.core.signals import stop_if_terminated
from pipeline.classical.models import MODELS
from pipeline.classical.search import SearchResult, blas_limit, hit_max_iter, quiet_convergence, search
from pipeline.core.errors import PipelineError
from pipeline.core.splits import split_indices
from pipeline.featurefile.store import FeatureFile

# ---------------------------------------------------------------------------
# Linear-model helpers: row space and scale folding


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
        memory_budget_mb: the row-space search is used when ``n <= d/2`` and its
            ``n x n`` float64 Gram matrix fits in this budget; else the search runs on ``X``.

    Returns:
        ``(estimator, search result, space)``: the estimator takes unscaled pooled rows
        (a Pipeline: scaling + classifier); ``space`` says where the search ran
        (``features`` or ``row-space`` and its dimension).
    """
    family = MODELS[model]
    grid = {k: list(v) for k, v in (grid or family.grid).items()}
    n, d = X.shape
    space = {"kind": "features", "dims": d}
    if not family.linear:
        result = search(family, X, y, grid, cv=cv, seed=seed, n_jobs=n_jobs, quiet=quiet)
        stop_if_terminated()
        clf = family.build(result.best_params, seed, n_jobs).fit(X, y)
        return _pipeline(None, clf), result, space
    if scaling == "standard" and scaler is None:
        scaler = make_scaler("standard", d)
        for s0 in range(0, n, 1024):
            scaler.partial_fit(X[s0 : s0 + 1024])
    prep = scaler if scaling == "standard" else make_scaler("l2", d)
    scale_rows_(X, scaling, prep)
    use_row_space = n <= d // 2 and 8 * n * n <= memory_budget_mb * (1 << 20)
    if use_row_space:
        Z, U, sv = row_space(X)
        space = {"kind": "row-space", "dims": int(Z.shape[1])}
    else:
        Z = X
    result = search(family, Z, y, grid, cv=cv, seed=seed, n_jobs=n_jobs, quiet=quiet)
    stop_if_terminated()
    clf = family.build(result.best_params, seed, 1)
    with blas_limit(Z.size <= 4_000_000), quiet_convergence():
        clf.fit(Z, y)
    result.convergence_warnings += hit_max_iter(clf)
    if use_row_space:
        _set_input_dim(clf, lift_coef(clf.coef_, U, sv, X))
    if scaling == "l2":
        fold_unit_rms(clf, d)
    return _pipeline(prep, clf), result, space


def fit_in_memory(
    ff: FeatureFile,
    train_rows: np.ndarray,
    extra_groups: list[np.ndarray],
    labels: np.ndarray,
    grid: dict,
    *,
    model: str,
    pool: str,
    scaling: str,
    cv: int,
    seed: int,
    n_jobs: int,
    quiet: bool,
    memory_budget_mb: float,
) -> tuple[Fitted, list[np.ndarray]]:
    """Read the training rows (and ``extra_groups`` of the same file) in one pass, then ``fit_matrix``.

    Returns:
        ``(fitted, extras)``: the Fitted model and the pooled rows of each extra group.
    """
    family = MODELS[model]
    d = pooled_dim(ff.row_shape, pool)
    scaler = make_scaler("standard", d) if family.linear and scaling == "standard" else None
    t0 = time.perf_counter()
    X, *extras = read_groups(ff, [train_rows, *extra_groups], pool, scaler, quiet)
    read_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    estimator, result, space = fit_matrix(
        X, labels[train_rows], model=model, grid=grid, scaling=scaling, cv=cv,
        seed=seed, n_jobs=n_jobs, quiet=quiet, scaler=scaler, memory_budget_mb=memory_budget_mb,
    )  # fmt: skip
    return Fitted(estimator, result, "in-memory", space, time.perf_counter() - t0, read_seconds), extras


# ---------------------------------------------------------------------------
# Out of core


def _sgd(loss: str, C: float, n: int, seed: int):
    from sklearn.linear_model import SGDClassifier

    # C weighs the summed loss against |w|^2/2; SGD weighs the mean loss against
    # alpha|w|^2/2, so alpha = 1/(C n) is the same objective.
    return SGDClassifier(loss=loss, alpha=1.0 / (C * n), random_state=seed)


def _stream_fit(models: list, ff: FeatureFile, mask: np.ndarray, labels: np.ndarray, classes: np.ndarray, *, pool: str, scaling: str, scaler,
                seed: int, epochs: int, quiet: bool, buffer_rows: int, desc: str) -> None:  # fmt: skip
    rng = np.random.default_rng([seed, 1])
    n = int(mask.sum())
    with progress_bar(n * epochs, desc, quiet) as bar:
        for _ in range(epochs):
            for x, y in shuffled_batches(ff, mask, labels, pool, rng, buffer_rows):
                stop_if_terminated()
                x = scale_batch(x, scaling, scaler)
                for m in models:
                    m.partial_fit(x, y, classes=classes)
                bar.update(len(y))


def fit_out_of_core(
    ff: FeatureFile,
    train_rows: np.ndarray,
    labels: np.ndarray,
    grid: dict,
    *,
    model: str,
    pool: str,
    scaling: str,
    cv: int,
    seed: int,
    epochs: int,
    quiet: bool,
    memory_budget_mb: float,
) -> Fitted:
    """Scaler pass (``standard``), SGD candidates on a seeded stream, hold-out choice, refit on every training row.

    Raises:
        PipelineError: several C values but too few training rows to hold out a validation share.
    """
    family = MODELS[model]
    d = pooled_dim(ff.row_shape, pool)
    row_bytes = 4 * d
    # Half the budget for the shuffle buffer; the rest covers the batch copies and the models.
    buffer_rows = max(STREAM_BATCH_ROWS, int(memory_budget_mb * (1 << 20) / 2 // row_bytes))
    classes = np.unique(labels[train_rows])
    scaler = make_scaler(scaling, d)
    stream = dict(pool=pool, scaling=scaling, scaler=scaler, seed=seed, epochs=epochs, quiet=quiet, buffer_rows=buffer_rows)
    t0 = time.perf_counter()
    if scaling == "standard":
        with progress_bar(len(train_rows), "fit scaler", quiet) as bar:
            for _, x in stream_rows(ff, train_rows, pool):
                scaler.partial_fit(x)
                bar.update(len(x))
    Cs = sorted(grid["C"])
    mask_all = np.zeros(len(ff), bool)
    mask_all[train_rows] = True
    if len(Cs) > 1:
        fit_pos, val_pos = split_indices(labels[train_rows], 1.0 / cv, seed)
        fit_rows, val_rows = train_rows[fit_pos], train_rows[val_pos]
        if len(val_rows) == 0:
            raise PipelineError(f"{ff.path}: too few training rows ({len(train_rows)}) to hold out a validation share for the C search; pass a single --C")
        mask_fit = np.zeros(len(ff), bool)
        mask_fit[fit_rows] = True
        models = [_sgd(family.stream_loss, C, len(fit_rows), seed) for C in Cs]
        _stream_fit(models, ff, mask_fit, labels, classes, desc=f"search {family.name} (sgd)", **stream)
        correct = np.zeros(len(models))
        for rows, x in stream_rows(ff, val_rows, pool):
            x = scale_batch(x, scaling, scaler)
            for i, m in enumerate(models):
                correct[i] += np.sum(m.predict(x) == labels[rows])
        acc = correct / len(val_rows)
        results = [{"params": {"C": C}, "mean": float(a), "std": 0.0, "scores": [float(a)]} for C, a in zip(Cs, acc)]
        best = int(np.argmax(acc))  # first maximum: the smaller C on ties
        result = SearchResult({"C": Cs[best]}, float(acc[best]), 0.0, results, "holdout")
    else:
        result = SearchResult({"C": Cs[0]}, float("nan"), float("nan"), [], "none")
    clf = _sgd(family.stream_loss, result.best_params["C"], len(train_rows), seed)
    _stream_fit([clf], ff, mask_all, labels, classes, desc=f"fit {family.name} (sgd)", **stream)
    if scaling == "l2":
        fold_unit_rms(clf, d)
    space = {"kind": "sgd-stream", "dims": d, "epochs": epochs, "buffer_rows": buffer_rows}
    return Fitted(_pipeline(scaler, clf), result, "out-of-core", space, time.perf_counter() - t0, 0.0)


# ---------------------------------------------------------------------------
# Predicting test rows


def predict_matrix(estimator, X: np.ndarray, rows: int = 2048) -> np.ndarray:
    """Labels of in-memory pooled rows, ``rows`` at a time (the estimator's temporaries stay small)."""
    return np.concatenate([estimator.predict(X[s : s + rows]) for s in range(0, len(X), rows)]) if len(X) else np.zeros(0, np.int64)


def predict_stream(estimator, ff: FeatureFile, rows: np.ndarray, pool: str) -> np.ndarray:
    """Labels of the sorted ``rows`` of ``ff``, read and pooled chunk by chunk."""
    return np.concatenate([estimator.predict(x) for _, x in stream_rows(ff, rows, pool)] or [np.zeros(0, np.int64)])
