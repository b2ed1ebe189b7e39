"""The model bundle, the file between train and predict: its format, building and writing it, loading it, and checking its feature specification against this program.

A bundle is a joblib (pickle) dict: ``format``, ``version``, ``model``, ``estimator`` (takes
pooled features), ``label_names``, ``feature_spec`` (the feature file's spec plus ``pool``),
``precision``, ``storage_dtype``, ``score`` and ``metrics``. A bundle trained on ``int8``
features also names, in its ``feature_spec``, the ``precision`` and the quantized model
(``int8_model``, its cache key): predict computes features with exactly that model or not at
all. It opens with plain joblib; being a pickle, load only bundles you trust.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.core.config import EXTRACT_PRECISIONS
from pipeline.core.errors import PipelineError
from pipeline.core.outputsets import settle_for
from pipeline.core.outputs import atomic_output
from pipeline.featurefile.store import SPEC_KEYS

BUNDLE_FORMAT = "transfer-pipeline-model"
BUNDLE_VERSION = 1
#: Keys every bundle's ``feature_spec`` must have for the features to be rebuilt exactly.
SPEC_REQUIRED = (*SPEC_KEYS, "feature_shape", "pool")
#: Compute precisions a bundle may name (``auto`` is resolved before features are stored).
BUNDLE_PRECISIONS = tuple(p for p in EXTRACT_PRECISIONS if p != "auto")


def make_bundle(
    *,
    model: str,
    estimator,
    label_names: list[str],
    feature_spec: dict,
    pool: str,
    precision: str | None,
    storage_dtype: str | None,
    score: str,
    metrics: dict,
    quantization: str | None = None,
) -> dict:
    """The bundle dict of a trained estimator.

    Args:
        model: the ``--model`` key (``lr``, ``svm``, ``rf``).
        estimator: fitted on pooled features of the feature file.
        label_names: class names, indexed by the estimator's labels.
        feature_spec: the training feature file's spec (``FeatureFile.spec``); ``pool`` is added.
        pool: the pooling the estimator expects.
        precision, storage_dtype: the feature file's compute precision and stored dtype.
        score: ``probability`` or ``decision`` (what predict reports as the score).
        metrics: the training metrics.
        quantization: the feature file's ``quantization`` attribute (JSON; ``int8`` files):
            the key of the quantized model goes into the spec as ``int8_model``.
    """
    spec = {**feature_spec, "pool": pool}
    if precision == "int8":
        spec.update(precision=precision, int8_model=json.loads(quantization)["key"] if quantization else None)
    return {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "model": model,
        "estimator": estimator,
        "label_names": list(label_names),
        "feature_spec": spec,
        "precision": precision,
        "storage_dtype": storage_dtype,
        "score": score,
        "metrics": metrics,
    }


def write_bundle(path: Path, bundle: dict) -> None:
    """Write ``bundle`` to ``path`` with joblib, atomically.

    Raises:
        PipelineError: the disk filled up or the file could not be written (any previous
            file is left untouched).
    """
    import joblib

    with atomic_output(Path(path)) as tmp:
        joblib.dump(bundle, tmp)


def load_bundle(path: Path | str) -> dict:
    """Open a model bundle written by ``train`` and check it is one (a half-published set holding it is finished first: ``core.outputsets.settle_for``).

    Args:
        path: the ``.joblib`` file.

    Returns:
        The bundle dict (``estimator``, ``label_names``, ``feature_spec``, ``precision``...).

    Raises:
        PipelineError: the file is missing, unreadable, not a joblib/pickle file, not a
            transfer-pipeline bundle, of an unsupported version, or lacks a field.
    """
    path = Path(path)
    settle_for(path)  # every reader: a model set a killed train left half moved is finished before the bundle is trusted
    if not path.exists():
        raise PipelineError(f"{path}: model file does not exist (run `python -m pipeline train` first)")
    if path.is_dir():
        raise PipelineError(f"{path}: is a folder, not a model file")
    if not path.is_file():  # a FIFO or device would block or never end
        raise PipelineError(f"{path}: is not a regular file (a pipe or device?); pass the .joblib model file")
    import joblib

    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read the model file ({exc.strerror or exc})") from None
    if head == b"\x89HDF\r\n\x1a\n":
        raise PipelineError(f"{path}: is an HDF5 feature file, not a model bundle; pass the .joblib that `python -m pipeline train` wrote (e.g. features/models/lr.joblib)")
    try:
        bundle = joblib.load(path)
    except Exception as exc:  # pickle raises anything for a file that is not one
        first = (str(exc).splitlines() or [""])[0]
        raise PipelineError(f"{path}: not a readable model bundle ({type(exc).__name__}{': ' + first if first else ''})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise PipelineError(f"{path}: not a transfer-pipeline model bundle (no format {BUNDLE_FORMAT!r}; write one with `python -m pipeline train`)")
    if bundle.get("version") != BUNDLE_VERSION:
        raise PipelineError(f"{path}: model bundle version {bundle.get('version')!r} is not supported (this program reads version {BUNDLE_VERSION})")
    for key in ("estimator", "label_names", "feature_spec", "precision"):
        if key not in bundle:
            raise PipelineError(f"{path}: model bundle lacks {key!r}")
    missing = [k for k in SPEC_REQUIRED if k not in bundle["feature_spec"]]
    if missing:
        raise PipelineError(f"{path}: model bundle's feature_spec lacks {', '.join(missing)}")
    metrics = bundle.get("metrics")
    for key, value in (("metrics", metrics), ("metrics.versions", metrics.get("versions") if isinstance(metrics, dict) else None)):
        if value is not None and not isinstance(value, dict):  # read as a map by predict, evaluate and finetune (a traceback)
            raise PipelineError(f"{path}: model bundle's {key} must be a map, got {type(value).__name__}")
    _check_classes(path, bundle)
    return bundle


def _check_classes(path: Path, bundle: dict) -> None:
    """Refuse class names and scores that would label images wrongly: ``label_names`` two or more distinct texts (all ``bag`` labelled
    every image bag; numbers were a traceback), the estimator's classes indexes into them, ``score`` what the estimator gives
    (taken from it when absent: an svm bundle without it printed margins as probabilities)."""
    names, estimator = bundle["label_names"], bundle["estimator"]
    if not isinstance(names, (list, tuple)) or len(names) < 2 or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise PipelineError(f"{path}: model bundle's label_names must be two or more distinct class names, got {str(names)[:80]}")
    classes = getattr(estimator, "classes_", None)
    try:
        known = classes is not None and all(int(c) == c and 0 <= int(c) < len(names) for c in list(classes))
    except (TypeError, ValueError):
        known = False
    if not known:
        raise PipelineError(f"{path}: model bundle's estimator classes {str(classes)[:60]} do not index its {len(names)} label_names")
    from pipeline.classical.models import MODELS

    family = MODELS.get(bundle.get("model")) if isinstance(bundle.get("model"), str) else None
    score = bundle.setdefault("score", family.score if family else "probability" if hasattr(estimator, "predict_proba") else "decision")
    if score not in ("probability", "decision") or not hasattr(estimator, "predict_proba" if score == "probability" else "decision_function") or (
        family is not None and score != family.score
    ):
        raise PipelineError(f"{path}: model bundle's score {score!r} is not what its {bundle.get('model', 'estimator')} gives")


def check_spec(model_path: Path, bundle: dict) -> None:
    """Refuse a bundle whose features this program cannot rebuild exactly.

    The bundle's ``backbone`` decides the network (predict follows it); its layer and
    preprocessing must be that backbone's here, and its ``feature_shape`` what that backbone
    gives at its ``input_size``.

    Raises:
        PipelineError: one line naming the field: an unknown precision or backbone, another
            layer or preprocessing than the backbone's, an input size below the backbone's
            minimum, or a ``feature_shape`` that does not follow from ``input_size``.
    """
    from pipeline.backbones.registry import BACKBONES

    spec = bundle["feature_spec"]
    if bundle["precision"] not in BUNDLE_PRECISIONS:
        raise PipelineError(f"{model_path}: precision {bundle['precision']!r} is not one of {', '.join(BUNDLE_PRECISIONS)}")
    net = BACKBONES.get(spec.get("backbone")) if isinstance(spec.get("backbone"), str) else None
    if net is None:
        raise PipelineError(f"{model_path}: the model expects backbone {spec.get('backbone')!r}, which this program does not compute (it computes {', '.join(BACKBONES)})")
    for key, value in (("layer", net.layer), ("preprocessing", net.preprocessing)):
        if spec.get(key) != value:
            raise PipelineError(f"{model_path}: the model expects {key} {spec.get(key)!r} but backbone {net.name} computes {value!r}")
    if int(spec["input_size"]) < net.min_size:
        raise PipelineError(f"{model_path}: the model expects input_size {spec['input_size']} but backbone {net.name} needs at least {net.min_size}")
    shape = list(net.feature_shape(int(spec["input_size"])))
    if list(spec["feature_shape"]) != shape:
        raise PipelineError(f"{model_path}: feature_shape {spec['feature_shape']} does not match input_size {spec['input_size']} ({shape})")
    if bundle["precision"] == "int8" and not spec.get("int8_model"):
        raise PipelineError(f"{model_path}: trained on int8 features but names no int8 model (feature_spec lacks int8_model); retrain it on a feature file extracted with --precision int8")
    check_width(model_path, bundle)


def check_width(model_path: Path | str, bundle: dict) -> None:
    """Refuse an estimator that does not take the pooled rows its ``feature_spec`` gives (``feature_shape`` pooled by ``pool``), or
    whose fitted arrays cannot give a score: another pooling's estimator or a cut coefficient matrix (scikit-learn tracebacks in
    predict, evaluate and export), an intercept of another length (a traceback), NaN coefficients (every image one class, score nan).

    Raises:
        PipelineError: an unknown pool, a step (scaler, classifier, its coefficients) taking another length, an intercept that
            does not match the coefficients, or a fitted array holding NaN or infinity.
    """
    import numpy as np

    from pipeline.rows.pooling import POOLS, pooled_dim

    spec = bundle["feature_spec"]
    if spec.get("pool") not in POOLS:
        raise PipelineError(f"{model_path}: the model's pool {spec.get('pool')!r} is not one of {', '.join(POOLS)}")
    want = pooled_dim(tuple(int(n) for n in spec["feature_shape"]), spec["pool"])
    estimator = bundle["estimator"]
    steps = [s for _, s in estimator.steps] if hasattr(estimator, "steps") else [estimator]
    for step in steps:
        widths = [("takes", getattr(step, "n_features_in_", None))]
        if getattr(step, "coef_", None) is not None:
            widths.append(("has coefficients for", getattr(step.coef_, "shape", (None,))[-1]))
        for what, got in widths:
            if got is not None and got != want:
                raise PipelineError(f"{model_path}: the model's {type(step).__name__} {what} {got} features per image, but its feature_spec "
                                    f"gives {want} ({spec['pool']} pooling of {list(spec['feature_shape'])}); retrain it with `python -m pipeline train`")  # fmt: skip
        arrays = {name: getattr(step, name) for name in ("coef_", "intercept_", "mean_", "scale_", "var_") if getattr(step, name, None) is not None}
        for name, value in arrays.items():
            try:
                finite = bool(np.isfinite(np.asarray(value, dtype=np.float64)).all())
            except (TypeError, ValueError):
                finite = False
            if not finite:
                raise PipelineError(f"{model_path}: the model's {type(step).__name__}.{name} holds values that are not finite numbers; retrain it with `python -m pipeline train`")
        if "coef_" in arrays and "intercept_" in arrays and np.size(arrays["intercept_"]) != np.shape(arrays["coef_"])[0]:
            raise PipelineError(f"{model_path}: the model's {type(step).__name__} has {np.size(arrays['intercept_'])} intercepts for "
                                f"{np.shape(arrays['coef_'])[0]} coefficient rows; retrain it with `python -m pipeline train`")  # fmt: skip


def check_engine(model_path: Path | str, bundle: dict, net) -> None:
    """Refuse a network that computes features another way than the ones the bundle was trained on.

    The precision must be the bundle's, and for ``int8`` the quantized model too (int8
    features of another calibration, or float features, are not what the model saw).

    Raises:
        PipelineError: naming both ways.
    """
    want, got = bundle["precision"], getattr(net, "precision", None)
    if got != want:
        raise PipelineError(f"{model_path}: trained on {want} features but the network computes {got} features; refusing (predict rebuilds features the way they were trained)")
    if want == "int8" and getattr(net, "key", None) != bundle["feature_spec"].get("int8_model"):
        raise PipelineError(
            f"{model_path}: trained on features of int8 model {str(bundle['feature_spec'].get('int8_model'))[:16]}... "
            f"but the network is int8 model {str(getattr(net, 'key', None))[:16]}...; refusing"
        )


def warn_on_version_change(model_path: Path, bundle: dict) -> None:
    """Warn on stderr when the bundle was written with another scikit-learn than the one installed."""
    from importlib.metadata import PackageNotFoundError, version

    versions = (bundle.get("metrics") or {}).get("versions") or {}  # load_bundle checked both are maps
    saved = versions.get("scikit-learn")
    try:
        now = version("scikit-learn")
    except PackageNotFoundError:
        return
    if saved and saved != now:
        print(f"warning: {model_path} was written with scikit-learn {saved}, this is {now}; predictions may differ", file=sys.stderr)


def resolve_bundle_weights(model_path: Path, bundle: dict, override: str | None = None, progress: bool = True):
    """Resolve the weights a bundle was trained with and check their checksum.

    Args:
        model_path: the bundle file (for messages).
        bundle: from ``load_bundle``.
        override: a weights spec to resolve instead of the bundle's name (``imagenet``,
            ``none`` or a file path); needed when the model was trained on a weights file.
        progress: let ``resolve_weights`` report provisioning on stderr.

    Returns:
        The ``WeightsInfo``.

    Raises:
        PipelineError: the weights cannot be resolved, or their checksum differs from
            the bundle's ``weights_checksum``.
    """
    from pipeline.backbones.weights import resolve_weights

    spec = bundle["feature_spec"]
    name = override or spec["weights"]
    if name == "file":
        raise PipelineError(f"{model_path}: the model was trained on features from a weights file; pass --weights PATH to that file")
    info = resolve_weights(name, backbone=spec["backbone"], progress=progress)
    if info.checksum != spec["weights_checksum"]:
        raise PipelineError(
            f"{model_path}: trained with weights {spec['weights']!r} (checksum {str(spec['weights_checksum'])[:16]}...) but the "
            f"resolved weights {info.path or info.name} have checksum {str(info.checksum)[:16]}...; features would differ, refusing"
        )
    return info


def check_features_match(model_path: Path | str, bundle: dict, ff) -> None:
    """Refuse a feature file whose features are not what the bundle was trained on (another backbone, layer, size, resize, weights, shape or precision).

    Raises:
        PipelineError: naming the file, the field and both values.
    """
    from pipeline.featurefile.store import SPEC_KEYS, computed_by

    spec, theirs, engine = bundle["feature_spec"], ff.spec, computed_by(ff)
    pairs = [(key, theirs.get(key), spec.get(key)) for key in (*SPEC_KEYS, "feature_shape")]
    pairs.append(("precision", engine["precision"], bundle["precision"]))
    for key, got, want in pairs:
        if got != want:
            raise PipelineError(f"{ff.path}: {key} is {got!r} but the model {model_path} was trained on {want!r}; extract the images with the training file's settings")
    if bundle["precision"] == "int8":
        key = engine["int8_model"]
        if key != spec.get("int8_model"):
            raise PipelineError(f"{ff.path}: int8 features of model {str(key)[:16]}... but the model {model_path} was trained on int8 model {str(spec.get('int8_model'))[:16]}...")
