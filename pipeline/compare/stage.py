"""Compare stage: runs the strategies that are missing, collects every metrics file, and writes one table and one chart, each row with the training and validation rows it used."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.command import Command
from pipeline.core.config import MAX_INT, Interval, ListOf, config_json, option, validate
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import write_text_atomic

#: Every strategy compare knows, in table order. ``scratch``: the small CNN from random weights;
#: ``scratch-resnet``: the CIFAR ResNet (``--resnet-depth``, ResNet-20) from random weights at
#: its native small input; ``head``: frozen base + dense head;
#: ``finetune-dense``: the classic fine-tuning (dense head from random first); ``probe``: the
#: logistic-regression probe LP-FT starts from, alone; ``finetune``: LP-FT, one row per
#: ``--unfreeze`` point; ``finetune-plain``: LP-FT from the first point with the plain Keras loop.
STRATEGIES = ("scratch", "scratch-resnet", "lr", "svm", "rf", "head", "finetune-dense", "probe", "finetune", "finetune-plain")
DEFAULT_STRATEGIES = ("scratch", "scratch-resnet", "lr", "svm", "rf", "head", "finetune-dense", "probe", "finetune")
DEFAULT_UNFREEZE = ("block5_conv1",)
COLUMNS = ("strategy", "accuracy", "macro_f1", "n_train", "n_val", "train_seconds", "images_per_second", "model_bytes")
CLASSICAL = ("lr", "svm", "rf")
#: Config fields that do not change a result: a metrics file recorded with other values still counts.
IGNORED_FIELDS = ("command_line", "quiet")


@dataclass(frozen=True)
class CompareConfig:
    """Settings of ``python -m pipeline compare``.

    Attributes:
        data_root: folder with ``train/`` and ``test/`` class trees (every row is scored on ``test/``).
        output: where features, models, ``compare.md``, ``compare.csv`` and ``compare.png`` go.
        strategies: which rows to produce.
        unfreeze: the LP-FT rows' ``--unfreeze-from`` points (one row each).
        input_size: VGG16 input side for extraction and fine-tuning.
        scratch_input_size: input side of the from-scratch CNN.
        resnet_depth, resnet_input_size: the from-scratch ResNet's depth (6n+2) and input side
            (None: the scratch stage's default for a ResNet).
        epochs, head_epochs, scratch_epochs, resnet_epochs: training lengths (early stopping
            may end the first three sooner; None: the scratch stage's default for a ResNet).
        seed: one seed for every split, initialisation and augmentation.
        weights: VGG16 weights for extraction and fine-tuning (``none`` only for tests).
        rerun: train again even where a metrics file exists.
        sizes: training images per class to draw each strategy against (``--sizes``; empty:
            the one table of the whole training tree). See ``pipeline/sizes.py``.
    """

    data_root: Path = option(Path("data/fashion-mnist"), "folder with train/ and test/ class trees", flag="--data")
    output: Path = option(Path("features"), "output folder (features, models, compare.md/.csv/.png)", short="-o")
    strategies: tuple[str, ...] = option(DEFAULT_STRATEGIES, f"comma list from {', '.join(STRATEGIES)}", rule=ListOf(what="strategies"), metavar="S1,S2,...")
    unfreeze: tuple[str, ...] = option(
        DEFAULT_UNFREEZE, "one LP-FT row per point: VGG16 layers to fine-tune from, or all", rule=ListOf(what="layers"), metavar="L1,L2,..."
    )
    input_size: int = option(224, "VGG16 input side", rule=Interval(int, 32, MAX_INT), message="VGG16 needs at least 32 pixels")
    scratch_input_size: int = option(64, "from-scratch CNN input side", rule=Interval(int, 16, MAX_INT))
    epochs: int = option(10, "fine-tuning epochs (early stopping may end sooner)", rule=Interval(int, 1, MAX_INT))
    head_epochs: int = option(5, "dense-head epochs on the frozen base", rule=Interval(int, 0, MAX_INT))
    scratch_epochs: int = option(30, "from-scratch epochs", rule=Interval(int, 1, MAX_INT))
    resnet_depth: int = option(20, "layers of the from-scratch ResNet (6n+2)", rule=Interval(int, 8, MAX_INT))
    resnet_input_size: int | None = option(None, "from-scratch ResNet input side; none = scratch's default for a ResNet", rule=Interval(int, 4, MAX_INT))
    resnet_epochs: int | None = option(None, "from-scratch ResNet epochs (step schedule); none = scratch's default for a ResNet", rule=Interval(int, 1, MAX_INT))
    seed: int = option(0, "one seed for every split, initialisation and augmentation", rule=Interval(int, 0, MAX_INT))
    weights: str = option("imagenet", "VGG16 weights: imagenet, none (tests only) or a weights file PATH")
    rerun: bool = option(False, "train again even where a metrics file exists")
    sizes: tuple[int, ...] = option(
        (),
        "draw each strategy's test accuracy against these training images per class (nested seeded subsets of "
        "DATA/train; features extracted once, for the largest); writes sizes.md/.csv/.json/.png; none = one table",
        rule=ListOf(int, what="whole numbers (e.g. 100,300,500)"),
        metavar="N1,N2,...",
    )
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> "CompareConfig":
        """Check every value; return self.

        Raises:
            PipelineError: an unknown strategy or unfreeze point, a ResNet depth that is not 6n+2,
                or a data root without train/ and test/.
        """
        from pipeline.nets.networks import VGG16_LAYERS

        validate(self)
        for s in self.strategies:
            if s not in STRATEGIES:
                raise PipelineError(f"--strategies: unknown strategy '{s}'; choose from {', '.join(STRATEGIES)}")
        if "scratch-resnet" in self.strategies and ((self.resnet_depth - 2) % 6 or self.resnet_depth < 8):
            raise PipelineError(f"--resnet-depth {self.resnet_depth}: a CIFAR ResNet has 6n+2 layers (8, 14, 20, 32, 44, 56, 110, ...)")
        if not self.unfreeze:
            raise PipelineError("--unfreeze: needs at least one point")
        for point in self.unfreeze:
            if point not in (*VGG16_LAYERS, "all"):
                raise PipelineError(f"--unfreeze {point}: not a VGG16 layer; choose all or one of {', '.join(VGG16_LAYERS)}")
        if self.sizes:
            from pipeline.compare.sizes import check_sizes

            check_sizes(self.sizes, self.strategies)
        for split in ("train", "test"):
            if not (self.data_root / split).is_dir():
                raise PipelineError(f"{self.data_root / split}: missing; compare needs {self.data_root}/train and {self.data_root}/test class trees")
        return self

    @property
    def models(self) -> Path:
        return self.output / "models"


def _say(config: CompareConfig, message: str) -> None:
    if not config.quiet:
        print(message, file=sys.stderr, flush=True)


def _conv_base_bytes() -> int:
    """Bytes of the VGG16 convolutional weights a frozen-feature model needs at prediction time."""
    from pipeline.backbones.registry import CONV_LAYERS, KERNEL_SHAPES

    total = 0
    for name in CONV_LAYERS:
        k = KERNEL_SHAPES[name]
        total += 4 * (k[0] * k[1] * k[2] * k[3] + k[3])
    return total


def _extract(config: CompareConfig, split: str) -> Path:
    from pipeline.extract import stage as extract
    from pipeline.extract.config import ExtractConfig

    out = config.output / f"{split}.h5"
    cfg = ExtractConfig(data_dir=config.data_root / split, output=out, input_size=config.input_size, weights=config.weights, quiet=config.quiet)
    if extract.run(cfg) not in (0, 1):
        raise PipelineError(f"extract of {config.data_root / split} failed")
    return out


def _extract_rate(path: Path) -> tuple[float, float]:
    """(seconds to extract the whole file, images/s) from a feature file's attributes."""
    from pipeline.featurefile.store import open_features

    with open_features(path) as ff:
        a = ff.attrs
        n = len(ff)
    processed = int(a.get("images_processed_last_run") or 0)
    seconds = float(a.get("extract_seconds") or 0.0)
    if processed <= 0 or seconds <= 0:
        return float("nan"), float("nan")
    rate = processed / seconds
    return n / rate, rate


def _up_to_date(config: CompareConfig, metrics_path: Path, stage_config) -> dict | None:
    """The metrics at ``metrics_path`` when they exist and were written with ``stage_config`` (``--rerun`` never reuses)."""
    if config.rerun or not metrics_path.exists():
        return None
    m = json.loads(metrics_path.read_text())
    ours = {k: v for k, v in config_json(stage_config).items() if k not in IGNORED_FIELDS}
    theirs = {k: v for k, v in (m.get("config") or {}).items() if k not in IGNORED_FIELDS}
    return m if ours == theirs else None


def _deployed_rate(test_h5: Path, predict_seconds: float, n_test: int) -> float:
    """Images/s of a frozen-feature model on new images: extraction plus the classifier (seconds per image add up)."""
    _, test_rate = _extract_rate(test_h5)
    return 1.0 / (1.0 / test_rate + (predict_seconds / n_test if n_test else 0.0))


def _classical(config: CompareConfig, model: str, train_h5: Path, test_h5: Path) -> dict:
    from pipeline.classical import train

    cfg = train.TrainConfig(features=train_h5, model=model, test=test_h5, output=config.models, seed=config.seed, quiet=config.quiet)
    metrics_path = config.models / f"{model}.metrics.json"
    m = _up_to_date(config, metrics_path, cfg)
    if m is None:
        train.run(cfg)
        m = json.loads(metrics_path.read_text())
    extract_seconds, extract_rate = _extract_rate(train_h5)
    n_test = int(m.get("n_test") or 0)
    names = {"lr": "frozen features + logistic regression", "svm": "frozen features + linear SVM", "rf": "frozen features + random forest"}
    return {
        "strategy": names[model],
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "n_train": int(m["n_train"]),
        "n_val": 0,
        "train_seconds": extract_seconds + float(m.get("fit_seconds") or 0.0),
        "images_per_second": _deployed_rate(test_h5, float(m.get("predict_seconds") or 0.0), n_test),
        "model_bytes": (config.models / f"{model}.joblib").stat().st_size + _conv_base_bytes(),
        "n_test": n_test,
        "seed": m.get("seed", config.seed),
        "source": str(metrics_path),
        "notes": f"fitted on all {m['n_train']} training images, hyper-parameters by {m.get('search', {}).get('folds', '?')}-fold "
        f"cross-validation within them (no separate validation rows); train_seconds = extraction of the training set "
        f"({extract_seconds:.0f} s at {extract_rate:.1f} img/s) + fit; model_bytes includes the VGG16 base needed to extract features",
    }


def _net_config(config: CompareConfig, strategy: str, unfreeze: str = DEFAULT_UNFREEZE[0]):
    """(stage module, its config, output name) of a nets strategy."""
    from pipeline.nets import finetune, scratch

    data, test = config.data_root / "train", config.data_root / "test"
    if strategy == "scratch":
        cfg = scratch.ScratchConfig(data_dir=data, test_dir=test, out_dir=config.models / "scratch", input_size=config.scratch_input_size,
                                    epochs=config.scratch_epochs, seed=config.seed, quiet=config.quiet)  # fmt: skip
        return scratch, cfg, "scratch"
    if strategy == "scratch-resnet":
        cfg = scratch.ScratchConfig(data_dir=data, test_dir=test, out_dir=config.models / "scratch-resnet", arch="resnet", depth=config.resnet_depth,
                                    input_size=config.resnet_input_size, epochs=config.resnet_epochs, seed=config.seed, quiet=config.quiet)  # fmt: skip
        return scratch, cfg, "scratch"
    folder = {"head": "head", "finetune-dense": "finetune-dense", "finetune": f"lpft-{unfreeze}", "finetune-plain": f"lpft-{unfreeze}-plain"}[strategy]
    dense = strategy in ("head", "finetune-dense")
    cfg = finetune.FinetuneConfig(
        data_dir=data, test_dir=test, out_dir=config.models / folder, input_size=config.input_size,
        unfreeze_from={"head": "none", "finetune-dense": "block5_conv1"}.get(strategy, unfreeze),
        head="dense" if dense else "probe", **({"lr": finetune.CLASSIC_LR} if dense else {}),
        head_epochs=config.head_epochs, epochs=config.epochs, seed=config.seed, weights=config.weights,
        cache=strategy != "finetune-plain", quiet=config.quiet,
    )  # fmt: skip
    return finetune, cfg, "finetune"


def _net_metrics(config: CompareConfig, strategy: str, unfreeze: str = DEFAULT_UNFREEZE[0]) -> tuple[dict, Path]:
    """The metrics of a nets strategy (trained now when missing or written with other settings) and their file."""
    module, cfg, name = _net_config(config, strategy, unfreeze)
    metrics_path = Path(cfg.out_dir) / f"{name}.metrics.json"
    m = _up_to_date(config, metrics_path, cfg)
    if m is None:
        module.run(cfg)
        m = json.loads(metrics_path.read_text())
    return m, metrics_path


def _net_notes(m: dict) -> str:
    phases = ", ".join(
        f"{p['name']} {p['epochs_run']} epochs (best {p['best_epoch']}, start val acc {p.get('start_val_accuracy', float('nan')):.3f})"
        for p in m.get("phases", [])
    )  # fmt: skip
    cache = f"{m['cache_copies']} augmented copies cached up to {m['cache_layer']}, " if m.get("cache_copies") else ""
    return (f"{m.get('mode', '')}, {cache}{m.get('seconds_per_epoch', float('nan')):.1f} s/epoch, {phases}; "
            f"input {m.get('input_size')}, {m.get('precision')}; validation: {m['n_val']} of the training images")  # fmt: skip


def _keras(config: CompareConfig, strategy: str, unfreeze: str = DEFAULT_UNFREEZE[0]) -> dict:
    m, metrics_path = _net_metrics(config, strategy, unfreeze)
    return {
        "strategy": m["strategy"] + (" [plain Keras loop]" if strategy == "finetune-plain" else ""),
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "n_train": int(m["n_train"]),
        "n_val": int(m["n_val"]),
        "train_seconds": m["train_seconds"],
        "images_per_second": m["images_per_second"],
        "model_bytes": m["model_bytes"],
        "n_test": m.get("n_test"),
        "seed": m.get("seed", config.seed),
        "source": str(metrics_path),
        "notes": _net_notes(m),
    }


def _probe(config: CompareConfig, test_h5: Path) -> dict:
    """The row of the probe LP-FT starts from, alone: its bundle (fitted on the fine-tuning's training rows) on the test feature file."""
    import numpy as np

    from pipeline.classical.bundle import load_bundle
    from pipeline.classical.features import read_groups
    from pipeline.core.metrics import scores
    from pipeline.featurefile.store import open_features
    from pipeline.nets.probe import check_probe

    m, metrics_path = _net_metrics(config, "finetune", config.unfreeze[0])
    info = m.get("probe") or {}
    path = Path(info.get("file") or "")
    bundle = load_bundle(path)
    with open_features(test_h5) as ff:
        check_probe(path, bundle, {**ff.spec, "pool": bundle["feature_spec"]["pool"]}, ff.label_names, against=f"{test_h5} has")
        (x,) = read_groups(ff, [np.arange(len(ff))], bundle["feature_spec"]["pool"])
        y = ff.labels
        names = ff.label_names
    t0 = time.perf_counter()
    y_pred = bundle["estimator"].predict(x)
    predict_seconds = time.perf_counter() - t0
    s = scores(y, y_pred, names)
    return {
        "strategy": "logistic-regression probe (LP-FT's start)",
        "accuracy": s["accuracy"],
        "macro_f1": s["macro_f1"],
        "n_train": int(info["n_train"]),
        "n_val": 0,
        "train_seconds": float(m.get("decode_seconds") or 0.0) + float(info.get("seconds") or 0.0),
        "images_per_second": _deployed_rate(test_h5, predict_seconds, len(y)),
        "model_bytes": path.stat().st_size + _conv_base_bytes(),
        "n_test": int(len(y)),
        "seed": m.get("seed", config.seed),
        "source": str(path),
        "notes": f"fitted by the LP-FT run ({metrics_path}) on its {info['n_train']} training images only, C {info.get('best_params', {}).get('C')} "
        f"by {info.get('cv_folds', '?')}-fold cross-validation within them; scored here on the test feature file; "
        "train_seconds = decoding + frozen features + fit",
    }


def assemble_table(rows: list[dict]) -> list[dict]:
    """Check that every row was scored on the same test images and says its training and validation rows; return the rows in table order.

    Raises:
        PipelineError: rows were evaluated on different numbers of test images, or a row
            lacks its training or validation row count.
    """
    counts = {r["strategy"]: r.get("n_test") for r in rows if r.get("n_test") is not None}
    if len(set(counts.values())) > 1:
        raise PipelineError(f"rows were scored on different test sets (n_test per strategy: {counts}); re-run with --rerun")
    for r in rows:
        if not isinstance(r.get("n_train"), int) or not isinstance(r.get("n_val"), int):
            raise PipelineError(f"row {r['strategy']!r} does not say how many training and validation images it used; re-run with --rerun")
    return rows


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})
    return buf.getvalue()


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| strategy | accuracy | macro-F1 | train rows | val rows | train s | images/s | model MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['n_train']} | {r['n_val']} | {r['train_seconds']:.0f} | "
            f"{r['images_per_second']:.1f} | {r['model_bytes'] / 1e6:.1f} |"
        )
    return "\n".join(lines) + "\n"


def chart_label(row: dict) -> str:
    """A bar's label: the strategy, its training + validation rows and train seconds."""
    return f"{row['strategy']}\n{row['n_train']} train + {row['n_val']} val, {row['train_seconds']:.0f} s"


def collect(config: CompareConfig) -> list[dict]:
    """Every requested row, in table order, training what is missing."""
    rows = []
    needs_features = [s for s in config.strategies if s in (*CLASSICAL, "probe")]
    if needs_features:
        train_h5, test_h5 = _extract(config, "train"), _extract(config, "test")
    for s in config.strategies:
        if s in CLASSICAL:
            _say(config, f"compare: {s}")
            rows.append(_classical(config, s, train_h5, test_h5))
        elif s == "probe":
            _say(config, f"compare: probe (LP-FT from {config.unfreeze[0]})")
            rows.append(_probe(config, test_h5))
        elif s == "finetune":
            for point in config.unfreeze:
                _say(config, f"compare: LP-FT from {point}")
                rows.append(_keras(config, s, point))
        else:
            _say(config, f"compare: {s}")
            rows.append(_keras(config, s, config.unfreeze[0]))
    return assemble_table(rows)


def run(config: CompareConfig) -> list[dict]:
    """Produce every requested strategy's metrics (training what is missing) and write the comparison.

    With ``sizes``, draw each strategy against the training images per class instead
    (``sizes.run_sizes``: ``sizes.md``/``.csv``/``.json``/``.png``).

    Returns:
        The table rows (each with ``n_train`` and ``n_val``; with ``sizes``, ``per_class`` too).

    Raises:
        PipelineError: a bad data root, an unknown strategy or unfreeze point, or rows
            scored on different test sets.
    """
    config.validate()
    if config.sizes:
        from pipeline.compare.sizes import run_sizes

        return run_sizes(config, _extract, _keras)
    config.models.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = collect(config)
    md = to_markdown(rows)
    n_test = rows[0].get("n_test")
    header = (
        f"Every row scored on the same {n_test} test images of {config.data_root / 'test'}, seed {config.seed}. "
        "train rows / val rows: the images a row was fitted on / held out from them to choose epochs (early stopping).\n\n"
    )
    notes = "\n".join(f"- {r['strategy']}: {r['notes']}" for r in rows if r.get("notes"))
    write_text_atomic(config.output / "compare.md", header + md + "\n" + notes + "\n")
    write_text_atomic(config.output / "compare.csv", to_csv(rows))
    write_text_atomic(config.output / "compare.json", json.dumps(rows, indent=1))
    from pipeline.core.plots import bar_chart

    bar_chart({chart_label(r): r["accuracy"] for r in rows}, config.output / "compare.png",
              title=f"Test accuracy on the same {n_test} images", ylabel="accuracy", ylim=(0, 1))  # fmt: skip
    print(md, end="")
    print(f"compare: {len(rows)} strategies in {time.perf_counter() - t0:.0f} s -> {config.output}/compare.md, compare.csv, compare.png")
    return rows


COMMAND = Command("compare", CompareConfig, run, "every strategy on the same test images, in one table and one chart")
