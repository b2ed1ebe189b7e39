"""Train stage: pooled bottleneck features from HDF5 -> a cross-validated scikit-learn classifier, its model bundle, metrics, report and confusion plot.

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
  ``rf`` cannot be streamed: it raises a PipelineError asking for ``--pool avg``/``max``
  or a larger budget (a silent subsample would change the result without saying so).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable, Iterator

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.splits import split_indices
from pipeline.extraction.store import FeatureFile, check_compatible, open_features
from pipeline.core.outputs import OutputLock, atomic_output

BUNDLE_FORMAT = "transfer-pipeline-model"
BUNDLE_VERSION = 1
POOLS = ("flatten", "avg", "max")
SCALINGS = ("l2", "standard")
DEFAULT_OUTPUT = Path("features/models")
#: Rows per ``partial_fit`` call in out-of-core mode.
STREAM_BATCH_ROWS = 256


# ---------------------------------------------------------------------------
# Model families


def _build_lr(params: dict, seed: int, n_jobs: int):
    from sklearn.linear_model import LogisticRegression

    # lbfgs (multinomial) on scaled rows converges in tens of iterations; the cap
    # only matters for very weak regularisation on separable data.
    return LogisticRegression(C=params.get("C", 1.0), max_iter=1000, tol=1e-4, random_state=seed)


def _build_svm(params: dict, seed: int, n_jobs: int):
    from sklearn.svm import LinearSVC

    return LinearSVC(C=params.get("C", 1.0), dual="auto", max_iter=5000, random_state=seed)


def _build_rf(params: dict, seed: int, n_jobs: int):
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(
        n_estimators=params.get("n_estimators", 100),
        max_features=params.get("max_features", "sqrt"),
        n_jobs=n_jobs,
        random_state=seed,
    )


@dataclass(frozen=True)
class ModelFamily:
    """One ``--model`` choice: how to build it, what to search, how it scores.

    Attributes:
        name: the ``--model`` value.
        title: human name (help texts, plots).
        grid: default search grid, parameter -> candidate values.
        path_param: the parameter searched with warm starts (ascending), or None.
        linear: an L2-penalised linear model (scaled rows, row-space search, streamable).
        stream_loss: ``SGDClassifier`` loss used out of core; None = cannot stream.
        score: ``probability`` (predict_proba max) or ``decision`` (decision function max).
        build: ``(params, seed, n_jobs) -> unfitted estimator``.
    """

    name: str
    title: str
    grid: dict
    path_param: str | None
    linear: bool
    stream_loss: str | None
    score: str
    build: Callable


#: ``--model`` registry. Default grids (measured on VGG16 flatten/avg/max features, see the module doc):
#: lr: the CV plateau spans C = 1e-3..10 on unit-RMS rows; below it accuracy drops.
#: svm: LinearSVC peaks at C = 1e-4..1e-2 and is flat above.
#: rf: more trees never hurt (warm start makes 300 cost no more than 300); sqrt beat
#: larger max_features fractions at a fraction of the time, log2 is the cheap contender.
MODELS: dict[str, ModelFamily] = {
    "lr": ModelFamily("lr", "logistic regression", {"C": (1e-3, 1e-2, 1e-1, 1.0, 10.0)}, "C", True, "log_loss", "probability", _build_lr),
    "svm": ModelFamily("svm", "linear SVM", {"C": (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)}, None, True, "hinge", "decision", _build_svm),
    "rf": ModelFamily(
        "rf", "random forest", {"n_estimators": (100, 300), "max_features": ("sqrt", "log2")}, "n_estimators", False, None, "probability", _build_rf
    ),
}


# ---------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TrainConfig:
    """Settings of ``python -m pipeline train``.

    Attributes:
        features: the training feature file (HDF5 from ``extract``).
        model: a key of ``MODELS`` (``lr``, ``svm``, ``rf``).
        test: a compatible test feature file; None = a stratified split of ``features``.
        output: folder for ``<model>.joblib``, ``.metrics.json``, ``.report.txt``, ``.confusion.png``.
        pool: ``flatten`` (h*w*512), ``avg`` or ``max`` (512) over the spatial grid.
        scaling: linear models' input scaling, ``l2`` (unit-RMS rows) or ``standard``.
        test_size: share of each class held out when there is no ``test`` file.
        seed: seeds the split, the folds, the estimators and the out-of-core shuffling.
        cv: cross-validation folds (out of core: hold out 1/cv of the training rows).
        grid: overrides of the model's default grid, parameter -> list of values.
        memory_budget_mb: above this float32 training-matrix size, stream out of core.
        epochs: passes over the training rows when streaming.
        n_jobs: parallel workers (-1 = all cores).
        quiet: no progress bars; the summary is still printed.
        command_line: recorded in the metrics.
    """

    features: Path
    model: str = "lr"
    test: Path | None = None
    output: Path = DEFAULT_OUTPUT
    pool: str = "flatten"
    scaling: str = "l2"
    test_size: float = 0.2
    seed: int = 0
    cv: int = 3
    grid: dict | None = None
    memory_budget_mb: float = 2048
    epochs: int = 5
    n_jobs: int = 2
    quiet: bool = False
    command_line: str = ""

    def validate(self) -> "TrainConfig":
        """Check every value; return self.

        Raises:
            PipelineError: naming the bad setting and the rule (unknown model, pooling or
                scaling, a grid parameter the model does not have or a bad grid value,
                out-of-range numbers).
        """
        if self.model not in MODELS:
            raise PipelineError(f"--model {self.model}: unknown model; choose one of {', '.join(MODELS)}")
        if self.pool not in POOLS:
            raise PipelineError(f"--pool {self.pool}: choose one of {', '.join(POOLS)}")
        if self.scaling not in SCALINGS:
            raise PipelineError(f"--scaling {self.scaling}: choose one of {', '.join(SCALINGS)}")
        if not 0.0 < self.test_size < 1.0:
            raise PipelineError(f"--test-size {self.test_size}: must be between 0 and 1 (exclusive)")
        if self.seed < 0:
            raise PipelineError(f"--seed {self.seed}: must be 0 or more")
        if self.cv < 2:
            raise PipelineError(f"--cv {self.cv}: cross-validation needs at least 2 folds")
        if not self.memory_budget_mb > 0:
            raise PipelineError(f"--memory-budget {self.memory_budget_mb}: must be a positive number of MB")
        if self.epochs < 1:
            raise PipelineError(f"--epochs {self.epochs}: must be at least 1")
        if self.n_jobs == 0 or self.n_jobs < -1:
            raise PipelineError(f"--n-jobs {self.n_jobs}: must be -1 (all cores) or at least 1")
        self.search_grid()
        return self

    def search_grid(self) -> dict[str, list]:
        """The model's default grid with ``grid`` overrides applied, values checked.

        Raises:
            PipelineError: a parameter the model does not search, an empty list, or a bad value.
        """
        family = MODELS[self.model]
        grid = {k: list(v) for k, v in family.grid.items()}
        for key, values in (self.grid or {}).items():
            if key not in family.grid:
                flag = "--" + key.replace("_", "-")
                raise PipelineError(f"{flag}: --model {self.model} has no parameter {key!r} (it searches {', '.join(family.grid)})")
            values = list(values) if isinstance(values, (list, tuple)) else [values]
            if not values:
                raise PipelineError(f"--{key.replace('_', '-')}: needs at least one value")
            grid[key] = [_check_param(key, v) for v in values]
        return {k: list(dict.fromkeys(v)) for k, v in grid.items()}


def _check_param(key: str, value):
    if key == "C":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
            raise PipelineError(f"--C {value!r}: C must be a positive number")
        return float(value)
    if key == "n_estimators":
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise PipelineError(f"--n-estimators {value!r}: must be a whole number of at least 1")
        return int(value)
    if key == "max_features":
        if value in ("sqrt", "log2"):
            return value
        if isinstance(value, float) and 0.0 < value <= 1.0:
            return value
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
            return int(value)
        raise PipelineError(f"--max-features {value!r}: use sqrt, log2, a fraction in (0, 1] or a whole number of features")
    return value


# ---------------------------------------------------------------------------
# Split and pooling (shared with the other stages)


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


def _unit_rms_(x: np.ndarray) -> np.ndarray:
    """Scale each row in place to unit RMS (L2 norm sqrt(d)); all-zero rows stay zero."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    factor = np.divide(np.sqrt(x.shape[1]), norms, out=np.zeros_like(norms), where=norms > 0)
    x *= factor.astype(np.float32)[:, None]
    return x


# ---------------------------------------------------------------------------
# Reading


def _bar(total: int, desc: str, quiet: bool, unit: str = "row"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, dynamic_ncols=True, leave=False)


def _read_groups(ff: FeatureFile, groups: list[np.ndarray], pool: str, scaler=None, quiet: bool = True) -> list[np.ndarray]:
    """One sequential pass over ``ff``: the pooled float32 rows of each group of sorted row indices.

    ``scaler.partial_fit`` sees the rows of the first group chunk by chunk (its float64
    temporaries stay chunk-sized).
    """
    d = pooled_dim(ff.row_shape, pool)
    outs = [np.empty((len(g), d), np.float32) for g in groups]
    with _bar(len(ff), f"read {ff.path.name}", quiet) as bar:
        for start, block in ff.iter_chunks():
            stop = start + len(block)
            pooled = pool_features(block, pool)
            for i, (g, out) in enumerate(zip(groups, outs)):
                lo, hi = np.searchsorted(g, [start, stop])
                if hi > lo:
                    out[lo:hi] = pooled[g[lo:hi] - start]
                    if i == 0 and scaler is not None:
                        scaler.partial_fit(out[lo:hi])
            bar.update(len(block))
    return outs


def _stream_rows(ff: FeatureFile, rows: np.ndarray, pool: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(row indices, pooled float32 block)`` for sorted ``rows``, in file order."""
    for start, block in ff.iter_chunks(indices=rows):
        yield rows[start : start + len(block)], pool_features(block, pool)


def _shuffled_batches(
    ff: FeatureFile, mask: np.ndarray, labels: np.ndarray, pool: str, rng: np.random.Generator, buffer_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Mini-batches of the rows in ``mask``, shuffled: chunks in random order, rows shuffled within a buffer.

    Rows are stored class by class, so a chunk is mostly one class; the buffer mixes
    many random chunks before the rows are dealt out. Each HDF5 chunk is read once.
    """
    ds = ff.db["features"]
    step = int(ds.chunks[0]) if ds.chunks else 256
    starts = np.arange(0, len(ff), step)
    rng.shuffle(starts)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    held = 0

    def drain():
        x, y = np.concatenate(xs), np.concatenate(ys)
        order = rng.permutation(len(x))
        for s in range(0, len(x), STREAM_BATCH_ROWS):
            sel = order[s : s + STREAM_BATCH_ROWS]
            yield x[sel], y[sel]

    for s in starts.tolist():
        sel = mask[s : s + step]
        if not sel.any():
            continue
        raw = ds[s : s + step]
        xs.append(pool_features(raw[sel], pool))
        ys.append(labels[s : s + step][sel])
        held += int(sel.sum())
        if held >= buffer_rows:
            yield from drain()
            xs, ys, held = [], [], 0
    if held:
        yield from drain()


# ---------------------------------------------------------------------------
# Search


@dataclass
class SearchResult:
    """Outcome of a grid search: the best parameters and every candidate's scores."""

    best_params: dict
    best_score: float
    best_std: float
    results: list[dict]
    kind: str  # "cv" or "holdout"
    convergence_warnings: int = 0


def _candidates(family: ModelFamily, grid: dict[str, list]) -> list[list[dict]]:
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


def _blas_limit(small: bool):
    # BLAS threads cost more than they save on small matrices (measured: 4x slower
    # lbfgs on 1000 x 1000 with two threads than with one).
    if not small:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def _fit_path(model: str, path: list[dict], X, y, train, test, seed: int, n_jobs: int) -> tuple[list[float], int]:
    """Fit one warm-start path on one fold; return the held-out accuracy of each step and how many fits hit max_iter."""
    family = MODELS[model]
    est = family.build(path[0], seed, n_jobs)
    if len(path) > 1 and "warm_start" in est.get_params():
        est.set_params(warm_start=True)
    x_fit, y_fit, x_val, y_val = X[train], y[train], X[test], y[test]
    scores, n_warn = [], 0
    for params in path:
        est.set_params(**params)
        est.fit(x_fit, y_fit)
        n_warn += _hit_max_iter(est)
        scores.append(float(np.mean(est.predict(x_val) == y_val)))
    return scores, n_warn


def _hit_max_iter(est) -> bool:
    """Whether a fit stopped at ``max_iter`` (what sklearn's ConvergenceWarning says, counted instead of printed)."""
    n_iter = getattr(est, "n_iter_", None)
    max_iter = est.get_params().get("max_iter")
    return n_iter is not None and max_iter is not None and int(np.max(n_iter)) >= max_iter


@contextlib.contextmanager
def _quiet_convergence():
    # Installed by the calling thread around the whole search: warnings filters are
    # process-global, so the worker threads see it; the counts go to the metrics.
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        yield


def _outer_jobs(n_jobs: int) -> int:
    return (os.cpu_count() or 1) if n_jobs == -1 else n_jobs


def search(family: ModelFamily, X: np.ndarray, y: np.ndarray, grid: dict[str, list], *, cv: int, seed: int, n_jobs: int, quiet: bool) -> SearchResult:
    """Stratified ``cv``-fold grid search by accuracy, folds in parallel, warm-start paths.

    Args:
        family: the model family.
        X, y: training rows (already scaled / in row space for linear models) and labels.
        grid: parameter -> candidate values.
        cv, seed: folds (``StratifiedKFold``, shuffled with ``seed``).
        n_jobs: parallel workers; ``rf`` parallelises inside the forest instead.
        quiet: no progress bar.

    Returns:
        The SearchResult (best = highest mean accuracy; ties go to the first candidate
        in path order, i.e. the smaller C or the fewer trees).
    """
    from joblib import Parallel, delayed
    from sklearn.model_selection import StratifiedKFold

    folds = list(StratifiedKFold(cv, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    groups = _candidates(family, grid)
    # A forest parallelises over trees (threads, no data copies); linear fits over folds.
    outer = 1 if not family.linear else _outer_jobs(n_jobs)
    inner = n_jobs if not family.linear else 1
    small = X.size <= 4_000_000
    tasks = [(f, g) for f in range(len(folds)) for g in range(len(groups))]
    scores: dict[tuple[int, int], list[float]] = {}
    n_warn = 0
    # Threads, not processes: the fits spend their time in BLAS/liblinear/tree code that
    # releases the GIL, and threads share X instead of copying it to each worker.
    with _bar(len(tasks), f"search {family.name}", quiet, unit="fit") as bar, _blas_limit(small), _quiet_convergence():
        runner = Parallel(n_jobs=min(outer, len(tasks)), backend="threading", return_as="generator")
        calls = (delayed(_fit_path)(family.name, groups[g], X, y, folds[f][0], folds[f][1], seed, inner) for f, g in tasks)
        for (f, g), (s, w) in zip(tasks, runner(calls)):
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


def _fold_unit_rms(clf, d: int) -> None:
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


def _make_prep(scaling: str, d: int):
    if scaling == "l2":
        from sklearn.preprocessing import Normalizer

        return Normalizer(norm="l2").fit(np.zeros((1, d), np.float32))
    from sklearn.preprocessing import StandardScaler

    return StandardScaler()


def _scale_(X: np.ndarray, scaling: str, scaler) -> None:
    """Scale training rows in place, in blocks of about 32 MB (temporaries stay block-sized)."""
    step = max(1, (32 << 20) // (4 * max(1, X.shape[1])))
    if scaling == "l2":
        for s in range(0, len(X), step):
            _unit_rms_(X[s : s + step])
        return
    mean = scaler.mean_.astype(np.float32)
    inv = (1.0 / scaler.scale_).astype(np.float32)
    for s in range(0, len(X), step):
        blk = X[s : s + step]
        blk -= mean
        blk *= inv


def _scale_batch(x: np.ndarray, scaling: str, scaler) -> np.ndarray:
    """Scale a freshly read batch (in place when it is already a float32 C-contiguous array)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    _scale_(x, scaling, scaler)
    return x


# ---------------------------------------------------------------------------
# Fitting


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
    """Search and fit ``model`` on an in-memory matrix of pooled features (the in-memory half of ``run``).

    Args:
        X: float32 pooled training rows (n x d). Linear models scale it IN PLACE
            (pass a copy to keep it); no float64 copy of it is ever made.
        y: integer labels.
        model: a key of ``MODELS``.
        grid: full search grid (default: the model's default grid).
        scaling: ``l2`` or ``standard`` (linear models only).
        cv, seed, n_jobs, quiet: as in TrainConfig.
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
        clf = family.build(result.best_params, seed, n_jobs).fit(X, y)
        return _pipeline(None, clf), result, space
    if scaling == "standard" and scaler is None:
        scaler = _make_prep("standard", d)
        for s0 in range(0, n, 1024):
            scaler.partial_fit(X[s0 : s0 + 1024])
    prep = scaler if scaling == "standard" else _make_prep("l2", d)
    _scale_(X, scaling, prep)
    use_row_space = n <= d // 2 and 8 * n * n <= memory_budget_mb * (1 << 20)
    if use_row_space:
        Z, U, sv = row_space(X)
        space = {"kind": "row-space", "dims": int(Z.shape[1])}
    else:
        Z = X
    result = search(family, Z, y, grid, cv=cv, seed=seed, n_jobs=n_jobs, quiet=quiet)
    clf = family.build(result.best_params, seed, 1)
    with _blas_limit(Z.size <= 4_000_000), _quiet_convergence():
        clf.fit(Z, y)
    result.convergence_warnings += _hit_max_iter(clf)
    if use_row_space:
        _set_input_dim(clf, lift_coef(clf.coef_, U, sv, X))
    if scaling == "l2":
        _fold_unit_rms(clf, d)
    return _pipeline(prep, clf), result, space


def _fit_in_memory(config: TrainConfig, ff: FeatureFile, train_rows: np.ndarray, extra_groups: list[np.ndarray], labels: np.ndarray, grid: dict) -> tuple[Fitted, list[np.ndarray]]:
    """Read the training rows (and ``extra_groups`` of the same file) in one pass, then ``fit_matrix``."""
    family = MODELS[config.model]
    d = pooled_dim(ff.row_shape, config.pool)
    scaler = _make_prep("standard", d) if family.linear and config.scaling == "standard" else None
    t0 = time.perf_counter()
    X, *extras = _read_groups(ff, [train_rows, *extra_groups], config.pool, scaler, config.quiet)
    read_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    estimator, result, space = fit_matrix(
        X, labels[train_rows], model=config.model, grid=grid, scaling=config.scaling, cv=config.cv,
        seed=config.seed, n_jobs=config.n_jobs, quiet=config.quiet, scaler=scaler, memory_budget_mb=config.memory_budget_mb,
    )
    return Fitted(estimator, result, "in-memory", space, time.perf_counter() - t0, read_seconds), extras


def _sgd(loss: str, C: float, n: int, seed: int):
    from sklearn.linear_model import SGDClassifier

    # C weighs the summed loss against |w|^2/2; SGD weighs the mean loss against
    # alpha|w|^2/2, so alpha = 1/(C n) is the same objective.
    return SGDClassifier(loss=loss, alpha=1.0 / (C * n), random_state=seed)


def _stream_fit(models: list, ff: FeatureFile, mask: np.ndarray, labels: np.ndarray, classes: np.ndarray, config: TrainConfig, scaler, buffer_rows: int, desc: str) -> None:
    rng = np.random.default_rng([config.seed, 1])
    n = int(mask.sum())
    with _bar(n * config.epochs, desc, config.quiet) as bar:
        for _ in range(config.epochs):
            for x, y in _shuffled_batches(ff, mask, labels, config.pool, rng, buffer_rows):
                x = _scale_batch(x, config.scaling, scaler)
                for m in models:
                    m.partial_fit(x, y, classes=classes)
                bar.update(len(y))


def _fit_out_of_core(config: TrainConfig, ff: FeatureFile, train_rows: np.ndarray, labels: np.ndarray, grid: dict) -> Fitted:
    """Scaler pass (``standard``), SGD candidates on a seeded stream, hold-out choice, refit on every training row."""
    family = MODELS[config.model]
    d = pooled_dim(ff.row_shape, config.pool)
    row_bytes = 4 * d
    # Half the budget for the shuffle buffer; the rest covers the batch copies and the models.
    buffer_rows = max(STREAM_BATCH_ROWS, int(config.memory_budget_mb * (1 << 20) / 2 // row_bytes))
    classes = np.unique(labels[train_rows])
    scaler = _make_prep(config.scaling, d)
    t0 = time.perf_counter()
    if config.scaling == "standard":
        with _bar(len(train_rows), "fit scaler", config.quiet) as bar:
            for _, x in _stream_rows(ff, train_rows, config.pool):
                scaler.partial_fit(x)
                bar.update(len(x))
    Cs = sorted(grid["C"])
    mask_all = np.zeros(len(ff), bool)
    mask_all[train_rows] = True
    if len(Cs) > 1:
        fit_pos, val_pos = split_indices(labels[train_rows], 1.0 / config.cv, config.seed)
        fit_rows, val_rows = train_rows[fit_pos], train_rows[val_pos]
        if len(val_rows) == 0:
            raise PipelineError(f"{ff.path}: too few training rows ({len(train_rows)}) to hold out a validation share for the C search; pass a single --C")
        mask_fit = np.zeros(len(ff), bool)
        mask_fit[fit_rows] = True
        models = [_sgd(family.stream_loss, C, len(fit_rows), config.seed) for C in Cs]
        _stream_fit(models, ff, mask_fit, labels, classes, config, scaler, buffer_rows, f"search {family.name} (sgd)")
        correct = np.zeros(len(models))
        for rows, x in _stream_rows(ff, val_rows, config.pool):
            x = _scale_batch(x, config.scaling, scaler)
            for i, m in enumerate(models):
                correct[i] += np.sum(m.predict(x) == labels[rows])
        acc = correct / len(val_rows)
        results = [{"params": {"C": C}, "mean": float(a), "std": 0.0, "scores": [float(a)]} for C, a in zip(Cs, acc)]
        best = int(np.argmax(acc))  # first maximum: the smaller C on ties
        result = SearchResult({"C": Cs[best]}, float(acc[best]), 0.0, results, "holdout")
    else:
        result = SearchResult({"C": Cs[0]}, float("nan"), float("nan"), [], "none")
    clf = _sgd(family.stream_loss, result.best_params["C"], len(train_rows), config.seed)
    _stream_fit([clf], ff, mask_all, labels, classes, config, scaler, buffer_rows, f"fit {family.name} (sgd)")
    if config.scaling == "l2":
        _fold_unit_rms(clf, d)
    space = {"kind": "sgd-stream", "dims": d, "epochs": config.epochs, "buffer_rows": buffer_rows}
    return Fitted(_pipeline(scaler, clf), result, "out-of-core", space, time.perf_counter() - t0, 0.0)


# ---------------------------------------------------------------------------
# Evaluation and outputs


def _predict_matrix(estimator, X: np.ndarray, rows: int = 2048) -> np.ndarray:
    return np.concatenate([estimator.predict(X[s : s + rows]) for s in range(0, len(X), rows)]) if len(X) else np.zeros(0, np.int64)


def _predict_stream(estimator, ff: FeatureFile, rows: np.ndarray, pool: str) -> np.ndarray:
    return np.concatenate([estimator.predict(x) for _, x in _stream_rows(ff, rows, pool)] or [np.zeros(0, np.int64)])


def _metrics(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> tuple[dict, np.ndarray, str]:
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(range(len(names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = {n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])} for i, n in enumerate(names)}
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": per_class,
    }
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    report = classification_report(y_true, y_pred, labels=labels, target_names=names, digits=3, zero_division=0)
    return out, cm, report


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    with atomic_output(path) as tmp:
        write(tmp)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("scikit-learn", "numpy", "joblib", "h5py"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def output_paths(output: Path, model: str) -> dict[str, Path]:
    """Where ``run`` writes for ``model``: ``bundle``, ``metrics``, ``report``, ``confusion``."""
    return {
        "bundle": output / f"{model}.joblib",
        "metrics": output / f"{model}.metrics.json",
        "report": output / f"{model}.report.txt",
        "confusion": output / f"{model}.confusion.png",
    }


def _prepare_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise PipelineError(f"{output}: exists and is not a folder (-o takes the folder for the model files)")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"{output}: cannot create the output folder: {exc.strerror}") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise PipelineError(f"{output}: output folder is not writable")


def _config_json(config: TrainConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}


def _fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# ---------------------------------------------------------------------------
# The stage


def run(config: TrainConfig) -> dict:
    """Train ``config.model`` on ``config.features``, evaluate it on the test rows, write the outputs.

    Writes ``<model>.joblib`` (the bundle: estimator on pooled features, label names,
    feature spec incl. pooling, precision, metrics), ``<model>.metrics.json``,
    ``<model>.report.txt`` and ``<model>.confusion.png`` into ``config.output``, each
    atomically; prints a short summary.

    Args:
        config: the settings (validated here first).

    Returns:
        The metrics dict (also in the JSON file and the bundle).

    Raises:
        PipelineError: bad settings; a missing, incomplete or malformed feature file
            (see ``open_features``); a test file with another feature spec or other
            class names; an empty test split; fewer training rows per class than
            ``--cv``; ``rf`` over the memory budget; an unwritable output folder; a
            concurrent run writing the same model.
    """
    config.validate()
    family = MODELS[config.model]
    grid = config.search_grid()
    output = Path(config.output)
    with contextlib.ExitStack() as stack:
        ff = stack.enter_context(open_features(config.features))
        test_ff = None
        if config.test is not None:
            test_ff = stack.enter_context(open_features(config.test))
            check_compatible(ff, test_ff)
        labels = ff.labels
        names = ff.label_names
        if test_ff is None:
            train_rows, test_rows = split_indices(labels, config.test_size, config.seed)
            test_source = {"kind": "split", "file": str(ff.path), "test_size": config.test_size, "seed": config.seed}
            if len(test_rows) == 0:
                raise PipelineError(f"{ff.path}: the test split is empty ({len(ff)} rows, --test-size {config.test_size}); add rows or pass --test")
        else:
            train_rows = np.arange(len(ff), dtype=np.int64)
            test_rows = np.arange(len(test_ff), dtype=np.int64)
            test_source = {"kind": "file", "file": str(test_ff.path)}
            if len(test_rows) == 0:
                raise PipelineError(f"{test_ff.path}: test feature file has no rows")
        y_train = labels[train_rows]
        present, counts = np.unique(y_train, return_counts=True)
        if len(present) < 2:
            raise PipelineError(f"{ff.path}: the training rows hold {len(present)} class; classification needs at least two")
        d = pooled_dim(ff.row_shape, config.pool)
        estimate_mb = len(train_rows) * d * 4 / (1 << 20)
        mode = "in-memory" if estimate_mb <= config.memory_budget_mb else "out-of-core"
        if mode == "out-of-core" and family.stream_loss is None:
            raise PipelineError(
                f"{ff.path}: the {config.pool}-pooled training matrix needs {estimate_mb:.0f} MB, over --memory-budget "
                f"{config.memory_budget_mb:g} MB, and --model {config.model} cannot be trained out of core; "
                "use --pool avg or --pool max, or raise --memory-budget"
            )
        if mode == "in-memory" and counts.min() < config.cv:
            worst = names[int(present[np.argmin(counts)])]
            raise PipelineError(f"{ff.path}: class {worst!r} has {counts.min()} training rows but --cv {config.cv} needs at least {config.cv} per class; lower --cv or add rows")
        _prepare_output(output)
        paths = output_paths(output, config.model)
        stack.enter_context(OutputLock(paths["bundle"]))

        if mode == "in-memory":
            same_file_test = [test_rows] if test_ff is None else []
            fitted, extras = _fit_in_memory(config, ff, train_rows, same_file_test, labels, grid)
            if test_ff is None:
                x_test, y_test = extras[0], labels[test_rows]
            else:
                (x_test,) = _read_groups(test_ff, [test_rows], config.pool, None, config.quiet)
                y_test = test_ff.labels
            t0 = time.perf_counter()
            y_pred = _predict_matrix(fitted.estimator, x_test)
            predict_seconds = time.perf_counter() - t0
            del x_test, extras
        else:
            fitted = _fit_out_of_core(config, ff, train_rows, labels, grid)
            src, y_all = (ff, labels) if test_ff is None else (test_ff, test_ff.labels)
            t0 = time.perf_counter()
            y_pred = _predict_stream(fitted.estimator, src, test_rows, config.pool)  # includes reading the rows
            predict_seconds = time.perf_counter() - t0
            y_test = y_all[test_rows]
        scores, cm, report = _metrics(y_test, y_pred, names)
        attrs = ff.attrs
        metrics = {
            "model": config.model,
            **scores,
            "best_params": fitted.search.best_params,
            "cv_score": fitted.search.best_score,
            "cv_std": fitted.search.best_std,
            "search": {
                "kind": fitted.search.kind,
                "folds": config.cv,
                "grid": grid,
                "results": fitted.search.results,
                "convergence_warnings": fitted.search.convergence_warnings,
                "space": fitted.space,
            },
            "fit_seconds": round(fitted.fit_seconds, 3),
            "predict_seconds": round(predict_seconds, 4),
            "read_seconds": round(fitted.read_seconds, 3),
            "n_train": int(len(train_rows)),
            "n_test": int(len(test_rows)),
            "n_features": d,
            "mode": mode,
            "memory_estimate_mb": round(estimate_mb, 1),
            "pool": config.pool,
            "scaling": config.scaling if family.linear else None,
            "seed": config.seed,
            "test_source": test_source,
            "features": str(ff.path),
            "label_names": names,
            "score": family.score,
            "config": _config_json(config),
            "versions": _versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        bundle = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "model": config.model,
            "estimator": fitted.estimator,
            "label_names": names,
            "feature_spec": {**ff.spec, "pool": config.pool},
            "precision": attrs.get("precision"),
            "storage_dtype": attrs.get("storage_dtype"),
            "score": family.score,
            "metrics": metrics,
        }
        _write_outputs(paths, bundle, metrics, cm, report, names, test_source)
    _print_summary(metrics, fitted, paths)
    return metrics


def _write_outputs(paths: dict, bundle: dict, metrics: dict, cm: np.ndarray, report: str, names: list[str], test_source: dict) -> None:
    import joblib

    from pipeline.core import plots

    model = metrics["model"]
    header = [
        f"model: {model} ({MODELS[model].title}), best {_fmt_params(metrics['best_params'])}, mode {metrics['mode']}, pool {metrics['pool']}",
        f"features: {metrics['features']} ({metrics['n_train']} training rows)",
        f"test: {test_source['file']}" + (f" (stratified split, test size {test_source['test_size']}, seed {test_source['seed']})" if test_source["kind"] == "split" else "")
        + f", {metrics['n_test']} rows",
        f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}",
        "",
    ]
    _atomic_write(paths["bundle"], lambda p: joblib.dump(bundle, p))
    _atomic_write(paths["metrics"], lambda p: p.write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n"))
    _atomic_write(paths["report"], lambda p: p.write_text("\n".join(header) + report))
    try:
        plots.confusion_matrix(cm, names, paths["confusion"], title=f"{model}: accuracy {metrics['accuracy']:.3f} on {metrics['n_test']} test rows")
    except OSError as exc:
        raise PipelineError(f"{paths['confusion']}: write failed: {exc.strerror or exc}") from None


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _print_summary(metrics: dict, fitted: Fitted, paths: dict) -> None:
    cv = metrics["cv_score"]
    cv_text = "" if cv != cv else f", {'cv' if metrics['search']['kind'] == 'cv' else 'hold-out'} {cv:.3f}"
    print(
        f"{metrics['model']}: test accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} on {metrics['n_test']} rows "
        f"({metrics['mode']}, pool {metrics['pool']}, {_fmt_params(metrics['best_params'])}{cv_text}, fit {fitted.fit_seconds:.1f} s)"
    )
    print(f"  model   {paths['bundle']}")
    print(f"  report  {paths['report']}")
    print(f"  plot    {paths['confusion']}")


# ---------------------------------------------------------------------------
# Command line


def _list_of(convert, what: str):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}")
        try:
            return [convert(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {what}") from None

    return parse


def _max_feature(text: str):
    if text in ("sqrt", "log2"):
        return text
    value = float(text)
    return int(value) if value > 1 and value == int(value) and "." not in text else value


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``train`` on an argparse sub-parsers object; returns the new parser."""
    p = sub.add_parser("train", help="fit lr/svm/rf on pooled bottleneck features, with a cross-validated search; writes the model bundle, metrics, report, confusion plot")
    p.add_argument("features", type=Path, metavar="FEATURES.h5", help="training feature file (HDF5 from extract)")
    p.add_argument("--model", default="lr", choices=list(MODELS), help="model family: " + ", ".join(f"{k} = {m.title}" for k, m in MODELS.items()) + " (default lr)")
    p.add_argument("--test", type=Path, default=None, metavar="TEST.h5", help="test feature file with the same spec and classes (default: a stratified split of FEATURES)")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help=f"output folder (default {DEFAULT_OUTPUT})")
    p.add_argument("--pool", default="flatten", choices=POOLS, help="flatten = h*w*512 values, avg/max = 512 per image (default flatten)")
    p.add_argument("--scaling", default="l2", choices=SCALINGS, help="linear models' input scaling: l2 = unit-RMS rows, standard = StandardScaler (default l2)")
    p.add_argument("--C", type=_list_of(float, "numbers"), default=None, metavar="C1,C2,...",
                   help=f"lr/svm: C values to search (default lr {','.join(f'{c:g}' for c in MODELS['lr'].grid['C'])}; svm {','.join(f'{c:g}' for c in MODELS['svm'].grid['C'])})")
    p.add_argument("--n-estimators", type=_list_of(int, "whole numbers"), default=None, metavar="N1,N2,...",
                   help=f"rf: numbers of trees to search (default {','.join(map(str, MODELS['rf'].grid['n_estimators']))})")
    p.add_argument("--max-features", type=_list_of(_max_feature, "sqrt, log2, fractions or counts"), default=None, metavar="F1,F2,...",
                   help=f"rf: features per split: sqrt, log2, a fraction or a count (default {','.join(MODELS['rf'].grid['max_features'])})")
    p.add_argument("--cv", type=int, default=3, help="cross-validation folds (default 3)")
    p.add_argument("--test-size", type=float, default=0.2, help="share of each class held out when there is no --test (default 0.2)")
    p.add_argument("--memory-budget", type=float, default=2048, metavar="MB", help="stream out of core (SGD) above this float32 training-matrix size (default 2048)")
    p.add_argument("--epochs", type=int, default=5, help="passes over the data when streaming out of core (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, folds, models and shuffling (default 0)")
    p.add_argument("--n-jobs", type=int, default=2, help="parallel workers, -1 = all cores (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars; the summary is still printed")
    return p


def config_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> TrainConfig:
    """Build the TrainConfig of parsed ``train`` arguments (grid overrides only for the flags given)."""
    grid = {}
    for key in ("C", "n_estimators", "max_features"):
        value = getattr(args, key, None)
        if value is not None:
            grid[key] = value
    return TrainConfig(
        features=args.features,
        model=args.model,
        test=args.test,
        output=args.output,
        pool=args.pool,
        scaling=args.scaling,
        test_size=args.test_size,
        seed=args.seed,
        cv=args.cv,
        grid=grid or None,
        memory_budget_mb=args.memory_budget,
        epochs=args.epochs,
        n_jobs=args.n_jobs,
        quiet=args.quiet,
        command_line=shlex.join(["python", "-m", "pipeline", *(argv or [])]),
    )


def run_cli(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """``python -m pipeline train ...``: run the stage; returns the exit status (0).

    Raises:
        PipelineError: as for ``run`` (the CLI prints it on one line and exits 2).
    """
    run(config_from_args(args, argv))
    return 0
