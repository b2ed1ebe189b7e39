"""Predict stage: images -> the features a model bundle was trained on (same network, weights, size, resize, precision, pooling) -> label and score per image; unreadable images are reported, never fatal.

Scores: for ``lr`` and ``rf`` the largest class probability (``predict_proba``); for
``svm`` the largest decision-function value, a margin and NOT a probability (for two
classes, the absolute margin). A model file is a pickle: load only bundles you trust.

The output never replaces an input (the bundle or an image, by file identity) and never
replaces a file that is not an earlier predictions file without ``--overwrite``; both are
checked, with the output folder, before any image is read. File names that are not valid
UTF-8 are written as their original bytes (see ``predictions``). Predict writes one file, so
it is replaced atomically; the bundle it reads belongs to train's output set, which it
settles first (``load_bundle`` calls ``core.outputsets.settle_for``): it never loads a model from a half-moved set.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.classical.bundle import check_spec, load_bundle, warn_on_version_change
from pipeline.inference.scoring import class_scores, collect_images, open_bundle_network, pooled_batches
from pipeline.core.guard import refuse_inputs_as_outputs
from pipeline.inference.predictions import FORMATS, format_results, is_predictions_file, write_predictions
from pipeline.core import config as settings
from pipeline.core.command import Command
from pipeline.core.config import MAX_INT, Interval, OneOf, option
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import OutputLock, prepare_output_dir, special_kind


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
        top_k: the K best classes per image (1: the label and its score only).
        probabilities: every class's probability per image (probability bundles: lr, rf).
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
    top_k: int = option(1, "also write the K best classes with their scores, best first", rule=Interval(int, 1, MAX_INT), metavar="K")
    probabilities: bool = option(False, "also write every class's probability (csv: one p:CLASS column each; json: a probabilities object); lr and rf models")
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


def predict_images(bundle: dict, images: list[Path], net, *, batch_size: int = 32, quiet: bool = True, top_k: int = 1, probabilities: bool = False) -> list[dict]:
    """Label every image; unreadable ones get ``label``/``score`` None and an ``error``.

    Args:
        bundle: from ``load_bundle``.
        images: image paths, in output order.
        net: a ``backbone.Backbone`` (or ``engines.Int8Backbone``) built for the bundle's spec;
            one of another precision or int8 model is refused (``bundle.check_engine``).
        batch_size: images decoded per batch.
        quiet: no progress bar.
        top_k: with more than 1, each result also has ``top``: the ``top_k`` best classes
            (``label``, ``score``), best first.
        probabilities: each result also has ``probabilities``: every class name -> its probability
            (a class the estimator never saw: 0). Probability bundles only.

    Returns:
        One dict per image, in order: ``path``, ``label``, ``score``, ``error`` (and ``top``,
        ``probabilities`` as asked).
    """
    names = list(bundle["label_names"])
    estimator = bundle["estimator"]
    kind = bundle.get("score", "probability")
    classes = np.asarray(estimator.classes_)
    out: list[dict] = [{}] * len(images)
    for indices, ok, reasons, X in pooled_batches(bundle, images, net, batch_size=batch_size, quiet=quiet):
        scores = class_scores(estimator, X, kind) if X is not None else np.zeros((0, len(classes)))
        rows = iter(scores)
        for i, is_ok, reason in zip(indices.tolist(), ok.tolist(), reasons):
            r = {"path": str(images[i]), "label": None, "score": None, "error": reason}
            if is_ok:
                s = next(rows)
                order = np.argsort(-s, kind="stable")[: max(1, top_k)]
                r.update(label=names[int(classes[order[0]])], score=float(s[order[0]]), error=None)
                if top_k > 1:
                    r["top"] = [{"label": names[int(classes[j])], "score": float(s[j])} for j in order]
                if probabilities:
                    r["probabilities"] = {name: 0.0 for name in names} | {names[int(c)]: float(p) for c, p in zip(classes, s)}
            elif top_k > 1:
                r["top"] = []
            out[i] = r
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
    if output.is_symlink() or special_kind(output) or output.is_dir():  # replaced by a file, --overwrite or not (a device, /dev/stdout)
        kind = "a symbolic link" if output.is_symlink() else "a folder" if output.is_dir() else special_kind(output)
        raise PipelineError(f"{output}: is {kind}; predict writes a file in its place, never over a link, a folder or a device: choose another -o file")
    if output.exists() and not overwrite and not is_predictions_file(output):
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
    if config.probabilities and bundle.get("score", "probability") != "probability":
        raise PipelineError(f"{model_path}: a {bundle.get('model')} model gives decision margins, not probabilities; --probabilities needs an lr or rf model")
    images = collect_images(config.inputs)
    top_k = min(config.top_k, len(bundle["label_names"]))
    if top_k < config.top_k:  # columns past the classes were written empty
        print(f"note: --top-k {config.top_k} is more than the model's {top_k} classes; writing the {top_k} best", file=sys.stderr)
    with contextlib.ExitStack() as held:
        if config.output is not None:
            check_output(Path(config.output), model_path, images, config.overwrite)
            held.enter_context(OutputLock(Path(config.output)))  # one writer per output (another predict, an export) for the whole run
            check_output(Path(config.output), model_path, images, config.overwrite)  # again, under the lock
        warn_on_version_change(model_path, bundle)
        net = open_bundle_network(model_path, bundle, weights=config.weights, batch_size=config.batch_size, progress=not config.quiet)
        results = predict_images(bundle, images, net, batch_size=config.batch_size, quiet=config.quiet, top_k=top_k, probabilities=config.probabilities)
        text = format_results(results, config.format, top_k=top_k, class_names=list(bundle["label_names"]) if config.probabilities else None)
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


COMMAND = Command("predict", PredictConfig, run, "label images with a trained model bundle (features rebuilt exactly as in training)")
