"""Predict stage: images -> the features a model bundle was trained on (same network, weights, size, resize, precision, pooling) -> label and score per image; unreadable images are reported, never fatal.

Scores: for ``lr`` and ``rf`` the largest class probability (``predict_proba``); for
``svm`` the largest decision-function value, a margin and NOT a probability (for two
classes, the absolute margin). A model file is a pickle: load only bundles you trust.

The output never replaces an input (the bundle or an image, by file identity) and never
replaces a file that is not an earlier predictions file without ``--overwrite``; both are
checked, with the output folder, before any image is read. File names that are not valid
UTF-8 are written as their original bytes (see ``predictions``).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.classical.bundle import check_engine, check_spec, load_bundle, warn_on_version_change
from pipeline.classical.features import pool_features
from pipeline.classical.guard import refuse_inputs_as_outputs
from pipeline.classical.predictions import FORMATS, format_results, is_predictions_file, write_predictions
from pipeline.core import config as settings
from pipeline.core.config import MAX_INT, Interval, OneOf, option
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import command_line, prepare_output_dir
from pipeline.images.listing import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class PredictConfig:
    """Settings of ``python -m pipeline predict``.

    Attributes:
        model: the bundle written by ``train`` (``<model>.joblib``).
        inputs: image files and/or folders (walked recursively).
        format: ``text``, ``csv`` or ``json``.
        output: file to write (atomically); None = standard output. Never one of the
            inputs; an existing file is replaced only if ``predict`` wrote it, or with ``overwrite``.
        batch_size: images per network call.
        weights: weights to resolve instead of the bundle's name (needed when the model
            was trained on a weights file); the checksum must still match the bundle's.
        quiet: no progress bar or summary (the count of unreadable images is still printed).
        overwrite: replace an existing ``output`` that is not a predictions file.
        command_line: the command as typed (not used in the output).
    """

    model: Path = option(help="model bundle written by train (e.g. features/models/lr.joblib)", positional=True, metavar="MODEL.joblib")
    inputs: tuple[Path, ...] = option(help="image files and/or folders (walked recursively)", positional=True, nargs="+", metavar="IMAGE_OR_FOLDER")
    format: str = option(
        "text", "text (a marker line, then columns), csv (path,label,score,error) or json (list of objects)", rule=OneOf(FORMATS), message="choose one of " + ", ".join(FORMATS)
    )
    output: Path | None = option(None, "write the results to this file (never an input; replaces only an earlier predictions file); none = standard output", short="-o")
    batch_size: int = option(32, "images per network call", rule=Interval(int, 1, MAX_INT))
    weights: str | None = option(None, "weights to use instead of the bundle's (needed for models trained on a weights FILE); the checksum must match")
    quiet: bool = option(False, "no progress bar or summary")
    overwrite: bool = option(False, "let -o replace an existing file that is not a predictions file (never an input)")
    command_line: str = option("", cli=False)

    def validate(self) -> "PredictConfig":
        """Check every value; return self.

        Raises:
            PipelineError: naming the bad setting (the rules of the fields), no inputs, or an
                output path that is a folder.
        """
        settings.validate(self)
        if not self.inputs:
            raise PipelineError("no images given: pass image files or folders")
        if self.output is not None and Path(self.output).is_dir():
            raise PipelineError(f"{self.output}: is a folder; -o takes a file")
        return self


def collect_images(inputs) -> list[Path]:
    """The images to predict: files as given, folders walked recursively (sorted, hidden names skipped).

    Folder walks keep the extensions of ``reader.IMAGE_EXTENSIONS``; a file named directly
    is always taken (if it is no image, it is reported as such). Duplicates are dropped.

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
    found = list(dict.fromkeys(found))
    if not found:
        raise PipelineError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {', '.join(map(str, inputs))}")
    return found


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


def _scores(estimator, X: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Class index (into ``label_names``) and score of each row."""
    classes = np.asarray(estimator.classes_)
    if kind == "probability" and hasattr(estimator, "predict_proba"):
        p = estimator.predict_proba(X)
        j = p.argmax(axis=1)
        return classes[j], p[np.arange(len(p)), j]
    d = estimator.decision_function(X)
    if d.ndim == 1:  # two classes: the sign picks the class, the margin is the score
        return classes[(d > 0).astype(int)], np.abs(d)
    j = d.argmax(axis=1)
    return classes[j], d[np.arange(len(d)), j]


def predict_images(bundle: dict, images: list[Path], net, *, batch_size: int = 32, quiet: bool = True) -> list[dict]:
    """Label every image; unreadable ones get ``label``/``score`` None and an ``error``.

    Args:
        bundle: from ``load_bundle``.
        images: image paths, in output order.
        net: a ``backbone.Backbone`` (or ``engines.Int8Backbone``) built for the bundle's spec;
            one of another precision or int8 model is refused (``bundle.check_engine``).
        batch_size: images decoded per batch.
        quiet: no progress bar.

    Returns:
        One dict per image, in order: ``path``, ``label``, ``score``, ``error``.
    """
    from tqdm import tqdm

    from pipeline.images.listing import Listing
    from pipeline.images.decode import iter_batches

    spec = bundle["feature_spec"]
    check_engine("the model bundle", bundle, net)
    names = list(bundle["label_names"])
    estimator = bundle["estimator"]
    kind = bundle.get("score", "probability")
    storage = bundle.get("storage_dtype")
    n = len(images)
    # The reader's Listing joins root and path: "." keeps relative paths relative and
    # absolute ones absolute. Labels are unknown here, so all zero.
    listing = Listing(Path("."), ("?",), tuple(str(p) for p in images), np.zeros(n, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64))
    out: list[dict] = [{}] * n
    with tqdm(total=n, desc="predict", unit="img", disable=quiet, dynamic_ncols=True, leave=False) as bar:
        for batch in iter_batches(listing, np.arange(n), size=int(spec["input_size"]), interpolation=spec["resize"], batch_size=batch_size):
            ok = batch.ok
            if ok.any():
                feats = net(batch.pixels[ok])
                if storage:  # the model saw features rounded to the file's storage dtype
                    feats = feats.astype(storage).astype(np.float32)
                labels, scores = _scores(estimator, pool_features(feats, spec["pool"]), kind)
            good = iter(zip(labels.tolist(), scores.tolist())) if ok.any() else iter(())
            for i, is_ok, reason in zip(batch.indices.tolist(), ok.tolist(), batch.reasons):
                if is_ok:
                    label, score = next(good)
                    out[i] = {"path": str(images[i]), "label": names[int(label)], "score": float(score), "error": None}
                else:
                    out[i] = {"path": str(images[i]), "label": None, "score": None, "error": reason}
            bar.update(len(batch.indices))
    return out


def check_output(output: Path, model_path: Path, images: list[Path], overwrite: bool = False) -> None:
    """Refuse an output that would destroy something, and make its folder, before any image is read.

    Raises:
        PipelineError: ``output`` is the bundle or one of the images (by file identity,
            however spelled; even with ``overwrite``); it exists and is not a predictions
            file (without ``overwrite``); its folder cannot be created or written.
    """
    inputs = [("the model bundle", model_path), *(("the image", p) for p in images)]
    refuse_inputs_as_outputs([output], inputs, "choose another -o file")
    if (output.exists() or output.is_symlink()) and not overwrite and not is_predictions_file(output):
        raise PipelineError(f"{output}: exists and is not a predictions file written by predict; pass --overwrite to replace it")
    prepare_output_dir(output.parent)


def label_images(config: PredictConfig) -> list[dict]:
    """Predict every image of ``config.inputs`` with the bundle ``config.model`` and write the results.

    Args:
        config: the settings (validated here first).

    Returns:
        One dict per image (``path``, ``label``, ``score``, ``error``), in input order.

    Raises:
        PipelineError: bad settings, a bundle that is missing or not ours, a missing
            input path or no images at all, an output that is an input or an existing
            file that is not a predictions file (see ``check_output``), weights that cannot
            be resolved or whose checksum differs from the bundle's, an unwritable output
            (checked before the work; if the write still fails, e.g. on a full disk, the
            predictions go to standard output and the error says so).
    """
    config.validate()
    model_path = Path(config.model)
    bundle = load_bundle(model_path)
    check_spec(model_path, bundle)
    images = collect_images(config.inputs)
    if config.output is not None:
        check_output(Path(config.output), model_path, images, config.overwrite)
    warn_on_version_change(model_path, bundle)
    from pipeline.backbones.int8 import Calibration, open_backbone

    info = resolve_bundle_weights(model_path, bundle, config.weights, progress=not config.quiet)
    spec = bundle["feature_spec"]
    # int8: the very model the training features came from, found in the cache by its key.
    int8_model = Calibration.known(spec["int8_model"]) if bundle["precision"] == "int8" else None
    try:
        net = open_backbone(int(spec["input_size"]), info, bundle["precision"], batch_size=config.batch_size, calibration=int8_model, backbone=spec["backbone"])
    except PipelineError as exc:
        raise PipelineError(f"{model_path}: {exc}") from None
    if net.weights_checksum != spec["weights_checksum"]:
        raise PipelineError(f"{model_path}: the loaded weights have checksum {net.weights_checksum[:16]}..., not the model's {str(spec['weights_checksum'])[:16]}...")
    results = predict_images(bundle, images, net, batch_size=config.batch_size, quiet=config.quiet)
    text = format_results(results, config.format)
    try:
        write_predictions(text, config.output)
    except PipelineError as exc:
        if config.output is None:
            raise
        # The labelling is done: keep its results on standard output rather than lose them.
        write_predictions(text, None)
        raise PipelineError(f"{exc}; the {len(results)} predictions were written to standard output instead") from None
    bad = sum(r["error"] is not None for r in results)
    if bad:
        print(f"{bad} of {len(results)} images could not be read (listed with their reason in the output)", file=sys.stderr)
    if not config.quiet:
        where = f" -> {config.output}" if config.output else ""
        kind = "probabilities" if bundle.get("score", "probability") == "probability" else "decision values (not probabilities)"
        done = len(results) - bad
        print(f"predicted {done} image{'' if done == 1 else 's'} with {model_path} (scores are {kind}){where}", file=sys.stderr)
    return results


def run(config: PredictConfig) -> int:
    """``python -m pipeline predict``: label the images (see ``label_images``) and give the exit status.

    Returns:
        0 if at least one image was predicted, 1 if none could be read.

    Raises:
        PipelineError: as for ``label_images`` (the CLI prints it on one line and exits 2).
    """
    results = label_images(config)
    if all(r["error"] is not None for r in results):
        print(f"error: none of the {len(results)} images could be read", file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``predict`` on an argparse sub-parsers object; returns the new parser."""
    p = sub.add_parser("predict", help="label images with a trained model bundle (features rebuilt exactly as in training)")
    settings.add_options(p, PredictConfig)
    return p


def from_args(args: argparse.Namespace, argv: list[str] | None = None) -> PredictConfig:
    """The PredictConfig of parsed ``predict`` flags, recording the command line."""
    return settings.from_args(PredictConfig, args, command_line=command_line(argv))
