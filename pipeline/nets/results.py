"""What both nets stages leave at the end: the test-set evaluation and their output set, published as a whole (``core.outputsets``): the saved model (``NAME.keras``), the training curves (``NAME.curves.png``), the stage's own files and the metrics JSON that ``compare`` reads (moved into place last)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.report import plots
from pipeline.core.config import config_json
from pipeline.report.metrics import scores
from pipeline.report.stats import wilson
from pipeline.core.outputs import atomic_output, package_versions, write_json_atomic
from pipeline.core.outputsets import publish
from pipeline.nets.images import Data
from pipeline.nets.networks import AUGMENTATION, Network
from pipeline.nets.options import NetConfig

#: Keys every ``*.metrics.json`` written here carries (the contract ``compare`` reads).
#: ``train_seconds`` = decoding the images + building the prefix cache + every epoch (model
#: construction and the test evaluation excluded); ``seconds_per_epoch`` = mean wall time of
#: an epoch of the last phase (fine-tuning; the head phase for ``none``; validation included);
#: ``images_per_second`` = test-set inference of the saved (full) model, after a warm-up (on
#: the first THROUGHPUT_SAMPLE test images when the prefix's test outputs were reused).
#: ``test_predictions``: each test image's path, label and prediction (compare pairs rows on them); ``refit``: see training.refit.
METRICS_KEYS = (
    "strategy", "accuracy", "macro_f1", "per_class", "train_seconds", "images_per_second",
    "model_bytes", "seed", "n_train", "n_val", "n_test", "test_source", "epochs_run",
    "seconds_per_epoch", "mode", "input_size", "unfreeze_from", "precision", "rejected",
    "test_predictions", "refit",
)  # fmt: skip
THROUGHPUT_SAMPLE = 256


@dataclass
class Result:
    """What a run leaves in memory: ``net.full`` is the model saved to disk."""

    net: Network
    data: Data
    metrics: dict


def set_files(name: str, own=()) -> tuple[str, ...]:
    """The files a network stage ``name`` publishes as one set, in publishing order: the model, its curves, ``own`` files, the metrics (read first)."""
    return f"{name}.keras", f"{name}.curves.png", *own, f"{name}.metrics.json"


def evaluate(full, data: Data, batch_size: int, top=None, test_features=None):
    """Test-set probabilities and the full model's measured throughput (images/s), after a warm-up on both batch shapes.

    With ``test_features`` (the frozen prefix's outputs for the test images, computed once
    and shared) the probabilities come from ``top`` on them, and the throughput is measured
    on the first THROUGHPUT_SAMPLE test images.
    """
    x = data.test_x if test_features is None else data.test_x[:THROUGHPUT_SAMPLE]
    n = len(x)
    full.predict(x[: min(n, batch_size + n % batch_size)], batch_size=batch_size, verbose=0)  # tracing is not timed
    t0 = time.perf_counter()
    probs = full.predict(x, batch_size=batch_size, verbose=0)
    seconds = time.perf_counter() - t0
    if test_features is not None:
        probs = top.predict(test_features, batch_size=batch_size, verbose=0)
    return probs, (n / seconds if seconds > 0 else 0.0)


def save_model(model, path: Path) -> int:
    """Save ``model`` atomically to ``path`` (a ``.keras`` file); its size in bytes."""
    with atomic_output(path, suffix=".keras") as tmp:  # Keras picks the format by the .keras suffix
        model.save(tmp)
    return path.stat().st_size


def curves_title(strategy: str, input_size: int, history: dict, mode: str, precision: str) -> str:
    """Title naming the epochs of each phase (the curves run on across the phases)."""
    spans, start = [], 1
    phases = history["phase"]
    for i, name in enumerate(phases):
        if i + 1 == len(phases) or phases[i + 1] != name:
            spans.append(f"{name} {start}-{i + 1}" if i + 1 > start else f"{name} {start}")
            start = i + 2
    return f"{strategy}, {mode}, {input_size}px, {precision} (epochs: {', '.join(spans)})"


def finish(name: str, net: Network, data: Data, config: NetConfig, precision: str, history: dict, records: list, extra: dict, train_seconds: float,
           test_features=None, files: dict | None = None) -> dict:
    """Evaluate ``net.full`` on the test set, publish the set ``OUT_DIR/NAME.*`` as a whole (the caller holds ``NAME.keras``'s lock), print the summary.

    Args:
        name: the outputs' base name (``finetune``, ``scratch``).
        net, data: the trained network and the images it was trained and is scored on.
        config: the stage's config (recorded in the metrics).
        precision: the resolved precision.
        history, records: from ``training.train_phases``.
        extra: the stage's own metrics (must include ``mode``, ``unfreeze_from`` and ``refit``;
            a refit's ``n_train`` replaces the selection's).
        train_seconds: decoding + caching + training time.
        test_features: the frozen prefix's outputs for the test images, or None (``evaluate``).
        files: the stage's own files, name -> ``writer(path)``, or None: not in this set (a previous run's is removed).

    Returns:
        The metrics written to ``OUT_DIR/NAME.metrics.json`` (every key of METRICS_KEYS and more).

    Raises:
        PipelineError: an output could not be written (e.g. the disk is full).
    """
    out_dir = Path(config.out_dir)
    probs, ips = evaluate(net.full, data, config.batch_size, net.top, test_features)
    y_pred = probs.argmax(axis=1)
    members = set_files(name, tuple(files or {}))
    model_path, curves, metrics_path = out_dir / members[0], out_dir / members[1], out_dir / members[-1]
    with publish(out_dir, name, members, lock=model_path.name) as stage:
        model_bytes = save_model(net.full, stage.path(model_path.name))
        plots.training_curves({k: v for k, v in history.items() if k != "phase"}, stage.path(curves.name),
                              title=curves_title(config.strategy(), config.input_size, history, extra["mode"], precision))  # fmt: skip
        for member, writer in (files or {}).items():
            if writer is not None:
                writer(stage.path(member))
        metrics = {
            "strategy": config.strategy(),
            **scores(data.test_y, y_pred, data.class_names),
            "train_seconds": train_seconds,
            "images_per_second": ips,
            "model_bytes": model_bytes,
            "seed": config.seed,
            "n_train": int((extra.get("refit") or {}).get("n_train") or len(data.train_y)),
            "n_val": int(len(data.val_y)),
            "n_test": int(len(data.test_y)),
            "test_source": data.test_source,
            "epochs_run": int(sum(r["epochs_run"] for r in records)),
            "seconds_per_epoch": records[-1]["seconds_per_epoch"],
            "input_size": config.input_size,
            "precision": precision,
            "rejected": len(data.rejected),
            **extra,
            "class_names": list(data.class_names),
            "phases": records,
            "history": history,
            "decode_seconds": data.decode_seconds,
            "rejected_files": [list(r) for r in data.rejected],
            "model_file": str(model_path),
            "curves_file": str(curves),
            "augmentation": AUGMENTATION if config.augment else None,
            "seeds": {"keras": config.seed, "split": config.seed, "augmentation": config.seed, "epoch_sampling": config.seed + 1},
            "test_predictions": {"paths": list(data.test_paths), "y_true": data.test_y.tolist(), "y_pred": y_pred.tolist()},
            "config": config_json(config),
            "versions": package_versions(),
        }
        missing = [k for k in METRICS_KEYS if k not in metrics]
        if missing:  # a programming error, not a user error
            raise RuntimeError(f"metrics lack contract keys {missing}")
        write_json_atomic(stage.path(metrics_path.name), metrics)
    low, high = wilson(int(round(metrics["accuracy"] * metrics["n_test"])), metrics["n_test"])
    print(
        f"{config.strategy()}: test accuracy {metrics['accuracy']:.4f} (95% interval {low:.3f}-{high:.3f}), macro-F1 {metrics['macro_f1']:.4f} "
        f"on {metrics['n_test']} images; {metrics['mode']}, {metrics['seconds_per_epoch']:.2f} s/epoch, "
        f"{metrics['epochs_run']} epochs, {len(data.rejected)} rejected -> {model_path}, {metrics_path.name}, {curves.name}"
    )
    return metrics
