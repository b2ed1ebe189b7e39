"""The linear probe that starts LP-FT: the feature specification a fine-tuning computes, checking a ``train`` bundle against it, fitting the probe on the frozen base's features, and the probe as Keras layers.

LP-FT (Kumar et al., ICLR 2022, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution"): fit a linear probe on the frozen features first, then
fine-tune from it, so the first gradients do not come from a random head. Here the probe
is the ``train`` stage's logistic regression itself: the same pooling, the same row
scaling (``Normalizer`` or ``StandardScaler``) and the fitted coefficients, rebuilt as
stock Keras layers, so the network predicts what the bundle predicts before any step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.classical.bundle import check_width, load_bundle, make_bundle
from pipeline.rows.pooling import POOLS, pool_features
from pipeline.classical.fitting import fit_matrix
from pipeline.classical.models import MODELS, linear_kind
from pipeline.core.errors import PipelineError
from pipeline.backbones.registry import BACKBONE, get_spec

#: Probe settings of a self-fitted probe: ``train``'s defaults (model, scaling, folds).
PROBE_MODEL = "lr"
PROBE_SCALING = "l2"
PROBE_CV = 3
#: Feature-specification fields a probe bundle must share with the fine-tuning, and the
#: flag that sets each on the fine-tuning's side.
CHECKED_FIELDS = {
    "backbone": "--backbone",
    "layer": None,
    "input_size": "--input-size",
    "preprocessing": None,
    "resize": "--resize",
    "weights_checksum": "--weights",
    "pool": "--pool",
}


def feature_spec(*, input_size: int, resize: str, weights, pool: str, backbone: str = BACKBONE) -> dict:
    """The feature specification of a fine-tuning's frozen base: what ``extract`` would record (plus ``pool``) for the same settings.

    Args:
        input_size, resize: the fine-tuning's ``--input-size`` and ``--resize``.
        weights: the resolved ``WeightsInfo`` loaded into the base.
        pool: the pooling before the head.
        backbone: the fine-tuning's ``--backbone``.
    """
    net = get_spec(backbone)
    return {
        "backbone": net.name,
        "layer": net.layer,
        "input_size": int(input_size),
        "preprocessing": net.preprocessing,
        "resize": resize,
        "weights": weights.name,
        "weights_checksum": weights.checksum,
        "feature_shape": list(net.feature_shape(int(input_size))),
        "pool": pool,
    }


def _classifier(path, estimator, margins: bool = False):
    """(scaling step or None, the linear classifier) of a bundle's estimator, or a one-line error.

    A logistic regression always; a linear SVM too when ``margins`` (its outputs are margins,
    not probabilities). Both forms ``train`` writes count: scikit-learn's exact models and the
    streaming engine's ``SGDClassifier`` (``log_loss`` = softmax logistic regression, a hinge
    loss = linear SVM), which ``train`` returns above ``ROW_SPACE_MAX_ROWS`` rows or out of core.
    """
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    steps = [s for _, s in estimator.steps] if isinstance(estimator, Pipeline) else [estimator]
    clf, prep = steps[-1], steps[:-1]
    kind = linear_kind(clf)
    if kind is None or (kind == "margins" and not margins):
        wanted = "a logistic regression or a linear SVM (`train --model lr` or `--model svm`)" if margins else "a logistic regression; fit the probe with `train --model lr`"
        raise PipelineError(f"{path}: its estimator is {type(clf).__name__}, not {wanted}")
    if len(prep) > 1 or (prep and not isinstance(prep[0], (Normalizer, StandardScaler))):
        raise PipelineError(f"{path}: its scaling {[type(s).__name__ for s in prep]} is not one Normalizer or StandardScaler (what train writes)")
    if prep and isinstance(prep[0], Normalizer) and prep[0].norm != "l2":
        raise PipelineError(f"{path}: its Normalizer has norm {prep[0].norm!r}; only the l2 norm is rebuilt as layers")
    return (prep[0] if prep else None), clf


def check_probe(path: Path, bundle: dict, spec: dict, class_names, against: str = "this fine-tuning computes") -> None:
    """Refuse a probe bundle that does not fit the fine-tuning: another feature specification, other classes, or not a logistic regression.

    Args:
        path: the ``--probe`` file (named in the errors).
        bundle: from ``classical.bundle.load_bundle``.
        spec: the fine-tuning's ``feature_spec``.
        class_names: the class names of the training tree, in label order.
        against: who holds ``spec``, for the message.

    Raises:
        PipelineError: one line naming the first field that differs (backbone, layer,
            input_size, preprocessing, resize, weights_checksum, pool), other class names,
            or an estimator that is not a (scaled) logistic regression.
    """
    theirs = bundle["feature_spec"]
    for key, flag in CHECKED_FIELDS.items():
        if theirs.get(key) != spec[key]:
            hint = f" ({flag} {spec['weights'] if key == 'weights_checksum' else spec[key]})" if flag else ""
            raise PipelineError(
                f"--probe {path}: its {key} is {theirs.get(key)!r} but {against} {spec[key]!r}{hint}; "
                "fit the probe on features extracted with the fine-tuning's settings"
            )
    if list(bundle["label_names"]) != list(class_names):
        raise PipelineError(f"--probe {path}: its classes {list(bundle['label_names'])} differ from the training tree's {list(class_names)}")
    _, clf = _classifier(f"--probe {path}", bundle["estimator"])
    if list(clf.classes_) != list(range(len(class_names))):
        raise PipelineError(f"--probe {path}: it was fitted on labels {list(clf.classes_)}, not on all {len(class_names)} classes")
    # its coefficients must take what the fine-tuning pools (the shape it computes, not the one the bundle says)
    check_width(f"--probe {path}", {**bundle, "feature_spec": {**theirs, "feature_shape": spec.get("feature_shape", theirs["feature_shape"])}})


def load_probe(path: Path, spec: dict, class_names) -> dict:
    """``load_bundle`` + ``check_probe``: the bundle of ``--probe``, checked against the fine-tuning.

    Raises:
        PipelineError: as ``load_bundle`` (missing, unreadable, not a bundle) or ``check_probe``.
    """
    bundle = load_bundle(path)
    check_probe(Path(path), bundle, spec, class_names)
    return bundle


def pool_layer(pool: str, name: str):
    """The Keras layer doing ``rows.pooling.pool_features`` (float32): Flatten, global average or global max pooling."""
    import keras

    kinds = {"flatten": keras.layers.Flatten, "avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}
    if pool not in kinds:
        raise PipelineError(f"--pool {pool}: choose one of {', '.join(POOLS)}")
    return kinds[pool](dtype="float32", name=f"{name}_{pool}")


def probe_layers(estimator, pool: str, n_classes: int, path="probe", *, name: str = "probe", margins: bool = False) -> list:
    """The probe as stock Keras layers (float32): pooling, the row scaling, a softmax Dense holding the coefficients.

    ``Normalizer`` becomes ``UnitNormalization`` (unit L2 norm; the coefficients were
    folded for it by ``train``), ``StandardScaler`` a ``Normalization`` with its mean and
    ``scale_ ** 2`` as variance (so constant features divide by 1, as in scikit-learn).
    A binary probe's one coefficient row ``w`` becomes the two softmax rows ``-w/2, w/2``
    (softmax of ``(-z/2, z/2)`` is ``(1 - s(z), s(z))``, its ``predict_proba``).

    Args:
        estimator: a fitted ``Pipeline([scale, LogisticRegression])`` (or a bare one) on pooled features.
        pool: the pooling it was fitted on.
        n_classes: outputs of the network.
        path: named in errors.
        name: prefix of the layer names.
        margins: also take a ``LinearSVC``; its Dense is linear and gives the decision
            function's values (a binary one's margin ``d`` as the two columns ``-d, d``).

    Raises:
        PipelineError: the estimator is not a (scaled) logistic regression.
    """
    import keras

    prep, clf = _classifier(path, estimator, margins)
    softmax = linear_kind(clf) == "softmax"
    coef = np.asarray(clf.coef_, np.float64)
    bias = np.asarray(clf.intercept_, np.float64)
    if coef.shape[0] == 1 and n_classes == 2:
        half = 2.0 if softmax else 1.0
        coef, bias = np.concatenate([-coef / half, coef / half]), np.concatenate([-bias / half, bias / half])
    layers = [pool_layer(pool, name)]
    if prep is not None and hasattr(prep, "mean_"):
        layers.append(keras.layers.Normalization(mean=prep.mean_, variance=np.square(prep.scale_), dtype="float32", name=f"{name}_standard_scaler"))
    elif prep is not None:
        layers.append(keras.layers.UnitNormalization(axis=-1, dtype="float32", name=f"{name}_unit_norm"))
    dense = keras.layers.Dense(n_classes, activation="softmax" if softmax else None, dtype="float32", name=f"{name}_{'logistic' if softmax else 'margins'}")
    dense.build((None, coef.shape[1]))
    dense.set_weights([coef.T.astype(np.float32), bias.astype(np.float32)])
    return [*layers, dense]


@dataclass
class Probe:
    """A probe fitted by ``fit_probe``: the estimator, its bundle and how it was found."""

    estimator: object
    bundle: dict
    info: dict


def fit_probe(features: np.ndarray, labels: np.ndarray, *, class_names, spec: dict, precision: str, seed: int, quiet: bool, where: str) -> Probe:
    """Fit the logistic-regression probe on the frozen base's features of the training rows, with ``train``'s search.

    Args:
        features: (n, h, w, C) feature-layer outputs of the fine-tuning's training rows
            (the validation and test rows are never passed here). Scaled in place.
        labels: their labels.
        class_names, spec, precision: recorded in the bundle (``spec`` includes ``pool``).
        seed, quiet: as the stage's flags.
        where: the data folder, named in errors.

    Returns:
        Probe: the fitted ``Pipeline`` (pooled rows in), a bundle ``predict`` can read, and
        ``info`` (chosen C, cross-validation accuracy, rows, seconds) for the metrics.

    Raises:
        PipelineError: a class with fewer training rows than the search's folds.
    """
    present, counts = np.unique(labels, return_counts=True)
    if len(present) < len(class_names) or counts.min() < PROBE_CV:
        have = dict(zip(present.tolist(), counts.tolist()))
        worst = min(range(len(class_names)), key=lambda c: have.get(c, 0))
        raise PipelineError(
            f"{where}: class {class_names[worst]!r} has {have.get(worst, 0)} training images but the probe's "
            f"{PROBE_CV}-fold search needs at least {PROBE_CV} per class; add images or pass --probe"
        )
    t0 = time.perf_counter()
    X = pool_features(features, spec["pool"])
    estimator, result, space = fit_matrix(X, np.asarray(labels), model=PROBE_MODEL, scaling=PROBE_SCALING, cv=PROBE_CV, seed=seed, quiet=quiet)
    seconds = time.perf_counter() - t0
    info = {
        "source": "fitted on the fine-tuning's training rows",
        "n_train": int(len(labels)),
        "best_params": result.best_params,
        "cv_score": result.best_score,
        "cv_folds": PROBE_CV,
        "scaling": PROBE_SCALING,
        "pool": spec["pool"],
        "space": space,
        "fit_seconds": round(seconds, 3),
    }
    metrics = {"model": PROBE_MODEL, **info, "seed": seed}
    bundle = make_bundle(
        model=PROBE_MODEL, estimator=estimator, label_names=list(class_names), feature_spec={k: v for k, v in spec.items() if k != "pool"},
        pool=spec["pool"], precision=precision, storage_dtype="float32", score=MODELS[PROBE_MODEL].score, metrics=metrics,
    )  # fmt: skip
    return Probe(estimator, bundle, info)
