"""Evaluate stage: score a trained bundle on a labelled feature file or a labelled image folder: accuracy with its 95% interval, macro-F1, per-class report, confusion plot and the misclassified images, written as one set.

A feature file must hold what the bundle was trained on (backbone, layer, size, resize,
weights, precision: ``bundle.check_features_match``); a folder is read like ``predict`` reads
images (features rebuilt exactly as in training), its unreadable images listed with their
reason. Classes are matched by name: every class of the data must be one of the model's.
The outputs (``metrics.json``, ``report.txt``, ``confusion.png``, ``misclassified.csv``,
``rejected.csv``) go into one folder that replaces the previous evaluation only when all are
written (``core.outputs.atomic_folder``).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.classical.bundle import check_features_match, check_spec, load_bundle, warn_on_version_change
from pipeline.rows.pooling import read_groups
from pipeline.classical.overlap import row_files, say_stale
from pipeline.images.listing import list_images
from pipeline.images.overlap import listing_files, recorded_files, refuse_shared, say_unknown_bytes, shared_files
from pipeline.core.digests import file_digest
from pipeline.core.guard import refuse_inside, refuse_replacing_inputs
from pipeline.featurefile.checks import shard_files
from pipeline.core import config as settings
from pipeline.core.command import Command
from pipeline.core.config import MAX_INT, Interval, option
from pipeline.core.errors import PipelineError
from pipeline.report.metrics import accuracy_text, classification_report, csv_text, rough_warning, scores
from pipeline.core.outputs import OutputLock, atomic_folder, clear_left, is_within, package_versions, prepare_output_dir, write_json_atomic, write_text_atomic

#: The file that marks a folder as an evaluation (``-o`` replaces such a folder without ``--overwrite``).
MARKER = "metrics.json"
#: Every file evaluate writes into its folder: a folder holding anything else is replaced only with --overwrite.
#: The sha256 of every file an evaluation wrote: a later run replaces the folder only if they are unchanged.
RECEIPT = ".evaluate.receipt"
OUTPUT_FILES = frozenset({MARKER, "report.txt", "confusion.png", "misclassified.csv", "rejected.csv", RECEIPT})


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of ``python -m pipeline evaluate``.

    Attributes:
        model: the bundle written by ``train``.
        data: a labelled feature file (``.h5`` from ``extract``) or a class-per-folder image tree.
        output: the evaluation folder; None = ``MODEL-evaluation/`` beside the model.
        batch_size: images per network call (folders only).
        weights: weights to resolve instead of the bundle's (folders only), as ``predict --weights``.
        overwrite: replace an existing ``output`` folder that is not an evaluation.
        allow_overlap: score on data holding images the model was fitted on (refused otherwise).
        quiet: no progress bar.
        command_line: recorded in the metrics.
    """

    model: Path = option(help="model bundle written by train", positional=True, metavar="MODEL.joblib")
    data: Path = option(help="labelled test data: a feature file (.h5) or a class-per-folder image tree", positional=True, metavar="FEATURES.h5|DIR")
    output: Path | None = option(None, "evaluation folder; none = MODEL-evaluation/ beside the model", short="-o")
    batch_size: int = option(32, "images per network call (image folders)", rule=Interval(int, 1, MAX_INT))
    weights: str | None = option(None, "weights to use instead of the bundle's (image folders; a model trained on a weights FILE needs its path)")
    overwrite: bool = option(False, "let -o replace an existing folder that is not an evaluation")
    allow_overlap: bool = option(False, "score on data that holds images the model was fitted on (same file or same content)")
    quiet: bool = option(False, "no progress bar")
    command_line: str = option("", cli=False)

    @property
    def folder(self) -> Path:
        model = Path(self.model)
        return Path(self.output) if self.output is not None else model.with_name(f"{model.stem}-evaluation")


def _class_map(where: Path, data_names: list[str], model_names: list[str]) -> np.ndarray:
    """Data label index -> model label index, by class name."""
    unknown = [n for n in data_names if n not in model_names]
    if unknown:
        raise PipelineError(f"{where}: class {unknown[0]!r} is not one of the model's classes ({', '.join(model_names)}); evaluate on data of the same classes")
    return np.asarray([model_names.index(n) for n in data_names], np.int64)


def _from_feature_file(config: EvaluateConfig, bundle: dict):
    """(true labels, predicted labels, scores of the prediction, paths, rejected) of a feature file's rows."""
    from pipeline.inference.scoring import class_scores
    from pipeline.featurefile.store import open_features

    with open_features(config.data) as ff:
        check_features_match(config.model, bundle, ff)
        to_model = _class_map(ff.path, ff.label_names, list(bundle["label_names"]))
        rows = np.arange(len(ff))
        if not len(rows):
            raise PipelineError(f"{ff.path}: the feature file has no rows to evaluate")
        (X,) = read_groups(ff, [rows], bundle["feature_spec"]["pool"], quiet=config.quiet)
        y = to_model[ff.labels]
        paths = ff.paths
        rejected = [(os.fsdecode(p), os.fsdecode(r)) for p, r in zip(ff.db["rejected/paths"][:], ff.db["rejected/reasons"][:])] if "rejected" in ff.db else []
    estimator = bundle["estimator"]
    s = class_scores(estimator, X, bundle.get("score", "probability"))
    classes = np.asarray(estimator.classes_)
    return y, classes[s.argmax(axis=1)], s.max(axis=1), paths, rejected


def _from_folder(config: EvaluateConfig, bundle: dict):
    """The same for a class-per-folder tree, its features computed as ``predict`` computes them."""
    from pipeline.inference.scoring import class_scores, open_bundle_network, pooled_batches

    listing = list_images(config.data)
    to_model = _class_map(Path(config.data), list(listing.class_names), list(bundle["label_names"]))
    net = open_bundle_network(config.model, bundle, weights=config.weights, batch_size=config.batch_size, progress=not config.quiet)
    paths = [listing.root / p for p in listing.paths]
    estimator = bundle["estimator"]
    classes = np.asarray(estimator.classes_)
    kept, pred, score, rejected = [], [], [], [(r.path, r.reason) for r in listing.skipped]
    for indices, ok, reasons, X in pooled_batches(bundle, paths, net, batch_size=config.batch_size, quiet=config.quiet):
        if X is not None:
            s = class_scores(estimator, X, bundle.get("score", "probability"))
            pred += classes[s.argmax(axis=1)].tolist()
            score += s.max(axis=1).tolist()
        kept += indices[ok].tolist()
        rejected += [(listing.paths[i], r) for i, good, r in zip(indices.tolist(), ok.tolist(), reasons) if not good]
    if not kept:
        raise PipelineError(f"{config.data}: none of the {len(listing)} images could be read")
    return to_model[listing.labels[kept]], np.asarray(pred), np.asarray(score), [listing.paths[i] for i in kept], rejected


def _check_overlap(config: EvaluateConfig, bundle: dict, file_rows: list | None) -> None:
    """Refuse data holding an image the model was fitted on (the bundle's ``training_images``), unless ``--allow-overlap``.

    ``file_rows``: the test feature file's ``row_files`` (None for an image folder, listed here).
    A bundle of an earlier version records none: said on stderr, not pretended.
    """
    if config.allow_overlap:
        return
    trained_on = recorded_files(bundle.get("training_images"))
    if trained_on is None:
        print(f"note: {config.model} does not record the images it was fitted on (an earlier version's bundle, or an edited one): "
              f"not checked whether {config.data} holds some of them", file=sys.stderr)  # fmt: skip
        return
    data = Path(config.data)
    files = listing_files(list_images(data)) if file_rows is None else file_rows
    say_unknown_bytes(trained_on, f"the model {config.model}", data)
    found = shared_files(trained_on, files)
    refuse_shared(found, data, len(files), f"the model {config.model}")


def _check_output(config: EvaluateConfig, bundle: dict, test_images: str | None) -> Path:
    """The evaluation folder, refused where it would replace an input or a folder evaluate did not write (``test_images``: the
    image folder a test feature file was extracted from, None for an image folder)."""
    folder = config.folder
    inputs = [("the model bundle", Path(config.model)), ("the test data", Path(config.data))]
    if config.weights and Path(config.weights).exists():
        inputs.append(("the weights file", Path(config.weights)))
    if Path(config.data).is_file():  # a merged test file reads its shards: deleting them breaks it
        inputs += [("a shard of the test file", shard) for shard in shard_files(config.data)]
    trained_in = (bundle.get("training_images") or {}).get("data_dir") if isinstance(bundle.get("training_images"), dict) else None
    images = [("the model's training images", trained_in), ("the images of the test file", test_images)]
    refuse_replacing_inputs(folder, inputs + [(w, Path(p)) for w, p in images if p and Path(p).is_dir()], "evaluate", "choose another -o folder")
    if Path(config.data).is_dir() and is_within(folder, Path(config.data)):
        raise PipelineError(f"{folder}: is inside the test data folder {config.data} (its files would be read as images next time); choose another -o folder")
    refuse_inside(folder, images, "choose another -o folder")
    if os.path.lexists(folder) and not (folder.is_dir() and ((folder / MARKER).is_file() or (folder / RECEIPT).is_file())):
        # not an evaluation at all (a data root, a user's folder): replaced whole it would be lost, --overwrite or not
        raise PipelineError(f"{folder}: exists and is not an evaluation folder written by evaluate; evaluate replaces only its own: choose another -o folder")
    if os.path.lexists(folder) and not config.overwrite:
        foreign = sorted(n for n in os.listdir(folder) if n not in OUTPUT_FILES)
        if foreign:  # a train set or a note written into the folder since: replacing it would delete them
            raise PipelineError(f"{folder}: holds {len(foreign)} file(s) evaluate did not write (e.g. {foreign[0]}); pass --overwrite to replace the folder, or choose another -o folder")
        changed = _changed_since(folder)
        if changed:  # a user's metrics.json, a hand-edited report: evaluate's own files only, as it wrote them
            raise PipelineError(f"{folder}: {changed} is not as evaluate wrote it (no receipt {RECEIPT}, or changed since); pass --overwrite to replace the folder, or choose another -o folder")
    return folder


def _changed_since(folder: Path) -> str | None:
    """The first file of an evaluation folder that is not what its receipt says evaluate wrote (the receipt itself when unusable); None: all as written."""
    try:
        if not (folder / RECEIPT).is_file() or (folder / RECEIPT).is_symlink():
            return RECEIPT
        digests = json.loads((folder / RECEIPT).read_text())
    except (OSError, ValueError):
        return RECEIPT
    if not isinstance(digests, dict):
        return RECEIPT
    for name in sorted(OUTPUT_FILES - {RECEIPT}):
        path = folder / name
        if os.path.lexists(path) and (path.is_symlink() or not path.is_file() or digests.get(name) != file_digest(path)):
            return name
    return None


def run(config: EvaluateConfig) -> dict:
    """``python -m pipeline evaluate``: score the bundle on the labelled data and write the evaluation folder.

    Returns:
        The metrics dict (also ``metrics.json``).

    Raises:
        PipelineError: bad settings; a missing or foreign bundle; data that is neither a
            feature file nor a class-per-folder tree; a feature file of other features than
            the model's; a class the model does not know; no readable image; an output that
            is an input, inside the data folder, or an existing folder that is not an evaluation.
    """
    settings.validate(config)
    model_path, data = Path(config.model), Path(config.data)
    bundle = load_bundle(model_path)
    check_spec(model_path, bundle)
    if not data.exists():
        raise PipelineError(f"{data}: no such feature file or folder")
    if data.is_dir() and is_within(model_path, data):  # its plots would be scored as images of a class
        raise PipelineError(f"{model_path}: the model is inside the test data folder {data} (its files would be read as images); move it out")
    test_images, file_rows = None, None
    if data.is_file():  # a feature file, opened once for its checks: the image folder it was extracted from, its rows' images
        from pipeline.featurefile.store import open_features

        with open_features(data) as ff:
            test_images, file_rows = ff.attrs.get("data_dir"), None if config.allow_overlap else row_files(ff)
            _check_overlap(config, bundle, file_rows)
            if file_rows is not None:
                say_stale(ff, file_rows)  # as train --test says it: those rows were not compared by content
    else:
        _check_overlap(config, bundle, None)
    folder = _check_output(config, bundle, test_images)
    with OutputLock(prepare_output_dir(folder.parent) / folder.name):  # one run per folder; checked again under the lock
        clear_left(folder)  # a swap a kill cut short is put back first: what --overwrite consents to is the folder as it then is
        folder = _check_output(config, bundle, test_images)
        return _evaluate(config, model_path, bundle, folder, test_images, _contents(folder))


def _contents(folder: Path) -> dict | None:
    """What a folder holds (name -> size, modification time, inode of each entry), None when there is none: what ``--overwrite`` consented to replace."""
    try:
        return {e.name: (e.stat(follow_symlinks=False).st_size, e.stat(follow_symlinks=False).st_mtime_ns, e.inode()) for e in os.scandir(folder)}
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PipelineError(f"{folder}: cannot be read ({exc.strerror or exc}); choose another -o folder") from None


def _evaluate(config: EvaluateConfig, model_path: Path, bundle: dict, folder: Path, test_images: str | None, before: dict | None) -> dict:
    data = Path(config.data)
    warn_on_version_change(model_path, bundle)
    y, pred, score, paths, rejected = (_from_folder if data.is_dir() else _from_feature_file)(config, bundle)
    names = list(bundle["label_names"])
    metrics = {
        "model": str(model_path), "data": str(data), **scores(y, pred, names),
        "score_kind": bundle.get("score", "probability"), "n_rejected": len(rejected),
        "command_line": config.command_line, "versions": package_versions(),
    }  # fmt: skip
    wrong = np.flatnonzero(pred != y)
    header = f"{bundle.get('model')} {model_path} on {data}: {accuracy_text(metrics)}, macro-F1 {metrics['macro_f1']:.3f}\n\n"
    from pipeline.report import plots

    with atomic_folder(folder) as tmp:
        write_json_atomic(tmp / MARKER, metrics)
        write_text_atomic(tmp / "report.txt", header + classification_report(y, pred, names))
        score_name = "probability" if metrics["score_kind"] == "probability" else "margin"
        write_text_atomic(tmp / "misclassified.csv", csv_text(["path", "true", "predicted", score_name], [(paths[i], names[y[i]], names[pred[i]], f"{score[i]:.6g}") for i in wrong]))
        write_text_atomic(tmp / "rejected.csv", csv_text(["path", "reason"], rejected))
        plots.confusion_matrix(np.asarray(metrics["confusion"]), names, tmp / "confusion.png", title=f"{bundle.get('model')}: {accuracy_text(metrics)}")
        write_json_atomic(tmp / RECEIPT, {p.name: file_digest(p) for p in sorted(tmp.iterdir()) if p.name != RECEIPT})
        _check_output(config, bundle, test_images)  # again at the swap: a note put in the folder during the run is not deleted with it
        now = _contents(folder)
        if now != before:  # --overwrite consented to what was there at the start, not to a file (a model set) written since
            changed = sorted(set(now or {}) ^ set(before or {}) | {n for n in set(now or {}) & set(before or {}) if now[n] != before[n]})
            raise PipelineError(f"{folder}: changed during the run (e.g. {changed[0] if changed else 'the folder'}); it was not replaced: run again")
    print(f"{header.strip()}; {len(wrong)} misclassified, {len(rejected)} unreadable -> {folder}/", file=sys.stderr)
    absent = [n for i, n in enumerate(names) if not np.any(y == i)]
    if absent:  # not scored: the accuracy and macro-F1 say nothing about them
        counted = len(set(y.tolist()) | set(pred.tolist()))
        print(f"warning: {len(absent)} of the model's {len(names)} classes have no image in {data} ({', '.join(absent)}): nothing here measures them; "
              f"macro-F1 averages the {counted} classes with an image or a prediction", file=sys.stderr)
    warning = rough_warning(metrics["n_scored"])
    if warning:
        print(warning, file=sys.stderr)
    return metrics


COMMAND = Command("evaluate", EvaluateConfig, run, "score a trained model on a labelled feature file or image folder (interval, report, confusion, misclassified images)")
