"""A bundle's view of images, shared by predict, evaluate and the Python API: the images named, the network that computes its features, the pooled features batch by batch, and the class scores."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.classical.bundle import check_engine, resolve_bundle_weights
from pipeline.rows.pooling import pool_features
from pipeline.core.errors import PipelineError
from pipeline.images.listing import IMAGE_EXTENSIONS


def collect_images(inputs, dedupe: bool = True) -> list[Path]:
    """The images to predict: files as given, folders walked recursively (sorted, hidden names skipped).

    Folder walks keep the extensions of ``reader.IMAGE_EXTENSIONS``; a file named directly
    is always taken (if it is no image, it is reported as such). Duplicates are dropped
    (``dedupe``; the Python API keeps them: one row per path given).

    Raises:
        PipelineError: a path does not exist, or no image was found at all.
    """
    found: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists() and not p.is_symlink():
            raise PipelineError(f"{p}: no such file or folder")
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                        found.append(Path(dirpath) / name)
        else:
            found.append(p)
    found = list(dict.fromkeys(found)) if dedupe else found
    if not found:
        raise PipelineError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {', '.join(map(str, inputs))}")
    return found


def open_bundle_network(model_path: Path, bundle: dict, *, weights: str | None = None, batch_size: int = 32, progress: bool = False):
    """The network that computes a bundle's features: its backbone, weights (checksum checked), input side and precision.

    For an int8 bundle, the very quantized model the training features came from, found in
    the cache by its key.

    Raises:
        PipelineError: weights that cannot be resolved or do not match the bundle, an int8
            model that is not in the cache (the message says how to get it).
    """
    from pipeline.backbones.int8 import Calibration, open_backbone

    info = resolve_bundle_weights(model_path, bundle, weights, progress=progress)
    spec = bundle["feature_spec"]
    int8_model = Calibration.known(spec["int8_model"]) if bundle["precision"] == "int8" else None
    try:
        net = open_backbone(int(spec["input_size"]), info, bundle["precision"], batch_size=batch_size, calibration=int8_model, backbone=spec["backbone"])
    except PipelineError as exc:
        raise PipelineError(f"{model_path}: {exc}") from None
    if net.weights_checksum != spec["weights_checksum"]:
        raise PipelineError(f"{model_path}: the loaded weights have checksum {net.weights_checksum[:16]}..., not the model's {str(spec['weights_checksum'])[:16]}...")
    return net


def class_scores(estimator, X: np.ndarray, kind: str) -> np.ndarray:
    """(n, k) scores of each row for the estimator's k classes (``estimator.classes_`` order).

    ``probability``: ``predict_proba``. ``decision``: the decision function's margins, a binary
    one's margin ``d`` as the two columns ``-d, d`` (so the best column is the class and ``|d|``).
    """
    if kind == "probability" and hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(X)
    d = estimator.decision_function(X)
    return np.stack([-d, d], axis=1) if d.ndim == 1 else d


def pooled_batches(bundle: dict, images: list[Path], net, *, batch_size: int = 32, quiet: bool = True):
    """The bundle's view of ``images``, batch by batch: ``(indices, ok, reasons, X)``, X the pooled features of the readable ones.

    Features are computed by ``net`` (checked against the bundle: ``bundle.check_engine``) and
    rounded to the training file's storage dtype, as the estimator saw them.
    """
    from pipeline.core.progress import progress

    from pipeline.images.listing import Listing
    from pipeline.images.decode import iter_batches

    spec = bundle["feature_spec"]
    check_engine("the model bundle", bundle, net)
    storage = bundle.get("storage_dtype")
    n = len(images)
    # The reader's Listing joins root and path: "." keeps relative paths relative and
    # absolute ones absolute. Labels are unknown here, so all zero.
    listing = Listing(Path("."), ("?",), tuple(str(p) for p in images), np.zeros(n, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64))
    with progress(n, "predict", quiet=quiet) as bar:
        for batch in iter_batches(listing, np.arange(n), size=int(spec["input_size"]), interpolation=spec["resize"], batch_size=batch_size):
            ok = batch.ok
            X = None
            if ok.any():
                feats = net(batch.pixels[ok])
                if storage:  # the model saw features rounded to the file's storage dtype
                    feats = feats.astype(storage).astype(np.float32)
                X = pool_features(feats, spec["pool"])
            yield batch.indices, ok, batch.reasons, X
            bar.update(len(batch.indices))
