"""Train stage: pooled bottleneck features from HDF5 -> a cross-validated scikit-learn classifier, its model bundle, metrics, report, confusion plot and misclassified test rows.

The parts: ``features`` (pooling, scaling, reading), ``models`` (the ``--model`` registry),
``search`` (the cross-validated search), ``fitting`` (in memory or out of core; its module
doc says how the linear models are fitted, and why), ``bundle`` (the file predict reads) and
``results`` (the output set, published as a whole, and the summary).

Safety: no output path may be an input (``core.guard``), and no test file may share the
training file's images (``overlap``); every chunk read is checked for non-finite values
(``features.check_finite``); SIGTERM is an interrupt that library code cannot lose
(``core.signals``), so the lock and temporary files unwind and the previous outputs stay as
they were.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.classical.bundle import make_bundle
from pipeline.rows.pooling import POOLS, SCALINGS, pooled_dim, read_groups
from pipeline.classical.fitting import Fitted, fit_in_memory, fit_out_of_core, predict_matrix, predict_stream
from pipeline.classical.results import output_paths, print_summary, write_outputs
from pipeline.core.guard import refuse_inputs_as_outputs, refuse_inside
from pipeline.core.signals import finish_first, sigterm_as_interrupt, stop_if_terminated
from pipeline.classical.models import MODELS, search_grid
from pipeline.classical.overlap import check_no_overlap, grouping_files, row_files, training_record
from pipeline.core import config as settings
from pipeline.core.command import Command
from pipeline.core.config import MAX_INT, Interval, ListOf, OneOf, Rule, option
from pipeline.core.errors import PipelineError
from pipeline.report.metrics import classification_report, scores
from pipeline.core.outputs import OutputLock, package_versions, prepare_output_dir
from pipeline.core.outputsets import check_members, settle
from pipeline.core.splits import NO_TRAINING_IMAGES, canonical_order, split_indices
from pipeline.featurefile.store import check_compatible, open_features
from pipeline.images.overlap import split_groups

DEFAULT_OUTPUT = Path("features/models")
#: The grid flags: lists of values of one searched parameter each, overriding the model's default grid.
GRID_FLAGS = ("C", "n_estimators", "max_features")


def _max_feature(text: str):
    """A ``--max-features`` word: sqrt, log2, a fraction (0.1) or a count (40)."""
    if text in ("sqrt", "log2"):
        return text
    value = float(text)
    return int(value) if value > 1 and value == int(value) and "." not in text else value


def _grid_default(key: str, *models: str) -> str:
    """A grid flag's default as ``--help`` shows it: the models' default values of ``key`` (``lr 0.001,0.01; svm 0.1``)."""
    shown = {m: ListOf.show(f"{v:g}" if isinstance(v, float) else v for v in MODELS[m].grid[key]) for m in models}
    return "; ".join(f"{m} {values}" if len(models) > 1 else values for m, values in shown.items())


@dataclass(frozen=True)
class Jobs(Rule):
    """A worker count: -1 (all cores) or a whole number in [1, MAX_INT]."""

    def check(self, value) -> bool:
        return value == -1 and type(value) is int or Interval(int, 1, MAX_INT).check(value)

    def describe(self) -> str:
        return f"-1 (all cores) or a whole number in [1, {MAX_INT}]"


@dataclass(frozen=True)
class TrainConfig:
    """Settings of ``python -m pipeline train``.

    Attributes:
        features: the training feature file (HDF5 from ``extract``).
        model: a key of ``MODELS`` (``lr``, ``svm``, ``rf``).
        test: a compatible test feature file; None = a stratified split of ``features``.
        output: folder for ``<model>.joblib``, ``.metrics.json``, ``.report.txt``, ``.confusion.png``.
        pool: ``flatten`` (h*w*C, C the backbone's channels), ``avg`` or ``max`` (C) over the spatial grid.
        scaling: linear models' input scaling, ``l2`` (unit-RMS rows) or ``standard``.
        test_size: share of each class held out when there is no ``test`` file.
        seed: seeds the split, the folds, the estimators and the out-of-core shuffling.
        cv: cross-validation folds (out of core: hold out 1/cv of the training rows).
        C, n_estimators, max_features: values to search instead of the model's default grid's
            (None: the default); ``grid`` gathers the ones given.
        memory_budget_mb: above this float32 training-matrix size, stream out of core.
        epochs: passes over the training rows when streaming.
        n_jobs: parallel workers (-1 = all cores).
        refit: without ``test``, refit the saved model on every row (with the search's choice)
            after it was scored on the held-out split; False keeps the split's model.
        allow_overlap: score on a ``test`` file that shares images with ``features``.
        quiet: no progress bars; the summary is still printed.
        command_line: recorded in the metrics.
    """

    features: Path = option(help="training feature file (HDF5 from extract)", positional=True, metavar="FEATURES.h5")
    model: str = option(
        "lr",
        "model family: " + ", ".join(f"{k} = {m.title}" for k, m in MODELS.items()),
        rule=OneOf(tuple(MODELS)),
        message="unknown model; choose one of " + ", ".join(MODELS),
    )
    test: Path | None = option(None, "test feature file with the same spec and classes; none = a stratified split of FEATURES", metavar="TEST.h5")
    output: Path = option(DEFAULT_OUTPUT, "output folder", short="-o")
    pool: str = option("flatten", "flatten = h*w*C values (C: the backbone's channels, 512 for vgg16), avg/max = C per image", rule=OneOf(POOLS), message="choose one of " + ", ".join(POOLS))
    scaling: str = option(
        "l2", "linear models' input scaling: l2 = unit-RMS rows, standard = StandardScaler", rule=OneOf(SCALINGS), message="choose one of " + ", ".join(SCALINGS)
    )
    test_size: float = option(
        0.2, "share of each class held out when there is no --test", rule=Interval(float, 0.0, 1.0, closed="neither"), message="must be between 0 and 1 (exclusive)"
    )
    seed: int = option(0, "seed of the split, folds, models and shuffling", rule=Interval(int, 0, MAX_INT))
    cv: int = option(
        3, "cross-validation folds", rule=Interval(int, 2, MAX_INT), message=f"cross-validation needs at least 2 folds (a whole number in [2, {MAX_INT}])"
    )
    C: tuple[float, ...] | None = option(None, "lr/svm: C values to search", rule=ListOf(float, what="numbers"), flag="--C", metavar="C1,C2,...", shown=_grid_default("C", "lr", "svm"))
    n_estimators: tuple[int, ...] | None = option(
        None, "rf: numbers of trees to search", rule=ListOf(int, what="whole numbers"), metavar="N1,N2,...", shown=_grid_default("n_estimators", "rf")
    )
    max_features: tuple | None = option(
        None, "rf: features per split: sqrt, log2, a fraction or a count", rule=ListOf(_max_feature, what="sqrt, log2, fractions or counts"),
        metavar="F1,F2,...", shown=_grid_default("max_features", "rf"),
    )  # fmt: skip
    memory_budget_mb: float = option(
        2048,
        "stream out of core (SGD) above this float32 training-matrix size",
        rule=Interval(float, 0.0, None, closed="neither"),
        message="must be a positive, finite number of MB",
        flag="--memory-budget",
        metavar="MB",
    )
    epochs: int = option(5, "passes over the data when streaming out of core", rule=Interval(int, 1, MAX_INT))
    n_jobs: int = option(2, "parallel workers, -1 = all cores", rule=Jobs())
    refit: bool = option(True, "without --test: keep the model fitted on the split's training side (default: after scoring it on the held-out rows, refit the saved model on every row)")
    allow_overlap: bool = option(False, "score on a --test file that shares images (same file or same content) with FEATURES")
    quiet: bool = option(False, "no progress bars; the summary is still printed")
    command_line: str = option("", cli=False)

    def validate(self) -> "TrainConfig":
        """Check every value; return self.

        Raises:
            PipelineError: naming the bad setting and the rule (unknown model, pooling or
                scaling, a grid parameter the model does not have or a bad grid value,
                out-of-range numbers).
        """
        settings.validate(self)
        self.search_grid()
        return self

    @property
    def grid(self) -> dict[str, list] | None:
        """The grid flags given, parameter -> values (None: none given)."""
        return {key: list(getattr(self, key)) for key in GRID_FLAGS if getattr(self, key) is not None} or None

    def search_grid(self) -> dict[str, list]:
        """The model's default grid with ``grid`` overrides applied, values checked.

        Raises:
            PipelineError: a parameter the model does not search, an empty list, or a bad value.
        """
        return search_grid(self.model, self.grid)


def refit_on_every_row(config: TrainConfig, ff, plan: FitPlan, fitted: Fitted) -> Fitted:
    """The search's choice fitted again on every row of ``ff`` (the model ``train`` saves when it scored on a split)."""
    rows = canonical_order(ff.db["paths"][:])  # every row, in path order (as the plan's)
    grid = {k: [v] for k, v in fitted.search.best_params.items()}
    common = dict(model=config.model, pool=config.pool, scaling=config.scaling, cv=config.cv, seed=config.seed, quiet=config.quiet,
                  memory_budget_mb=config.memory_budget_mb)  # fmt: skip
    if plan.mode == "in-memory":
        return fit_in_memory(ff, rows, [], ff.labels, grid, n_jobs=config.n_jobs, epochs=config.epochs, **common)[0]
    return fit_out_of_core(ff, rows, ff.labels, grid, epochs=config.epochs, **common)


@dataclass(frozen=True)
class FitPlan:
    """What a fit will use, decided (and checked) before any row is read: the rows, the test source, in memory or out of core.

    ``train_rows`` are in path order (``core.splits.canonical_order``), the order the fit visits
    them in; ``test_rows`` are sorted (each is scored on its own). So the split, the folds, the
    fit and the scores are a function of the set of (path, label, features) rows, whatever
    order the files store them in (an incremental update or a merge may store them out of
    listing order).
    """

    train_rows: np.ndarray
    test_rows: np.ndarray
    test_source: dict
    mode: str
    estimate_mb: float
    d: int
    same: np.ndarray | None = None  # per row of the file, its group of identical images (one side of the split, one fold); None: all distinct


class TooFewPerClass(PipelineError):
    """A class (``name``) with fewer distinct training images (``have``) than the search's ``need`` folds; the message advises train's ``--cv``."""

    def __init__(self, message: str, name: str, have: int, need: int):
        super().__init__(message)
        self.name, self.have, self.need = name, have, need


def plan_fit(config: TrainConfig, ff, test_ff=None, train_rows: np.ndarray | None = None, files: list | None = None) -> FitPlan:
    """The rows and the mode of fitting ``config.model`` on ``ff`` (checks only, no reading of features).

    Args:
        config: the validated settings.
        ff, test_ff: the open training and (or None) test feature files, checked compatible.
        train_rows: rows of ``ff`` to fit on, in any order (e.g. ``compare --sizes``' subset; only
            with ``test_ff``); None = every row, or the split's training side without ``test_ff``.
        files: ``classical.overlap.row_files(ff)`` when the caller has it (the split and the search's folds group identical images).

    Raises:
        PipelineError: an empty test split or file, fewer than two classes, ``rf`` over the
            memory budget, or fewer training rows per class than ``--cv``.
    """
    labels, names, family = ff.labels, ff.label_names, MODELS[config.model]
    keys = ff.db["paths"][:]
    groups = None  # identical images never straddle the split, nor the search's folds
    if test_ff is None or any(len(v) > 1 for v in config.search_grid().values()):
        where = f"the test split of {ff.path} and in one fold of its search" if test_ff is None else f"every fold of the search on {ff.path}"
        groups = split_groups(grouping_files(row_files(ff) if files is None else files), where)
    if test_ff is None:
        train_rows, test_rows = split_indices(labels, config.test_size, config.seed, keys=keys, groups=groups)
        test_source = {"kind": "split", "file": str(ff.path), "test_size": config.test_size, "seed": config.seed}
        if len(test_rows) == 0:
            raise PipelineError(f"{ff.path}: the test split is empty ({len(ff)} rows, --test-size {config.test_size}); add rows or pass --test")
    else:
        train_rows = np.arange(len(ff), dtype=np.int64) if train_rows is None else np.asarray(train_rows, np.int64)
        test_rows = np.arange(len(test_ff), dtype=np.int64)
        test_source = {"kind": "file", "file": str(test_ff.path)}
        if len(test_rows) == 0:
            raise PipelineError(f"{test_ff.path}: test feature file has no rows")
    train_rows = train_rows[canonical_order(keys[train_rows])]
    present, counts = np.unique(labels[train_rows], return_counts=True)
    if len(present) < 2:
        raise PipelineError(f"{ff.path}: the training rows hold {len(present)} class; classification needs at least two")
    if len(present) < len(names):  # e.g. every image of a class rejected at extraction
        empty = names[min(set(range(len(names))) - set(present.tolist()))]
        raise PipelineError(f"{ff.path}: class {empty!r} has no training rows ({NO_TRAINING_IMAGES}); add images to it or remove its folder")
    d = pooled_dim(ff.row_shape, config.pool)
    estimate_mb = len(train_rows) * d * 4 / (1 << 20)
    mode = "in-memory" if estimate_mb <= config.memory_budget_mb else "out-of-core"
    if mode == "out-of-core" and family.stream_loss is None:
        raise PipelineError(
            f"{ff.path}: the {config.pool}-pooled training matrix needs {estimate_mb:.3g} MB, over --memory-budget "
            f"{config.memory_budget_mb:g} MB, and --model {config.model} cannot be trained out of core; "
            + ("use --pool avg or --pool max, or raise --memory-budget" if config.pool == "flatten" else "raise --memory-budget")  # avg and max are as long
        )
    same = groups if groups is not None and len(np.unique(groups)) < len(groups) else None
    distinct = counts if same is None else np.bincount(labels[train_rows][np.unique(same[train_rows], return_index=True)[1]], minlength=len(names))[present]
    if mode == "in-memory" and distinct.min() < config.cv:
        worst = int(np.argmin(distinct))
        images = "" if distinct[worst] == counts[worst] else f" ({distinct[worst]} distinct images: identical ones share a fold)"
        raise TooFewPerClass(f"{ff.path}: class {names[int(present[worst])]!r} has {counts[worst]} training rows{images} but --cv {config.cv} needs at "
                             f"least {config.cv} per class; lower --cv or add rows", names[int(present[worst])], int(distinct[worst]), config.cv)  # fmt: skip
    return FitPlan(train_rows, test_rows, test_source, mode, estimate_mb, d, same)


def fit_predict(config: TrainConfig, ff, test_ff, plan: FitPlan):
    """Search and fit ``config.model`` on ``plan.train_rows``, then label the test rows: the one fit of ``train`` (and of ``compare``'s frozen-feature rows).

    Returns:
        ``(fitted, y_test, y_pred, predict_seconds)``.

    Raises:
        PipelineError: a non-finite feature value (naming the file and row).
    """
    labels, train_rows, test_rows = ff.labels, plan.train_rows, plan.test_rows
    common = dict(model=config.model, pool=config.pool, scaling=config.scaling, cv=config.cv, seed=config.seed, quiet=config.quiet,
                  memory_budget_mb=config.memory_budget_mb)  # fmt: skip
    grid = config.search_grid()
    if plan.mode == "in-memory":
        if test_ff is not None:  # read (and checked) before the fit: a bad test file fails fast
            (x_test,) = read_groups(test_ff, [test_rows], config.pool, None, config.quiet)
        same_file_test = [test_rows] if test_ff is None else []
        fitted, extras = fit_in_memory(ff, train_rows, same_file_test, labels, grid, plan.same, n_jobs=config.n_jobs, epochs=config.epochs, **common)
        if test_ff is None:
            x_test, y_test = extras[0], labels[test_rows]
        else:
            y_test = test_ff.labels
        t0 = time.perf_counter()
        y_pred = predict_matrix(fitted.estimator, x_test)
        return fitted, y_test, y_pred, time.perf_counter() - t0
    fitted = fit_out_of_core(ff, train_rows, labels, grid, plan.same, epochs=config.epochs, **common)
    src, y_all = (ff, labels) if test_ff is None else (test_ff, test_ff.labels)
    t0 = time.perf_counter()
    y_pred = predict_stream(fitted.estimator, src, test_rows, config.pool)  # includes reading the rows
    return fitted, y_all[test_rows], y_pred, time.perf_counter() - t0


# ---------------------------------------------------------------------------
# The stage


def run(config: TrainConfig) -> dict:
    """Train ``config.model`` on ``config.features``, evaluate it on the test rows, write the outputs.

    Writes ``<model>.joblib`` (the bundle: estimator on pooled features, label names,
    feature spec incl. pooling, precision, metrics), ``<model>.metrics.json``,
    ``<model>.report.txt``, ``<model>.confusion.png`` and ``<model>.misclassified.csv`` into
    ``config.output`` as one set (``results.write_outputs``: staged beside, then published
    together, so a failure or a kill leaves the previous set whole, never a mix), under the lock
    ``<model>.joblib.lock``; prints a short summary. SIGTERM raises ``Terminated`` (a
    KeyboardInterrupt): the lock and temporary files are removed and the previous outputs are
    left intact (once publishing has begun, it is finished first).

    Args:
        config: the settings (validated here first).

    Returns:
        The metrics dict (also in the JSON file and the bundle).

    Raises:
        PipelineError: bad settings; a missing, incomplete or malformed feature file
            (see ``open_features``); a test file with another feature spec or other
            class names; a non-finite feature value (naming the file and its first bad
            row); an empty test split; fewer training rows per class than ``--cv``;
            ``rf`` over the memory budget; an output path that is an input file (by
            identity, however spelled); an unwritable output folder; a concurrent run
            writing the same model.
        KeyboardInterrupt: Ctrl-C or SIGTERM (``Terminated``).
    """
    config.validate()
    family = MODELS[config.model]
    grid = config.search_grid()
    output = Path(config.output)
    with contextlib.ExitStack() as stack:
        stack.enter_context(sigterm_as_interrupt())
        _load_libraries()
        ff = stack.enter_context(open_features(config.features))
        test_ff = None
        if config.test is not None:
            test_ff = stack.enter_context(open_features(config.test))
            check_compatible(ff, test_ff)
        files = row_files(ff)  # every row's image stat-ed once: the overlap rule, the split's groups, the bundle's record
        if test_ff is not None:
            check_no_overlap(ff, test_ff, config.allow_overlap, files)
        names = ff.label_names
        plan = plan_fit(config, ff, test_ff, files=files)
        paths = output_paths(output, config.model)
        lock = OutputLock(paths["bundle"])
        inputs = [("the feature file", ff.path)] + ([("the test feature file", test_ff.path)] if test_ff is not None else [])
        refuse_inputs_as_outputs([output, *paths.values(), lock.path], inputs, "choose another -o folder")
        refuse_inside(output, [("the image folder of", f.attrs.get("data_dir")) for f in (ff, test_ff) if f is not None], "choose another -o folder")
        prepare_output_dir(output)
        stack.enter_context(lock)
        settle(output, config.model, locked=True)  # a set a killed run left half moved is finished first
        check_members(output, config.model, [p.name for p in paths.values()])  # a FIFO, folder or link named like a member: refused before the fit
        fitted, y_test, y_pred, predict_seconds = fit_predict(config, ff, test_ff, plan)
        train_rows, test_rows, test_source, mode, estimate_mb, d = plan.train_rows, plan.test_rows, plan.test_source, plan.mode, plan.estimate_mb, plan.d
        test_scores = scores(y_test, y_pred, names)
        scored_on = (ff if test_ff is None else test_ff).paths
        wrong = sorted((scored_on[int(r)], names[int(t)], names[int(p_)]) for r, t, p_ in zip(test_rows, y_test, y_pred) if t != p_)
        final = refit_on_every_row(config, ff, plan, fitted) if test_ff is None and config.refit else None
        report = classification_report(y_test, y_pred, names)
        attrs = ff.attrs
        metrics = {
            "model": config.model,
            **test_scores,
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
            "final_model": {"rows": int(len(ff)), "refit": True, "why": "chosen and scored on the held-out split, then refitted on every row"}
            if final is not None else {"rows": int(len(train_rows)), "refit": False},
            "n_features": d,
            "mode": mode,
            "memory_estimate_mb": round(estimate_mb, 1),
            "pool": config.pool,
            "scaling": config.scaling if family.linear else None,
            "seed": config.seed,
            "test_source": test_source,
            "features": str(ff.path),
            "rejected": {str(f.path): int(f.attrs.get("n_rejected", 0)) for f in (ff, test_ff) if f is not None},  # not in any row: said
            "backbone": ff.spec.get("backbone"),
            "label_names": names,
            "score": family.score,
            "config": settings.config_json(config),
            "versions": package_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        bundle = make_bundle(
            model=config.model, estimator=(final or fitted).estimator, label_names=names, feature_spec=ff.spec, pool=config.pool,
            precision=attrs.get("precision"), storage_dtype=attrs.get("storage_dtype"), score=family.score, metrics=metrics,
            quantization=attrs.get("quantization"),
        )  # fmt: skip
        bundle["training_images"] = training_record(ff, np.arange(len(ff)) if final is not None else train_rows, files)  # for evaluate's overlap rule
        stop_if_terminated()
        with finish_first():  # SIGTERM waits for the set to be published (all five outputs replaced, or none: results.write_outputs)
            write_outputs(paths, bundle, metrics, report, names, test_source, wrong)
    print_summary(metrics, fitted, paths)
    return metrics


def _load_libraries() -> None:
    """Import what the run calls into before its work starts (an import cut short by SIGTERM may turn the interrupt into another error)."""
    import importlib

    for name in ("tqdm", "joblib", "threadpoolctl", "sklearn.linear_model", "sklearn.svm", "sklearn.ensemble", "sklearn.preprocessing",
                 "sklearn.pipeline", "sklearn.model_selection", "sklearn.metrics", "matplotlib.figure", "matplotlib.backends.backend_agg"):  # fmt: skip
        importlib.import_module(name)


COMMAND = Command(
    "train", TrainConfig, run, "fit lr/svm/rf on pooled bottleneck features, with a cross-validated search; writes the model bundle, metrics, report, confusion plot"
)
