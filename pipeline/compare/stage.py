"""Compare stage: runs the rows that are missing, collects them, tests each against the best on the same test images, and writes one table and one chart with each row's interval, paired p-value, training and validation rows.

Each row's result set is its stage's (a network row: the nets stage's set, read only when whole,
``rows.net_metrics``; a frozen-feature row: one record file); the table, its CSV and JSON and
the chart are one set, published together (``core.outputsets``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

from pipeline.backbones.registry import BACKBONE
from pipeline.compare import rows as kinds
from pipeline.compare.config import CLASSICAL, SIZES_FILES, TABLE_FILES, CompareConfig
from pipeline.core.command import Command
from pipeline.core.errors import PipelineError
from pipeline.core.guard import refuse_inside
from pipeline.core.outputs import OutputLock, prepare_output_dir, write_text_atomic
from pipeline.core.outputsets import check_members, publish, settle
from pipeline.images.overlap import list_inputs
from pipeline.compare.verdicts import judged, summary_line
from pipeline.report.stats import ALPHA, CONFIDENCE

COLUMNS = ("strategy", "accuracy", "ci_low", "ci_high", "p_value", "status", "macro_f1", "n_train", "n_val", "chosen_by", "train_seconds",
           "images_per_second", "model_bytes", "accuracy_sd", "seed_accuracies")  # fmt: skip


def _say(config: CompareConfig, message: str) -> None:
    if not config.quiet:
        print(message, file=sys.stderr, flush=True)


def check_weights(config: CompareConfig) -> None:
    """Resolve the weights of every backbone compare will use, before any work.

    Raises:
        PipelineError: a backbone without weights (the message names the file Keras expects and ``--weights``).
    """
    from pipeline.backbones.weights import resolve_weights

    for b in dict.fromkeys((config.backbone, *config.backbones)):
        resolve_weights(config.weights, backbone=b, progress=not config.quiet)


def collect(config: CompareConfig) -> list[dict]:
    """Every requested row, in table order, training what is missing (``--backbones`` rows where ``lr`` is, or last)."""
    inputs = kinds.Inputs(config.data_root)
    features: dict[tuple[str, str], Path] = {}

    def feature_file(split: str, backbone: str = BACKBONE) -> Path:
        if (split, backbone) not in features:
            features[(split, backbone)] = kinds.extract(config, split, backbone)
        return features[(split, backbone)]

    extra = [b for b in config.backbones if not (b == BACKBONE and "lr" in config.strategies)]

    def backbone_rows() -> list[dict]:
        out = []
        for b in extra:
            _say(config, f"compare: frozen {b} features + logistic regression")
            out.append(kinds.classical_row(config, "lr", feature_file("train", b), feature_file("test", b), backbone=b, seen=seen))
        return out

    rows, seen = [], {}  # seen: each training file's images stat-ed once for every classical row
    for s in config.strategies:
        if s in CLASSICAL:
            _say(config, f"compare: {s}")
            rows.append(kinds.classical_row(config, s, feature_file("train"), feature_file("test"), seen=seen))
            if s == "lr":
                rows += backbone_rows()
        elif s == "probe":
            _say(config, f"compare: probe (LP-FT from {config.points[0]})")
            rows.append(kinds.probe_row(config, feature_file("test", config.backbone), inputs))
        else:
            for point in config.points if s == "finetune" else config.points[:1]:
                _say(config, f"compare: {s}" + (f" from {point}" if s.startswith("finetune") and s != "finetune-dense" else ""))
                rows.append(kinds.net_row(config, s, point, inputs))
    if "lr" not in config.strategies:
        rows += backbone_rows()
    return judged(assemble_table(rows))


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


def _cell(r: dict, k: str):
    v = r.get(k)
    if k == "seed_accuracies":
        return ";".join(f"{a:.4f}" for a in v or [])
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) and k != "p_value" else (f"{v:.4g}" if k == "p_value" else v)


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(r, k) for k in COLUMNS})
    return buf.getvalue()


def to_markdown(rows: list[dict]) -> str:
    seeds = any(len(r.get("seed_accuracies") or []) > 1 for r in rows)
    lines = [
        f"| strategy | accuracy | {CONFIDENCE:.0%} interval | p vs best | tied with best | macro-F1 | train rows | val rows | chosen by |"
        + (" each seed |" if seeds else "") + " train s | images/s | model MB |",
        "|---|---:|---:|---:|:---:|---:|---:|---:|---|" + ("---|" if seeds else "") + "---:|---:|---:|",
    ]
    for r in rows:
        sd = f" ± {r['accuracy_sd']:.4f}" if r.get("accuracy_sd") is not None else ""
        tied = {"best": "best", "tied": "yes", "different": "no"}[r["status"]]
        p = "" if r["status"] == "best" else f"{r['p_value']:.3g}"
        each = (" " + ", ".join(f"{a:.4f}" for a in r.get("seed_accuracies") or []) + " |") if seeds else ""
        lines.append(
            f"| {r['strategy']} | {r['accuracy']:.4f}{sd} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {p} | {tied} | {r['macro_f1']:.4f} | "
            f"{r['n_train']} | {r['n_val']} | {r['chosen_by']} |{each} {r['train_seconds']:.0f} | {r['images_per_second']:.1f} | {r['model_bytes'] / 1e6:.1f} |"
        )
    return "\n".join(lines) + "\n"


def chart_label(row: dict) -> str:
    """A row's label on the chart: the strategy, its training rows, the validation rows that chose its settings, and train seconds."""
    return f"{row['strategy']}\n{row['n_train']} train rows, {row['n_val']} val rows, {row['train_seconds']:.0f} s"


def header(config: CompareConfig, rows: list[dict]) -> str:
    """What the table means: the test images, the protocol, the statistics."""
    n_test = rows[0].get("n_test")
    seeds = f"{config.repeats} seeds ({config.seed}..{config.seed + config.repeats - 1}) per network row: accuracy = their mean ± standard deviation, the paired test on their per-image majority vote" if config.repeats > 1 else f"seed {config.seed}"
    refit = ("network rows choose their epochs on the val rows, then are refitted from their start on train + val rows for those epochs (train rows = what the final model saw)"
             if config.refit else "network rows are the models trained on the train rows, their best epoch chosen on the val rows (--no-refit)")  # fmt: skip
    return (
        f"Every row scored on the same {n_test} test images of {config.data_root / 'test'}; {seeds}. {refit}; frozen-feature rows choose their "
        f"hyper-parameters by cross-validation within their train rows. Nothing is chosen on the test images. {CONFIDENCE:.0%} interval: Wilson; "
        f"p vs best: exact paired McNemar test against the best row on the same images; tied: p >= {ALPHA:.2g}.\n\n"
    )


def run(config: CompareConfig) -> list[dict]:
    """Produce every requested row (training what is missing) and write the comparison.

    With ``sizes``, draw each strategy against the training images per class instead
    (``compare.sizes``: ``sizes.md``/``.csv``/``.json``/``.png``).

    Returns:
        The table rows (each with ``n_train``, ``n_val``, its interval, p-value and status;
        with ``sizes``, ``per_class`` too).

    Raises:
        PipelineError: a bad data root, an unknown strategy, backbone or unfreeze point, a
            backbone without weights, or rows scored on different test images.
    """
    config.validate()
    check_weights(config)
    for folder in (config.output, config.models, config.output / "sizes", config.output / "prefix-cache", *(config.output / b for b in config.backbones)):
        refuse_inside(folder, [("the data folder", config.data_root)], "choose another -o folder")  # by resolved path: OUT/models a link into a class folder
    list_inputs(config.data_root / "train", config.data_root / "test", config.allow_overlap)  # the same classes, no test image that is a training image
    # an -o that is a file or cannot be written: one line, before any work; one run per -o (OUT/compare.lock held throughout)
    made = not os.path.lexists(config.output)
    try:
        with OutputLock(prepare_output_dir(config.output) / "compare"):
            table = ("sizes", SIZES_FILES) if config.sizes else ("compare", TABLE_FILES)
            settle(config.output, table[0])  # a table a killed run left half moved is finished first, then checked
            check_members(config.output, *table)  # before any row is trained
            return _compare(config)
    except BaseException:
        if made:  # a run refused (--sizes above a class) or stopped before writing anything leaves no empty -o behind
            with contextlib.suppress(OSError):
                config.output.rmdir()
        raise


def _compare(config: CompareConfig) -> list[dict]:
    if config.sizes:
        from pipeline.compare.sizes import run_sizes

        return run_sizes(config)
    config.models.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = collect(config)
    md = to_markdown(rows)
    line = summary_line(rows)
    notes = "\n".join(f"- {r['strategy']}: {r['notes']}" for r in rows if r.get("notes"))
    from pipeline.report.plots import interval_chart

    with publish(config.output, "compare", TABLE_FILES, lock="compare.md", locked=False) as stage:  # the table and chart: all new, or all as before
        write_text_atomic(stage.path("compare.md"), header(config, rows) + md + "\n" + line + "\n\n" + notes + "\n")
        write_text_atomic(stage.path("compare.csv"), to_csv(rows))
        write_text_atomic(stage.path("compare.json"), json.dumps([{k: v for k, v in r.items() if k != "predictions"} for r in rows], indent=1))
        interval_chart({chart_label(r): (r["accuracy"], r["ci_low"], r["ci_high"], r["status"]) for r in rows}, stage.path("compare.png"),
                       title=f"Test accuracy on the same {rows[0].get('n_test')} images ({CONFIDENCE:.0%} Wilson intervals); {line}", xlabel="accuracy")  # fmt: skip
    print(md, end="")
    print(line)
    print(f"compare: {len(rows)} strategies in {time.perf_counter() - t0:.0f} s -> {config.output}/compare.md, compare.csv, compare.png")
    return rows


COMMAND = Command("compare", CompareConfig, run, "every strategy on the same test images, in one table and one chart")
