"""The ``--model`` registry: each scikit-learn model family's builder, default search grid and scoring, and the checks of grid values."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.core.config import MAX_INT, Interval, check
from pipeline.core.errors import PipelineError

#: A tree count or a feature count: the table's range for counts.
COUNT = Interval(int, 1, MAX_INT)
#: ``--C`` on unit-RMS rows: below 1e-8 every coefficient is ~0 (one class for all), above 1e8 the penalty is ~0, and
#: liblinear at C = 1e-300 ran for 19+ minutes in native code (measured, a fourteenth-pass finding).
C_RANGE = (1e-8, 1e8)


def _build_lr(params: dict, seed: int, n_jobs: int):
    from sklearn.linear_model import LogisticRegression

    # lbfgs (multinomial) on scaled rows converges in tens of iterations; the cap
    # only matters for very weak regularisation on separable data.
    return LogisticRegression(C=params.get("C", 1.0), max_iter=1000, tol=1e-4, random_state=seed)


def _build_svm(params: dict, seed: int, n_jobs: int):
    from sklearn.svm import LinearSVC

    return LinearSVC(C=params.get("C", 1.0), dual="auto", max_iter=5000, intercept_scaling=params.get("intercept_scaling", 1.0), random_state=seed)


def _svm_fixed(X: np.ndarray) -> dict:
    """liblinear penalises the intercept as the weight of a constant feature ``intercept_scaling``:
    set to the rows' RMS norm, the penalty on the intercept is ``1/norm^2`` of that on a row's
    direction, so the intercept is in effect free, as lbfgs's (``lr``) and the engine's are
    (measured, issue 24: with 1.0 the streamed svm disagreed with it on 1.5% of a small file)."""
    norm = float(np.sqrt(np.einsum("ij,ij->", X, X, dtype=np.float64) / max(len(X), 1)))
    return {"intercept_scaling": norm if norm > 0 else 1.0}


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
        fixed: ``X -> params`` the training rows fix (not searched), or None.
    """

    name: str
    title: str
    grid: dict
    path_param: str | None
    linear: bool
    stream_loss: str | None
    score: str
    build: Callable
    fixed: Callable | None = None

    def data_params(self, X: np.ndarray) -> dict:
        """The parameters the (scaled) training rows ``X`` fix, merged into every build of a search and of its final fit."""
        return self.fixed(X) if self.fixed is not None else {}


#: ``--model`` registry. Default grids (measured on VGG16 flatten/avg/max features, see ``fitting``'s module doc):
#: lr: the CV plateau spans C = 1e-3..10 on unit-RMS rows; below it accuracy drops.
#: svm: LinearSVC peaks at C = 1e-4..1e-2 and is flat above.
#: rf: more trees never hurt (warm start makes 300 cost no more than 300); sqrt beat
#: larger max_features fractions at a fraction of the time, log2 is the cheap contender.
MODELS: dict[str, ModelFamily] = {
    "lr": ModelFamily("lr", "logistic regression", {"C": (1e-3, 1e-2, 1e-1, 1.0, 10.0)}, "C", True, "log_loss", "probability", _build_lr),
    "svm": ModelFamily("svm", "linear SVM", {"C": (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)}, None, True, "hinge", "decision", _build_svm, _svm_fixed),
    "rf": ModelFamily(
        "rf", "random forest", {"n_estimators": (100, 300), "max_features": ("sqrt", "log2")}, "n_estimators", False, None, "probability", _build_rf
    ),
}


def check_grid_value(key: str, value):
    """One candidate value of grid parameter ``key``, checked and normalised (C -> float, counts -> int).

    Raises:
        PipelineError: a C that is not a number in ``C_RANGE``, a tree count outside
            [1, MAX_INT], or a max_features that is not sqrt, log2, a fraction in (0, 1]
            or a count in [1, MAX_INT].
    """
    if isinstance(value, np.integer):
        value = int(value)
    if key == "C":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or not C_RANGE[0] <= value <= C_RANGE[1]:
            raise PipelineError(f"--C {value!r}: C must be a number from {C_RANGE[0]:g} to {C_RANGE[1]:g} (rows are scaled to unit RMS, so the useful range is about 1e-5 to 10)")
        return float(value)
    if key == "n_estimators":
        check("--n-estimators", value, COUNT)
        return value
    if key == "max_features":
        if value in ("sqrt", "log2"):
            return value
        if isinstance(value, float) and 0.0 < value <= 1.0:
            return value
        if COUNT.check(value):
            return value
        raise PipelineError(f"--max-features {value!r}: use sqrt, log2, a fraction in (0, 1] or a whole number of features in [1, {MAX_INT}]")
    return value


def search_grid(model: str, overrides: dict | None = None) -> dict[str, list]:
    """``model``'s default grid with ``overrides`` (parameter -> values) applied, values checked, duplicates dropped.

    Raises:
        PipelineError: a parameter the model does not search, an empty list, or a bad value.
    """
    family = MODELS[model]
    grid = {k: list(v) for k, v in family.grid.items()}
    for key, values in (overrides or {}).items():
        if key not in family.grid:
            flag = "--" + key.replace("_", "-")
            raise PipelineError(f"{flag}: --model {model} has no parameter {key!r} (it searches {', '.join(family.grid)})")
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise PipelineError(f"--{key.replace('_', '-')}: needs at least one value")
        grid[key] = [check_grid_value(key, v) for v in values]
    return {k: list(dict.fromkeys(v)) for k, v in grid.items()}


def linear_kind(clf) -> str | None:
    """``"softmax"`` for a logistic regression, ``"margins"`` for a linear SVM, None for anything else.

    Decided by what the model computes, not its class alone: the streaming engine's
    ``SGDClassifier`` with ``log_loss`` is a multinomial logistic regression (scikit-learn's
    own multiclass ``SGDClassifier`` normalises one-vs-rest sigmoids instead: not a softmax).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    from pipeline.rows.engine import SGDClassifier

    if isinstance(clf, LogisticRegression) or (isinstance(clf, SGDClassifier) and clf.loss == "log_loss"):
        return "softmax"
    if isinstance(clf, LinearSVC) or (isinstance(clf, SGDClassifier) and clf.loss == "squared_hinge"):
        return "margins"
    return None
