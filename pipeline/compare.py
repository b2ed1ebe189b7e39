"""Compare stage: runs the strategies that are missing, collects every metrics file, and writes one table and one chart."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import MAX_INT, Interval, add_options, option, validate
from pipeline.core.config import from_args as config_from_args
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import write_text_atomic

#: Every strategy compare knows, in table order.
STRATEGIES = ("scratch", "lr", "svm", "rf", "head", "finetune", "finetune-plain")
DEFAULT_STRATEGIES = ("scratch", "lr", "svm", "rf", "head", "finetune")
COLUMNS = ("strategy", "accuracy", "macro_f1", "train_seconds", "images_per_second", "model_bytes")


@dataclass(frozen=True)
class CompareConfig:
    """Settings of ``python -m pipeline compare``.

    Attributes:
        data_root: folder with ``train/`` and ``test/`` class trees (every row is scored on ``test/``).
        output: where features, models, ``compare.md``, ``compare.csv`` and ``compare.png`` go.
        strategies: which rows to produce.
        input_size: VGG16 input side for extraction and fine-tuning.
        scratch_input_size: input side of the from-scratch CNN.
        epochs, head_epochs, scratch_epochs: training lengths (early stopping may end sooner).
        seed: one seed for every split, initialisation and augmentation.
        weights: VGG16 weights for extraction and fine-tuning (``none`` only for tests).
        rerun: train again even where a metrics file exists.
    """

    data_root: Path = option(Path("data/fashion-mnist"), "folder with train/ and test/ class trees", flag="--data")
    output: Path = option(Path("features"), "output folder (features, models, compare.md/.csv/.png)", short="-o")
    strategies: tuple[str, ...] = option(DEFAULT_STRATEGIES, cli=False)
    input_size: int = option(224, "VGG16 input side", rule=Interval(int, 32, MAX_INT), message="VGG16 needs at least 32 pixels")
    scratch_input_size: int = option(64, "from-scratch CNN input side", rule=Interval(int, 16, MAX_INT))
    epochs: int = option(10, "fine-tuning epochs, phase 2", rule=Interval(int, 0, MAX_INT))
    head_epochs: int = option(5, "head epochs, phase 1", rule=Interval(int, 0, MAX_INT))
    scratch_epochs: int = option(30, "from-scratch epochs", rule=Interval(int, 1, MAX_INT))
    seed: int = option(0, "one seed for every split, initialisation and augmentation", rule=Interval(int, 0, MAX_INT))
    weights: str = option("imagenet", "VGG16 weights: imagenet, none (tests only) or a weights file PATH")
    rerun: bool = option(False, "train again even where a metrics file exists")
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> "CompareConfig":
        validate(self)
        for s in self.strategies:
            if s not in STRATEGIES:
                raise PipelineError(f"--strategies: unknown strategy '{s}'; choose from {', '.join(STRATEGIES)}")
        for split in ("train", "test"):
            if not (self.data_root / split).is_dir():
                raise PipelineError(f"{self.data_root / split}: missing; compare needs {self.data_root}/train and {self.data_root}/test class trees")
        return self

    @property
    def models(self) -> Path:
        return self.output / "models"


def _conv_base_bytes() -> int:
    """Bytes of the VGG16 convolutional weights a frozen-feature model needs at prediction time."""
    from pipeline.extraction.weights import CONV_LAYERS, KERNEL_SHAPES

    total = 0
    for name in CONV_LAYERS:
        k = KERNEL_SHAPES[name]
        total += 4 * (k[0] * k[1] * k[2] * k[3] + k[3])
    return total


def _extract(config: CompareConfig, split: str) -> Path:
    from pipeline.extraction.extract import ExtractConfig
    from pipeline.extraction.extract import run

    out = config.output / f"{split}.h5"
    cfg = ExtractConfig(data_dir=config.data_root / split, output=out, input_size=config.input_size, weights=config.weights, quiet=config.quiet)
    if run(cfg) not in (0, 1):
        raise PipelineError(f"extract of {config.data_root / split} failed")
    return out


def _extract_rate(path: Path) -> tuple[float, float]:
    """(seconds to extract the whole file, images/s) from a feature file's attributes."""
    from pipeline.extraction.store import open_features

    with open_features(path) as ff:
        a = ff.attrs
        n = len(ff)
    processed = int(a.get("images_processed_last_run") or 0)
    seconds = float(a.get("extract_seconds") or 0.0)
    if processed <= 0 or seconds <= 0:
        return float("nan"), float("nan")
    rate = processed / seconds
    return n / rate, rate


def _classical(config: CompareConfig, model: str, train_h5: Path, test_h5: Path) -> dict:
    from pipeline.classical import train

    metrics_path = config.models / f"{model}.metrics.json"
    if config.rerun or not metrics_path.exists():
        train.run(train.TrainConfig(features=train_h5, model=model, test=test_h5, output=config.models, seed=config.seed, quiet=config.quiet))
    m = json.loads(metrics_path.read_text())
    extract_seconds, extract_rate = _extract_rate(train_h5)
    _, test_rate = _extract_rate(test_h5)
    model_file = config.models / f"{model}.joblib"
    predict_seconds = float(m.get("predict_seconds") or 0.0)
    n_test = int(m.get("n_test") or 0)
    # New images pay extraction plus the classifier: seconds per image add up.
    per_image = 1.0 / test_rate + (predict_seconds / n_test if n_test else 0.0)
    names = {"lr": "frozen features + logistic regression", "svm": "frozen features + linear SVM", "rf": "frozen features + random forest"}
    return {
        "strategy": names[model],
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "train_seconds": extract_seconds + float(m.get("fit_seconds") or 0.0),
        "images_per_second": 1.0 / per_image,
        "model_bytes": model_file.stat().st_size + _conv_base_bytes(),
        "n_test": n_test,
        "seed": m.get("seed", config.seed),
        "source": str(metrics_path),
        "notes": f"train_seconds = extraction of the training set ({extract_seconds:.0f} s at {extract_rate:.1f} img/s) + fit; "
        "model_bytes includes the VGG16 base needed to extract features",
    }


def _keras(config: CompareConfig, strategy: str) -> dict:
    from pipeline.nets import finetune, scratch

    data, test = config.data_root / "train", config.data_root / "test"
    if strategy == "scratch":
        folder, name = config.models / "scratch", "scratch"
        cfg = scratch.ScratchConfig(data_dir=data, test_dir=test, out_dir=folder, input_size=config.scratch_input_size,
                                    epochs=config.scratch_epochs, seed=config.seed, quiet=config.quiet)  # fmt: skip
        runner = scratch.run
    else:
        folder, name = config.models / strategy, "finetune"
        cfg = finetune.FinetuneConfig(
            data_dir=data, test_dir=test, out_dir=folder, input_size=config.input_size,
            unfreeze_from="none" if strategy == "head" else "block5_conv1",
            head_epochs=config.head_epochs, epochs=config.epochs, seed=config.seed, weights=config.weights,
            cache=strategy != "finetune-plain", quiet=config.quiet,
        )  # fmt: skip
        runner = finetune.run
    metrics_path = folder / f"{name}.metrics.json"
    if config.rerun or not metrics_path.exists():
        runner(cfg)
    m = json.loads(metrics_path.read_text())
    label = m["strategy"] + (" [plain Keras loop]" if strategy == "finetune-plain" else "")
    notes = f"{m.get('mode', '')}, {m.get('epochs_run', '?')} epochs, {m.get('seconds_per_epoch', float('nan')):.1f} s/epoch, input {m.get('input_size')}"
    return {
        "strategy": label,
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "train_seconds": m["train_seconds"],
        "images_per_second": m["images_per_second"],
        "model_bytes": m["model_bytes"],
        "n_test": m.get("n_test"),
        "seed": m.get("seed", config.seed),
        "source": str(metrics_path),
        "notes": notes,
    }


def assemble_table(rows: list[dict]) -> list[dict]:
    """Check that every row was scored on the same test images; return the rows in table order.

    Raises:
        PipelineError: rows were evaluated on different numbers of test images.
    """
    counts = {r["strategy"]: r.get("n_test") for r in rows if r.get("n_test") is not None}
    if len(set(counts.values())) > 1:
        raise PipelineError(f"rows were scored on different test sets (n_test per strategy: {counts}); re-run with --rerun")
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
        "| strategy | accuracy | macro-F1 | train s | images/s | model MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['train_seconds']:.0f} | "
            f"{r['images_per_second']:.1f} | {r['model_bytes'] / 1e6:.1f} |"
        )
    return "\n".join(lines) + "\n"


def run(config: CompareConfig) -> list[dict]:
    """Produce every requested strategy's metrics (training what is missing) and write the comparison.

    Returns the table rows. Raises PipelineError for a bad data root or mismatched test sets.
    """
    config.validate()
    config.models.mkdir(parents=True, exist_ok=True)
    say = (lambda m: None) if config.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    rows = []
    classical = [s for s in config.strategies if s in ("lr", "svm", "rf")]
    if classical:
        train_h5, test_h5 = _extract(config, "train"), _extract(config, "test")
    for s in config.strategies:
        say(f"compare: {s}")
        rows.append(_classical(config, s, train_h5, test_h5) if s in classical else _keras(config, s))
    rows = assemble_table(rows)
    md = to_markdown(rows)
    n_test = rows[0].get("n_test")
    header = (
        f"Every row scored on the same {n_test} test images of {config.data_root / 'test'}, seed {config.seed}.\n\n"
    )
    notes = "\n".join(f"- {r['strategy']}: {r['notes']}" for r in rows if r.get("notes"))
    write_text_atomic(config.output / "compare.md", header + md + "\n" + notes + "\n")
    write_text_atomic(config.output / "compare.csv", to_csv(rows))
    write_text_atomic(config.output / "compare.json", json.dumps(rows, indent=1))
    from pipeline.core.plots import bar_chart

    bar_chart({r["strategy"]: r["accuracy"] for r in rows}, config.output / "compare.png",
              title=f"Test accuracy on {n_test} images", ylabel="accuracy", ylim=(0, 1))  # fmt: skip
    print(md, end="")
    print(f"compare: {len(rows)} strategies in {time.perf_counter() - t0:.0f} s -> {config.output}/compare.md, compare.csv, compare.png")
    return rows


def _strategy_list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def add_parser(sub):
    """Register ``compare``; every flag's default comes from ``CompareConfig``."""
    p = sub.add_parser("compare", help="every strategy on the same test images, in one table and one chart")
    p.add_argument("--strategies", type=_strategy_list, default=DEFAULT_STRATEGIES, metavar="S1,S2,...",
                   help=f"comma list from {', '.join(STRATEGIES)} (default {','.join(DEFAULT_STRATEGIES)})")  # fmt: skip
    add_options(p, CompareConfig)
    return p


def from_args(args, argv=None) -> CompareConfig:
    """The CompareConfig of parsed ``compare`` flags."""
    return config_from_args(CompareConfig, args)
