"""The Python API for notebooks: ``extract_features`` (images -> numpy arrays) and ``load_model`` (a train bundle -> ``predict`` / ``predict_proba`` on images), with the command line's defaults.

Both compute features exactly as the command line does: the same backbone registry, weights
resolution, resize, ``--precision auto`` choice (float16 on a GPU, bfloat16 on a CPU with native
bfloat16, float32 otherwise) and feature storage dtype. A broken image is never fatal and never
dropped silently: it is listed with its reason in ``rejected``. Errors are ``PipelineError``
with the command line's one-line messages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.core.errors import PipelineError


class Features(NamedTuple):
    """What ``extract_features`` returns.

    Attributes:
        features: (n, h, w, C) features of the readable images, in the storage dtype (what a
            feature file of ``extract`` holds: float16 by default).
        labels: (n,) int32 class indexes into ``label_names`` (-1 for images given as paths).
        label_names: the class folder names, sorted (empty for images given as paths).
        paths: (n,) the images of the rows (relative to the folder, or as given).
        rejected: ``(path, reason)`` of every file that was not extracted.
    """

    features: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...]
    paths: tuple[str, ...]
    rejected: tuple[tuple[str, str], ...]


def _paths(what: str, source) -> list[Path]:
    """``source`` (a path, or an iterable of paths: str, bytes or ``os.PathLike``) as paths, one per item given.

    Raises:
        TypeError: anything else (an array of pixels, a number), naming what was given.
        PipelineError: an empty path, or none at all.
    """
    def one(p):
        if isinstance(p, (str, bytes, os.PathLike)):
            if os.fsdecode(p) == "":  # Path("") is the current folder: its images were read
                raise PipelineError(f"{what}: an empty path names no file or folder (write . for the current folder)")
            return Path(os.fsdecode(p))
        raise TypeError(f"{what}: takes image paths (str, bytes or os.PathLike) or an iterable of them, not {type(p).__module__}.{type(p).__qualname__}")

    if isinstance(source, (str, bytes, os.PathLike)):
        return [one(source)]
    if isinstance(source, np.ndarray) or not hasattr(source, "__iter__"):
        one(source)  # raises: pixels are not paths
    paths = [one(p) for p in source]
    if not paths:
        raise PipelineError(f"{what}: no images given (an empty list)")
    return paths


def _listing(source):
    """A class-per-folder tree's listing, or an unlabelled listing of image paths."""
    from pipeline.images.listing import Listing, list_images

    paths = _paths("extract_features", source)
    if len(paths) == 1 and isinstance(source, (str, bytes, os.PathLike)) and paths[0].is_dir():
        return list_images(paths[0]), True
    for p in paths:
        if not p.exists() and not p.is_symlink():
            raise PipelineError(f"{p}: no such file or folder")
    n = len(paths)
    return Listing(Path("."), (), tuple(str(p) for p in paths), np.full(n, -1, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64)), False


def _check_counts(**values) -> None:
    """The command line's rule for each whole-number setting given (None: the default): ``batch_size=0`` would read no image,
    ``input_size=0`` was taken as the default and ``32.5`` cut to 32, silently."""
    from pipeline.core.config import MAX_INT, Interval

    rule = Interval(int, 1, MAX_INT)
    for name, value in values.items():
        if value is not None and not rule.check(value):
            raise PipelineError(f"{name}={value!r}: must be {rule.describe()}")


def extract_features(
    source,
    *,
    backbone: str = "vgg16",
    input_size: int | None = None,
    precision: str = "auto",
    weights: str = "imagenet",
    resize: str = "bilinear",
    storage: str = "float16",
    batch_size: int = 32,
    progress: bool = False,
) -> Features:
    """Features of a class-per-folder tree (labelled) or of image paths (unlabelled), as ``python -m pipeline extract`` computes them.

    Args:
        source: a data folder (one sub-folder per class), one image path, or a list of image paths.
        backbone: a ``--backbone`` (vgg16, vgg19, resnet50, resnet50v2, inception_v3, mobilenetv2).
        input_size: the input side; None = the backbone's default (224; 299 for inception_v3).
        precision: ``auto``, ``float32``, ``bfloat16``, ``float16`` or ``int8`` (int8 calibrates on
            a seeded sample of these images, as ``extract`` does, and caches the model).
        weights: ``imagenet``, ``none`` (random, for tests) or a weights file path.
        resize: the resize method (``keras.utils.load_img``'s names).
        storage: ``float16`` or ``float32``: the dtype the rows are returned in.
        batch_size: images per network call.
        progress: a progress bar and weight-provisioning messages on stderr.

    Raises:
        PipelineError: a bad setting, a folder that is not a class-per-folder tree, a missing
            path, weights that cannot be had (the message names the file and ``--weights``).
    """
    from pipeline.core.progress import progress as progress_bar

    from pipeline.backbones.int8 import open_backbone, sample_calibration
    from pipeline.backbones.network import get_spec, resolve_precision
    from pipeline.backbones.weights import resolve_weights
    from pipeline.core.config import EXTRACT_PRECISIONS, RESIZE_METHODS, STORAGE_DTYPES
    from pipeline.images.decode import iter_batches

    for name, value, allowed in (("precision", precision, EXTRACT_PRECISIONS), ("resize", resize, RESIZE_METHODS), ("storage", storage, STORAGE_DTYPES)):
        if value not in allowed:
            raise PipelineError(f"{name}={value!r}: choose one of {', '.join(allowed)}")
    _check_counts(batch_size=batch_size, input_size=input_size)
    spec = get_spec(backbone)
    size = int(spec.input_size if input_size is None else input_size)
    if size < spec.min_size:
        raise PipelineError(f"input_size={size}: {backbone} needs at least {spec.min_size}")
    listing, labelled = _listing(source)
    info = resolve_weights(weights, backbone=backbone, progress=progress)
    precision = resolve_precision(precision)
    calibration = sample_calibration(listing, input_size=size, resize=resize, weights_checksum=info.checksum, backbone=backbone) if precision == "int8" else None
    net = open_backbone(size, info, precision, batch_size=batch_size, calibration=calibration, progress=progress, backbone=backbone)
    rows, kept, rejected = [], [], [(r.path, r.reason) for r in listing.skipped]
    with progress_bar(len(listing), "extract", quiet=not progress) as bar:
        for batch in iter_batches(listing, np.arange(len(listing)), size=size, interpolation=resize, batch_size=batch_size):
            if batch.ok.any():
                rows.append(net(batch.pixels[batch.ok]).astype(storage))
            for i, ok, reason in zip(batch.indices.tolist(), batch.ok.tolist(), batch.reasons):
                (kept.append(i) if ok else rejected.append((listing.paths[i], reason)))
            bar.update(len(batch.indices))
    features = np.concatenate(rows) if rows else np.zeros((0, *spec.feature_shape(size)), storage)
    return Features(features, listing.labels[kept].astype(np.int32), tuple(listing.class_names) if labelled else (), tuple(listing.paths[i] for i in kept), tuple(rejected))


class Model:
    """A trained bundle ready to label images: ``predict`` (labels) and ``predict_proba`` (class probabilities).

    Attributes:
        label_names: the classes, in the column order of ``predict_proba``.
        bundle: the bundle dict (estimator, feature specification, metrics).
        rejected: ``(path, reason)`` of the images the last call could not read.
    """

    def __init__(self, path, *, weights: str | None = None, batch_size: int = 32):
        from pipeline.classical.bundle import check_spec, load_bundle
        from pipeline.inference.scoring import open_bundle_network

        _check_counts(batch_size=batch_size)
        self.path = Path(path)
        self.bundle = load_bundle(self.path)
        check_spec(self.path, self.bundle)
        self.label_names = tuple(self.bundle["label_names"])
        self.batch_size = batch_size
        self.rejected: tuple[tuple[str, str], ...] = ()
        self._net = open_bundle_network(self.path, self.bundle, weights=weights, batch_size=batch_size)

    def _scores(self, images) -> np.ndarray:
        """(n, C) scores, one row per image in input order (NaN rows for unreadable images), columns in ``label_names`` order."""
        from pipeline.inference.scoring import class_scores, collect_images, pooled_batches

        paths = collect_images(_paths("predict", images), dedupe=False)  # one row per image given, in order (a folder: its images)
        estimator = self.bundle["estimator"]
        kind = self.bundle.get("score", "probability")
        out = np.full((len(paths), len(self.label_names)), np.nan)
        rejected = []
        for indices, ok, reasons, X in pooled_batches(self.bundle, paths, self._net, batch_size=self.batch_size):
            if X is not None:  # a class the estimator never saw: probability 0, margin -inf
                rows = np.full((len(X), len(self.label_names)), 0.0 if kind == "probability" else -np.inf)
                rows[:, np.asarray(estimator.classes_)] = class_scores(estimator, X, kind)
                out[indices[ok]] = rows
            rejected += [(str(paths[i]), r) for i, good, r in zip(indices.tolist(), ok.tolist(), reasons) if not good]
        self.rejected = tuple(rejected)
        self.paths = tuple(str(p) for p in paths)
        return out

    def predict(self, images) -> np.ndarray:
        """The label of each image (a folder is walked recursively, sorted; see ``paths``): an object array, None where unreadable."""
        scores = self._scores(images)
        readable = ~np.isnan(scores).all(axis=1)
        labels = np.full(len(scores), None, dtype=object)
        labels[readable] = np.asarray(self.label_names, dtype=object)[scores[readable].argmax(axis=1)]
        return labels

    def predict_proba(self, images) -> np.ndarray:
        """(n, C) class probabilities of each image (columns: ``label_names``), NaN rows where unreadable.

        Raises:
            PipelineError: an svm bundle (its scores are margins, not probabilities).
        """
        if self.bundle.get("score", "probability") != "probability":
            raise PipelineError(f"{self.path}: a {self.bundle.get('model')} model gives decision margins, not probabilities; use decision_function, or an lr or rf model")
        return self._scores(images)

    def decision_function(self, images) -> np.ndarray:
        """(n, C) scores of each image: probabilities for lr and rf, margins for svm (a binary margin ``d`` as ``-d, d``); NaN rows where unreadable."""
        return self._scores(images)


def load_model(path, *, weights: str | None = None, batch_size: int = 32) -> Model:
    """A ``train`` bundle, its network opened the way it was trained (backbone, weights checked by checksum, input side, precision).

    Raises:
        PipelineError: as ``python -m pipeline predict`` for the same bundle.
    """
    return Model(path, weights=weights, batch_size=batch_size)
