"""Compare's rows, one function per row kind (frozen features + a classical model, a network trained by a nets stage, the LP-FT probe alone), each with its per-image test predictions, reused only when its settings and the digests of its inputs are unchanged."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.backbones.registry import BACKBONE
from pipeline.compare.config import CLASSICAL_NAMES, IGNORED_FIELDS, PROBE_NAME, CompareConfig, backbone_row_name
from pipeline.core.config import config_json
from pipeline.core.digests import file_digest, key_of
from pipeline.core.errors import NeedsOverwrite, PipelineError, first_line
from pipeline.core.outputs import as_json, write_json_atomic
from pipeline.core.outputsets import as_written, settle_for
from pipeline.report.stats import majority_vote


@dataclass
class Inputs:
    """The digests of a data root's ``train`` and ``test`` trees (paths, labels and bytes) and of the weights files, computed once per run."""

    data_root: Path
    digests: dict = field(default_factory=dict)

    def digest(self, split: str) -> str:
        if split not in self.digests:
            from pipeline.images.listing import list_images

            listing = list_images(Path(self.data_root) / split)
            self.digests[split] = listing.content_digest()
        return self.digests[split]

    def weights(self, spec, backbone: str) -> str:
        """The checksum of the weights ``spec`` names for ``backbone`` (as a nets run records it), resolved once per run."""
        if (spec, backbone) not in self.digests:
            from pipeline.backbones.weights import resolve_weights

            self.digests[(spec, backbone)] = resolve_weights(spec, backbone=backbone, progress=False).checksum
        return self.digests[(spec, backbone)]


def _settings(cfg) -> dict:
    return {k: v for k, v in config_json(cfg).items() if k not in IGNORED_FIELDS}


def features_path(output: Path, split: str, backbone: str = BACKBONE) -> Path:
    """Where compare keeps a split's features: ``OUT/split.h5`` (VGG16) or ``OUT/<backbone>/split.h5``."""
    return (output if backbone == BACKBONE else output / backbone) / f"{split}.h5"


def extract(config: CompareConfig, split: str, backbone: str = BACKBONE) -> Path:
    """Extract (or bring up to date) the features of ``data_root/split`` with ``backbone``; the feature file."""
    from pipeline.extract.config import ExtractConfig
    from pipeline.extract.stage import run as run_extract

    out = features_path(config.output, split, backbone)
    cfg = ExtractConfig(data_dir=config.data_root / split, output=out, input_size=config.input_size, weights=config.weights, backbone=backbone, quiet=config.quiet)
    try:
        code = run_extract(cfg)
    except NeedsOverwrite as exc:  # extract's advice names its own flag, which compare does not have
        raise PipelineError(f"{exc.problem}; compare keeps its features there: remove that file to extract again with these settings, "
                            "or choose another -o") from None  # fmt: skip
    if code not in (0, 1):
        raise PipelineError(f"extract of {config.data_root / split} with {backbone} failed")
    return out


@functools.lru_cache(maxsize=None)
def backbone_bytes(backbone: str, input_size: int) -> int:
    """Bytes of a backbone's float32 weights, which a frozen-feature model needs at prediction time."""
    from pipeline.backbones.network import build

    return 4 * int(build(backbone, input_size, "float32").count_params())


def extract_rate(path: Path) -> tuple[float, float]:
    """(seconds to extract the whole file, images/s) from a feature file's attributes (``rate_images``/``rate_seconds`` when present)."""
    from pipeline.featurefile.store import open_features

    with open_features(path) as ff:
        a = ff.attrs
        n = len(ff)
    # the run that timed the most images (an update's few images time start-up); earlier files and merged ones: the last run
    processed = int(a.get("rate_images") or a.get("images_processed_last_run") or 0)
    seconds = float(a.get("rate_seconds") or a.get("extract_seconds") or 0.0)
    if processed <= 0 or seconds <= 0:
        return float("nan"), float("nan")
    rate = processed / seconds
    return n / rate, rate


def deployed_rate(test_h5: Path, predict_seconds: float, n_test: int) -> float:
    """Images/s of a frozen-feature model on new images: extraction plus the classifier (seconds per image add up)."""
    _, test_rate = extract_rate(test_h5)
    return 1.0 / (1.0 / test_rate + (predict_seconds / n_test if n_test else 0.0))


def _predictions(paths, y_true, y_pred) -> dict:
    return {"paths": list(paths), "y_true": [int(v) for v in y_true], "y_pred": [int(v) for v in y_pred]}


def classical_row(config: CompareConfig, model: str, train_h5: Path, test_h5: Path, *, train_paths: list[str] | None = None,
                  folder: Path | None = None, backbone: str = BACKBONE, seen: dict | None = None) -> dict:  # fmt: skip
    """A frozen-feature row: ``train``'s own plan, fit and prediction (its defaults and cross-validated search) on the rows of ``train_h5``.

    Args:
        config: compare's settings (seed, quiet, rerun, input size).
        model: ``lr``, ``svm`` or ``rf``.
        train_h5, test_h5: the feature files.
        train_paths: fit on these rows only (``--sizes``); None = every row.
        folder: where the row's record goes (default ``OUT/models``).
        backbone: the features' backbone (names the row).
        seen: a dict one compare run keeps across its rows: each training file's ``row_files`` (by path and digest), so its
            images are stat-ed once per run, not once per row and size.

    Raises:
        PipelineError: as ``train`` (incompatible files, too few rows per class...), or a
            training path without a row in ``train_h5``.
    """
    from pipeline.classical import train
    from pipeline.classical.overlap import row_files
    from pipeline.report.metrics import scores
    from pipeline.featurefile.store import check_compatible, open_features

    folder = Path(folder or config.models)
    cfg = train.TrainConfig(features=train_h5, model=model, test=test_h5, output=folder, seed=config.seed, quiet=config.quiet).validate()
    subset = hashlib.sha256(b"\n".join(sorted(map(os.fsencode, train_paths)))).hexdigest() if train_paths is not None else None
    key = {"settings": _settings(cfg), "train": file_digest(train_h5), "test": file_digest(test_h5), "subset": subset}
    record = folder / f"{model}{'' if backbone == BACKBONE else '-' + backbone}.row.json"
    stored = None if config.rerun else _stored(record)
    if stored is not None and stored.get("key") == key and isinstance(stored.get("row"), dict):
        if stored.get("row_digest") == key_of(stored["row"]):
            return stored["row"]
        print(f"note: {record}: not the row compare wrote (edited since, or written by an earlier version); computing this row again", file=sys.stderr)
    with open_features(train_h5) as ff, open_features(test_h5) as test_ff:
        check_compatible(ff, test_ff)
        rows = None
        if train_paths is not None:
            index = {p: i for i, p in enumerate(ff.paths)}
            missing = [p for p in train_paths if p not in index]
            if missing:
                raise PipelineError(f"{train_h5}: no row for {missing[0]} (rejected at extraction?); remove it from the training tree")
            rows = np.sort(np.asarray([index[p] for p in train_paths], np.int64))
        seen = {} if seen is None else seen
        if (str(train_h5), key["train"]) not in seen:
            seen[(str(train_h5), key["train"])] = row_files(ff)
        try:
            plan = train.plan_fit(cfg, ff, test_ff, rows, files=seen[(str(train_h5), key["train"])])
        except train.TooFewPerClass as exc:  # its advice names --cv, which compare does not take
            raise PipelineError(f"{train_h5}: class {exc.name!r} has {exc.have} distinct training images but the frozen-feature rows' {exc.need}-fold "
                                "search needs at least that many per class; add images to it, or leave lr, svm and rf out of --strategies") from None
        fitted, y_test, y_pred, predict_seconds = train.fit_predict(cfg, ff, test_ff, plan)
        s = scores(y_test, y_pred, test_ff.label_names)
        test_paths = test_ff.paths
    extract_seconds, rate = extract_rate(train_h5)
    n_train, n_test = int(len(plan.train_rows)), int(len(plan.test_rows))
    row = {
        "strategy": backbone_row_name(backbone) if model == "lr" else CLASSICAL_NAMES[model],
        "accuracy": s["accuracy"],
        "macro_f1": s["macro_f1"],
        "n_train": n_train,
        "n_val": 0,
        "chosen_by": f"{cfg.cv}-fold CV on the train rows",
        "train_seconds": extract_seconds + fitted.fit_seconds,
        "images_per_second": deployed_rate(test_h5, predict_seconds, n_test),
        "model_bytes": len(pickle.dumps(fitted.estimator)) + backbone_bytes(backbone, config.input_size),
        "n_test": n_test,
        "seeds": [config.seed],
        "seed_accuracies": [s["accuracy"]],
        "accuracy_sd": None,
        "best_params": fitted.search.best_params,
        "source": str(record),
        "notes": f"fitted on all {n_train} training images; hyper-parameters ({_params(fitted.search.best_params)}) by {cfg.cv}-fold "
        f"cross-validation within them (no separate validation rows); train_seconds = extraction of the training file "
        f"({extract_seconds:.0f} s at {rate:.1f} img/s) + fit; model_bytes includes the {backbone} base needed to extract features",
        "predictions": _predictions(test_paths, y_test, y_pred),
    }
    row = as_json(row)  # as a reuse reads it back, and its digest: a row edited by hand is computed again, never reused
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, {"key": key, "row": row, "row_digest": key_of(row)})
    return row


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def net_config(config: CompareConfig, strategy: str, unfreeze: str, seed: int):
    """(stage module, its config, output name) of a nets strategy at ``seed`` (seeds after the first write to ``FOLDER-seedN``)."""
    from pipeline.nets import finetune, scratch

    data, test = config.data_root / "train", config.data_root / "test"
    suffix = "" if seed == config.seed else f"-seed{seed}"
    common = dict(data_dir=data, test_dir=test, seed=seed, refit=config.refit, quiet=config.quiet, allow_overlap=config.allow_overlap)
    if strategy == "scratch":
        cfg = scratch.ScratchConfig(out_dir=config.models / f"scratch{suffix}", input_size=config.scratch_input_size, epochs=config.scratch_epochs, **common)
        return scratch, cfg, "scratch"
    if strategy == "scratch-resnet":
        cfg = scratch.ScratchConfig(out_dir=config.models / f"scratch-resnet{suffix}", arch="resnet", depth=config.resnet_depth,
                                    input_size=config.resnet_input_size, epochs=config.resnet_epochs, **common)  # fmt: skip
        return scratch, cfg, "scratch"
    folder = {"head": "head", "finetune-dense": "finetune-dense", "finetune": f"lpft-{unfreeze}", "finetune-plain": f"lpft-{unfreeze}-plain"}[strategy]
    dense = strategy in ("head", "finetune-dense")
    cfg = finetune.FinetuneConfig(
        out_dir=config.models / f"{folder}{suffix}", backbone=config.backbone, input_size=config.input_size,
        unfreeze_from={"head": "none", "finetune-dense": None}.get(strategy, unfreeze),
        head="dense" if dense else "probe", **({"lr": finetune.CLASSIC_LR} if dense else {}),
        head_epochs=config.head_epochs, epochs=config.epochs, weights=config.weights,
        cache=strategy != "finetune-plain", prefix_cache=config.output / "prefix-cache", **common,
    )  # fmt: skip
    return finetune, cfg, "finetune"


def _stored(path: Path) -> dict | None:
    """A row's stored record, or None when there is none or it is damaged (said on stderr: the row is computed again)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        print(f"note: {path}: unreadable ({first_line(exc)}); computing this row again", file=sys.stderr)
        return None
    return record if isinstance(record, dict) else None


def net_metrics(config: CompareConfig, strategy: str, unfreeze: str, seed: int, inputs: Inputs) -> tuple[dict, Path]:
    """The metrics of a nets strategy at ``seed`` and their file: reused when written with the same settings from the same images, else trained now."""
    module, cfg, name = net_config(config, strategy, unfreeze, seed)
    path = Path(cfg.out_dir) / f"{name}.metrics.json"
    digests = {"train": inputs.digest("train"), "test": inputs.digest("test")}
    settle_for(path)  # a set a killed run left half moved is finished first: a row is reused only from a whole set
    m = None if config.rerun else _stored(path)
    if m is not None and _settings(cfg) == {k: v for k, v in (m.get("config") or {}).items() if k not in IGNORED_FIELDS} and m.get("data_digest") == digests:
        weights = (m.get("weights") or {}).get("checksum") if name == "finetune" else None
        if name == "finetune" and weights != inputs.weights(cfg.weights, cfg.backbone):  # the same path, other weights: another network
            print(f"note: {path}: trained from other weights than {cfg.weights} holds now; training this row again", file=sys.stderr)
        elif as_written(path, name):  # its set's receipt: a hand-edited metrics file is not that run's result
            return m, path
        else:
            print(f"note: {path}: not as its {name} run wrote it (edited since); training this row again", file=sys.stderr)
    module.run(cfg)
    return json.loads(path.read_text()), path


def _chosen(m: dict) -> str:
    refit = m.get("refit")
    return f"{m['n_val']} val rows" + (", then refit" if refit else "")


def _net_notes(m: dict) -> str:
    phases = ", ".join(f"{p['name']} {p['epochs_run']} epochs (best {p['best_epoch']})" for p in m.get("phases", []))
    refit = m.get("refit")
    final = (f"then refit from the start on all {refit['n_train']} rows for the chosen epochs {refit['chosen_epochs']}" if refit
             else f"final model = the selection's best epoch, trained on {m['n_train']} rows")  # fmt: skip
    cache = f"{m['cache_copies']} augmented copies cached up to {m['cache_layer']}, " if m.get("cache_copies") else ""
    return (f"{m.get('mode', '')}, {cache}{m.get('seconds_per_epoch', float('nan')):.1f} s/epoch; selection on {m['n_val']} validation rows: {phases}; "
            f"{final}; input {m.get('input_size')}, {m.get('precision')}")  # fmt: skip


def net_row(config: CompareConfig, strategy: str, unfreeze: str, inputs: Inputs) -> dict:
    """A network row: the nets stage run once per seed (``--repeats``), combined."""
    runs = []
    for seed in config.seeds:
        m, path = net_metrics(config, strategy, unfreeze, seed, inputs)
        runs.append({
            "strategy": m["strategy"] + (" [plain Keras loop]" if strategy == "finetune-plain" else ""),
            "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n_train": int(m["n_train"]), "n_val": int(m["n_val"]),
            "chosen_by": _chosen(m), "train_seconds": m["train_seconds"], "images_per_second": m["images_per_second"],
            "model_bytes": m["model_bytes"], "n_test": m.get("n_test"), "seed": seed, "source": str(path), "notes": _net_notes(m),
            "predictions": m["test_predictions"],
        })  # fmt: skip
    return combine(runs)


def probe_row(config: CompareConfig, test_h5: Path, inputs: Inputs) -> dict:
    """The probe LP-FT starts from, alone (per seed): its bundle, written by the LP-FT run, on the test feature file."""
    from pipeline.classical.bundle import load_bundle
    from pipeline.rows.pooling import read_groups
    from pipeline.report.metrics import scores
    from pipeline.featurefile.store import open_features
    from pipeline.nets.probe import check_probe

    runs = []
    for seed in config.seeds:
        m, metrics_path = net_metrics(config, "finetune", config.points[0], seed, inputs)
        info = m.get("probe") or {}
        path = Path(info.get("file") or "")
        if not as_written(path, "finetune"):  # read here: the set's receipt names its bytes (another run's probe was scored)
            raise PipelineError(f"{path}: not the probe its LP-FT run wrote (replaced or changed since); remove {path.parent} or pass --rerun to train it again")
        bundle = load_bundle(path)
        with open_features(test_h5) as ff:
            check_probe(path, bundle, {**ff.spec, "pool": bundle["feature_spec"]["pool"]}, ff.label_names, against=f"{test_h5} has")
            (x,) = read_groups(ff, [np.arange(len(ff))], bundle["feature_spec"]["pool"])
            y, names, paths = ff.labels, ff.label_names, ff.paths
        t0 = time.perf_counter()
        y_pred = bundle["estimator"].predict(x)
        predict_seconds = time.perf_counter() - t0
        s = scores(y, y_pred, names)
        runs.append({
            "strategy": PROBE_NAME, "accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "n_train": int(info["n_train"]), "n_val": 0,
            "chosen_by": f"{info.get('cv_folds', '?')}-fold CV on the train rows",
            "train_seconds": float(m.get("decode_seconds") or 0.0) + float(info.get("seconds") or 0.0),
            "images_per_second": deployed_rate(test_h5, predict_seconds, len(y)),
            "model_bytes": path.stat().st_size + backbone_bytes(config.backbone, config.input_size), "n_test": int(len(y)), "seed": seed,
            "source": str(path), "predictions": _predictions(paths, y, y_pred),
            "notes": f"fitted by the LP-FT run ({metrics_path}) on its {info['n_train']} training images, C {info.get('best_params', {}).get('C')} "
            f"by {info.get('cv_folds', '?')}-fold cross-validation within them; scored here on the test feature file; "
            "train_seconds = decoding + frozen features + fit",
        })  # fmt: skip
    return combine(runs)


def combine(runs: list[dict]) -> dict:
    """One row of a strategy's seeds: the mean accuracy, its spread (standard deviation), each seed's accuracy, and the per-image majority vote.

    Raises:
        PipelineError: the seeds were scored on different test images.
    """
    first = runs[0]
    accs = [float(r["accuracy"]) for r in runs]
    row = dict(first, seeds=[r["seed"] for r in runs], seed_accuracies=accs, accuracy_sd=float(np.std(accs, ddof=1)) if len(runs) > 1 else None)
    if len(runs) == 1:
        return row
    paths = first["predictions"]["paths"]
    for r in runs[1:]:
        if r["predictions"]["paths"] != paths:
            raise PipelineError(f"{r['source']}: seed {r['seed']} of {first['strategy']!r} was scored on other test images than seed {first['seed']}; re-run with --rerun")
    for key in ("accuracy", "macro_f1", "train_seconds", "images_per_second"):
        row[key] = float(np.mean([float(r[key]) for r in runs]))
    vote = majority_vote([r["predictions"]["y_pred"] for r in runs])
    row["predictions"] = dict(first["predictions"], y_pred=vote.tolist(), y_pred_seeds=[r["predictions"]["y_pred"] for r in runs])
    row["source"] = ", ".join(r["source"] for r in runs)
    row["notes"] = f"{len(runs)} seeds {row['seeds']}: mean of their accuracies; the paired test uses their per-image majority vote. Seed {first['seed']}: {first['notes']}"
    return row
