"""``bench --train``: fit time and rows/s of the linear models against the number of rows, in memory and out of core, on real feature rows replicated with a seeded perturbation, against one parallel read pass of the same file per epoch.

The rows: a feature file's own rows, and copies of them multiplied by ``1 + NOISE * N(0, 1)``
(seeded, stored float16 like every feature file) to reach the larger sizes, written class by
class as extraction writes them. Every size is fitted with the default search of ``--model``
and ``--epochs``: in memory (the search ``train`` runs for that size, plus the exact
row-space search of the previous code path up to ``exact_max_rows``) while the float32 matrix
fits ``in_memory_mb``, and out of core (the engine on the stream) at every size. The
reference line is one pass of the parallel chunk reader over the file (read, decompress,
check, pool): the ratio ``fit / (read x epochs)`` is 1 for a fit as fast as reading.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.rows.pooling import read_groups
from pipeline.classical.fitting import ROW_SPACE_MAX_ROWS, fit_matrix, fit_out_of_core, predict_matrix
from pipeline.classical.models import MODELS
from pipeline.classical.overlap import check_no_overlap
from pipeline.rows.stream import ChunkReader
from pipeline.report import plots
from pipeline.core.outputs import write_text_atomic
from pipeline.core.outputsets import publish, scratch_folder
from pipeline.featurefile.store import open_features
from pipeline.featurefile.writer import write_feature_file

#: The output set this measurement publishes (``core.outputsets``).
FILES = ("train_bench.png", "train_bench.md", "train_bench.json")

SIZES = (1000, 10000, 50000)
#: Relative size of the perturbation of the replicated rows.
NOISE = 0.05


def replicate(src: Path, dst: Path, rows: int, seed: int = 0) -> int:
    """Write a feature file of about ``rows`` rows at ``dst``: ``src``'s rows, then perturbed copies, class by class; returns the rows written."""
    with open_features(src) as ff:
        x = ff.db["features"][:]
        labels, names, attrs, paths = ff.labels, ff.label_names, ff.attrs, ff.paths
        storage = ff.db["features"].dtype.name
    copies = -(-rows // len(x))
    rng = np.random.default_rng(seed)
    per_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    want = {c: len(r) * rows // len(x) for c, r in per_class.items()}

    def blocks():
        for c, idx in per_class.items():
            left = want[c]
            for k in range(copies):
                take = idx[: min(len(idx), left)]
                if not len(take):
                    break
                block = x[take].astype(np.float32)
                if k:
                    block *= 1.0 + NOISE * rng.standard_normal(block.shape, np.float32)
                zeros = np.zeros(len(take), np.int64)
                yield block, labels[take].astype(np.int32), [f"{paths[i]}#{k}" for i in take], zeros, zeros
                left -= len(take)

    keep = {k: v for k, v in attrs.items() if k not in ("complete", "format_version", "n_images", "n_rejected", "merged_from")}
    keep.update(shards=1, shard=0)  # one file, whatever the replay was (a merged one's record would be missing)
    return write_feature_file(dst, row_shape=x.shape[1:], storage=storage, class_names=tuple(names), rows=blocks(), rejected=[], attrs=keep)


def read_pass(path: Path, pool: str = "flatten") -> float:
    """Seconds of one pass of the parallel chunk reader over every row of ``path``."""
    with open_features(path) as ff:
        reader = ChunkReader(ff, pool)
        keep = np.ones(len(ff), bool)
        t0 = time.perf_counter()
        for _ in reader.blocks(np.arange(0, len(ff), reader.step), keep):
            pass
        return time.perf_counter() - t0


def _test_rows(test: Path | None, pool: str):
    if test is None:
        return None, None
    with open_features(test) as tf:
        (x,) = read_groups(tf, [np.arange(len(tf))], pool)
        return x, tf.labels


def _in_memory(path: Path, model: str, epochs: int, exact: bool, x_test, y_test) -> dict:
    with open_features(path) as ff:
        (X,) = read_groups(ff, [np.arange(len(ff))], "flatten")
        y = ff.labels
    t0 = time.perf_counter()
    est, result, space = fit_matrix(X, y, model=model, epochs=epochs, quiet=True, row_space_max_rows=len(X) if exact else ROW_SPACE_MAX_ROWS)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "rows_per_s": len(X) / seconds, "space": space["kind"], "best": result.best_params}
    if x_test is not None:
        out["accuracy"] = float(np.mean(predict_matrix(est, x_test) == y_test))
    return out


def _out_of_core(path: Path, model: str, epochs: int, x_test, y_test) -> dict:
    with open_features(path) as ff:
        fitted = fit_out_of_core(ff, np.arange(len(ff)), ff.labels, {k: list(v) for k, v in MODELS[model].grid.items()}, model=model, pool="flatten",
                                 scaling="l2", cv=3, seed=0, epochs=epochs, quiet=True, memory_budget_mb=2048)  # fmt: skip
        n = len(ff)
    out = {"seconds": fitted.fit_seconds, "rows_per_s": n * epochs / fitted.fit_seconds, "best": fitted.search.best_params,
           "batch_rows": fitted.space["batch_rows"], "device": fitted.space["device"]}  # fmt: skip
    if x_test is not None:
        out["accuracy"] = float(np.mean(predict_matrix(fitted.estimator, x_test) == y_test))
    return out


def run_train_bench(features: Path, output: Path, *, test: Path | None = None, sizes=SIZES, model: str = "lr", epochs: int = 5,
                    in_memory_mb: float = 2048, exact_max_rows: int = 5000, reads: int = 3, say=print) -> dict:  # fmt: skip
    """Measure, write ``train_bench.json``, ``train_bench.md`` and ``train_bench.png`` into ``output``; return the figures.

    Args:
        features: a feature file of real rows (e.g. ``features/train.h5``), replicated to each size.
        output: the folder for the three outputs (created).
        test: a compatible test file; each fit's test accuracy is reported when given.
        sizes: row counts; in memory only while ``rows x d x 4`` bytes fit ``in_memory_mb``.
        model, epochs: ``lr`` or ``svm`` with its default grid; the engine's passes.
        exact_max_rows: the exact row-space search (the previous in-memory path) up to this many rows.
        reads: read passes per size (their median is the reference).
    """
    output = Path(output)
    rows = []
    # Removed however the measurement ends (a full disk, an interrupt): the row files are the bench's own.
    if test is not None:  # accuracies on the rows it trained on would be no accuracies (as train --test refuses)
        with open_features(features) as ff, open_features(test) as test_ff:
            check_no_overlap(ff, test_ff, False)
    with scratch_folder(output.parent if output.parent.exists() else Path(tempfile.gettempdir()), "train-bench") as tmp:
        x_test, y_test = _test_rows(test, "flatten")
        for size in sizes:
            path = tmp / f"rows-{size}.h5"
            n = replicate(Path(features), path, size)
            with open_features(path) as ff:
                d = int(np.prod(ff.row_shape))
            read = statistics.median(read_pass(path) for _ in range(reads))
            row = {"rows": n, "read_seconds": read, "read_rows_per_s": n / read, "file_mb": os.path.getsize(path) / 2**20}
            say(f"train bench: {n} rows, read pass {read:.2f} s ({n / read:.0f} rows/s)")
            if n * d * 4 <= in_memory_mb * 2**20:
                row["in_memory"] = _in_memory(path, model, epochs, False, x_test, y_test)
                say(f"  in memory ({row['in_memory']['space']}): {row['in_memory']['seconds']:.1f} s")
                if n <= exact_max_rows and row["in_memory"]["space"] == "engine":
                    row["exact"] = _in_memory(path, model, epochs, True, x_test, y_test)
                    say(f"  in memory, exact row-space search: {row['exact']['seconds']:.1f} s")
            row["out_of_core"] = _out_of_core(path, model, epochs, x_test, y_test)
            row["ratio"] = row["out_of_core"]["seconds"] / (read * epochs)
            say(f"  out of core: {row['out_of_core']['seconds']:.1f} s, {row['ratio']:.2f} x (read x epochs)")
            rows.append(row)
            path.unlink()
    result = {"machine": f"{os.uname().machine}, {os.cpu_count()} cores", "load": os.getloadavg()[0], "model": model, "epochs": epochs,
              "source": str(features), "noise": NOISE, "test": str(test) if test else None, "rows": rows}  # fmt: skip
    output.mkdir(parents=True, exist_ok=True)
    with publish(output, "train_bench", FILES, lock="train_bench.json", locked=False) as stage:
        write_text_atomic(stage.path("train_bench.json"), json.dumps(result, indent=1))
        write_text_atomic(stage.path("train_bench.md"), markdown(result))
        chart(result, stage.path("train_bench.png"))
    return result


def chart(result: dict, path: Path) -> Path:
    """Fit time against rows, both modes and the read pass times the epochs, on log axes."""
    rows, epochs = result["rows"], result["epochs"]
    series = {"out of core": {r["rows"]: r["out_of_core"]["seconds"] for r in rows}, f"read pass x {epochs}": {r["rows"]: r["read_seconds"] * epochs for r in rows}}
    if any("in_memory" in r for r in rows):
        series["in memory"] = {r["rows"]: r["in_memory"]["seconds"] for r in rows if "in_memory" in r}
    if any("exact" in r for r in rows):
        series["in memory, exact row space"] = {r["rows"]: r["exact"]["seconds"] for r in rows if "exact" in r}
    return plots.line_chart(series, path, title=f"{result['model']}: fit time against rows ({epochs} epochs)", xlabel="training rows", ylabel="seconds", log=True)


def markdown(result: dict) -> str:
    """The table: one line per size."""
    def f(mode, key, fmt):
        return format(mode[key], fmt) if mode and key in mode else "-"

    lines = [
        f"`bench --train`, {result['model']}, {result['epochs']} epochs, default grid; rows of {result['source']} replicated with a seeded "
        f"x(1 + {result['noise']} N(0,1)) perturbation; {result['machine']}, load {result['load']:.1f}.",
        "",
        "| rows | read pass s | in memory s (search) | exact row space s | out of core s | out of core rows/s | fit / (read x epochs) | accuracy in memory / out of core |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        im, ex, oc = r.get("in_memory"), r.get("exact"), r["out_of_core"]
        space = f" ({im['space']})" if im else ""
        lines.append(f"| {r['rows']:,} | {r['read_seconds']:.2f} | {f(im, 'seconds', '.1f')}{space} | {f(ex, 'seconds', '.1f')} | {oc['seconds']:.1f} | "
                     f"{oc['rows_per_s']:.0f} | {r['ratio']:.2f} | {f(im, 'accuracy', '.3f')} / {f(oc, 'accuracy', '.3f')} |")  # fmt: skip
    return "\n".join(lines) + "\n"
