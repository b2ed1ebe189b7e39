"""Benchmark (``python -m pipeline bench``): extraction against the widely copied naive loop and the compute-only limit (TensorFlow precisions and OpenVINO int8), plus storage, memory, incremental and accuracy checks; with ``--backbone``, each backbone's extraction speed, feature shape and GMACs instead; with ``--data-path``, the data path alone (``datapath``); with ``--train``, the classical stage's fit time against rows (``train``).

Each speed is measured in a fresh process (``children``); the tables are written by ``report``. Each
measurement's files (``bench.json`` and ``bench.md``; ``data_path.*``; ``train_bench.*``) are one set, published
together (``core.outputsets``): a failure leaves the previous figures whole.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.backbones.registry import BACKBONES
from pipeline.bench import children, report
from pipeline.core.command import Command
from pipeline.core.config import MAX_INT, Interval, ListOf, OneOf, option, validate
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import OutputLock, prepare_output_dir, write_text_atomic
from pipeline.core.guard import refuse_inside
from pipeline.core.outputsets import check_members, publish, settle

DEFAULT_DATA = Path("data/fashion-mnist")
PRECISIONS_MEASURED = ("float32", "bfloat16", "float16", "int8")
#: ``--isa``: ``avx2`` limits oneDNN (the kernels of TensorFlow and of OpenVINO's CPU plugin)
#: to AVX2 in every step, and ``auto`` precision to float32: an AVX2-only CPU, on this one.
ISAS = ("native", "avx2")
#: The output set the main measurement publishes (``core.outputsets``).
FILES = ("bench.md", "bench.json")


@dataclass(frozen=True)
class BenchConfig:
    """Settings of ``python -m pipeline bench`` (every figure is a median over ``repeats``)."""

    data: Path = option(DEFAULT_DATA, "folder with train/ and test/ class trees")
    images: int = option(128, "images in the throughput slice", rule=Interval(int, 1, MAX_INT))
    repeats: int = option(3, "repeats; figures are medians", rule=Interval(int, 1, MAX_INT))
    input_size: int = option(224, "network input side", rule=Interval(int, 32, MAX_INT), message="VGG16 needs at least 32 pixels")
    batch_size: int = option(32, "images per network call", rule=Interval(int, 1, MAX_INT))
    precisions: tuple[str, ...] = option(PRECISIONS_MEASURED, "precisions to measure", rule=ListOf(what="precisions"), metavar="P1,P2,...")
    backbones: tuple[str, ...] = option(
        (), "measure these backbones instead of the precision tables (extract img/s, feature shape, GMACs; each at its default input side)",
        rule=ListOf(what="backbones", everything=tuple(BACKBONES)), flag="--backbone", metavar="B1,B2,...|all",
    )  # fmt: skip
    memory_images: int = option(64, "memory check on N and 10N images", rule=Interval(int, 1, MAX_INT))
    incremental_images: int = option(1000, "images in the incremental check", rule=Interval(int, 2, MAX_INT))
    quick: bool = option(False, "throughput table only")
    isa: str = option("native", "native, or avx2: limit oneDNN (TensorFlow's and OpenVINO's kernels) to AVX2, as on an AVX2-only CPU", rule=OneOf(ISAS))
    output: Path = option(Path("features/bench"), "where bench.json and bench.md go", short="-o")
    quiet: bool = option(False, "no progress messages")
    data_path: bool = option(False, "measure the data path alone (decode, compress, assemble; the network replaced by a stub replaying --replay's features)")
    replay: Path = option(Path("features/train.h5"), "with --data-path: the feature file whose real rows the stub replays; with --train: the rows replicated")
    train: bool = option(False, "measure training alone: fit time and rows/s against rows, in memory and out of core, on --replay's rows replicated with a seeded perturbation, against one read pass of the same file")
    train_sizes: tuple[int, ...] = option((1000, 10000, 50000), "with --train: the row counts", rule=ListOf(int, Interval(int, 1, MAX_INT), what="whole numbers"), metavar="N1,N2,...")
    test_features: Path = option(Path("features/test.h5"), "with --train: the test feature file the fitted models are scored on")

    def validate(self) -> "BenchConfig":
        """Check every value; return self. ``--data-path`` needs no data folder and measures no precision.

        Raises:
            PipelineError: a bad value, an unknown precision or backbone, no ``DATA/train``, int8 asked without its extra.
        """
        validate(self)
        if self.data_path or self.train:
            return self
        unknown = [p for p in self.precisions if p not in PRECISIONS_MEASURED]
        if unknown:
            raise PipelineError(f"--precisions {','.join(self.precisions)}: unknown {', '.join(unknown)}; choose from {', '.join(PRECISIONS_MEASURED)}")
        if [b for b in self.backbones if b not in BACKBONES]:
            raise PipelineError(f"--backbone {','.join(self.backbones)}: choose from all, {', '.join(BACKBONES)}")
        if not (self.data / "train").is_dir():
            raise PipelineError(f"{self.data}/train: no such folder; run `make data` first (or pass --data with train/ and test/)")
        if "int8" in self.precisions:
            from pipeline.backbones.int8 import require_int8

            try:
                require_int8()
            except PipelineError as exc:
                raise PipelineError(f"{exc}; or leave int8 out of --precisions") from None
        return self


def _run_child(*args: str) -> dict:
    """The figures of one step measured in a fresh process (``pipeline.bench.children``)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "pipeline.bench.children", *args], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(children.MARK):
            return json.loads(line[len(children.MARK) :])
    raise PipelineError(f"benchmark step {args[0]} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")


def _sample_tree(src: Path, dst: Path, n: int, skip: int = 0) -> Path:
    """Symlink ``n`` images of ``src`` (evenly spread over its sorted listing, after ``skip``) into a class tree."""
    from pipeline.images.listing import list_images

    listing = list_images(src)
    pick = np.linspace(0, len(listing) - 1, num=min(n + skip, len(listing))).astype(int)[skip:]
    for i in pick.tolist():
        target = dst / listing.paths[i]
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.symlink((listing.root / listing.paths[i]).resolve(), target)
    return dst


def _throughput(args, tmp: Path, say) -> dict:
    sample = _sample_tree(args.data / "train", tmp / "sample", args.images)
    common = ["--data", str(sample), "--size", str(args.input_size), "--batch", str(args.batch_size)]
    precisions = [p for p in PRECISIONS_MEASURED if p in args.precisions]
    runs: dict[str, list[dict]] = {}
    calibration = None
    if "int8" in precisions:  # once, before the repeats: every int8 step then uses this model
        calibration = _run_child("calibrate", *common)
        say(f"  int8 calibration on {calibration['images']} images: {calibration['seconds']:.1f} s")
    for rep in range(args.repeats):
        order = ["naive"] + [f"compute-{p}" for p in precisions] + [f"extract-{p}" for p in precisions]
        for name in order:
            if name == "naive":
                r = _run_child("naive", *common, "--out", str(tmp / "naive.h5"))
            elif name.startswith("compute-"):
                r = _run_child("compute", *common, "--precision", name[8:])
            else:
                r = _run_child("extract", *common, "--precision", name[8:], "--out", str(tmp / f"{name}.h5"))
            r["images_per_second"] = r["images"] / r["seconds"]
            runs.setdefault(name, []).append(r)
            say(f"  repeat {rep + 1}/{args.repeats} {name:<18} {r['images_per_second']:7.2f} img/s  peak {r['peak_rss_mb']:.0f} MB")
    rows = []
    for name, rs in runs.items():
        ips = [r["images_per_second"] for r in rs]
        # Ratios within one repeat (same minute of a noisy machine), then the median.
        vs_naive = [r["images_per_second"] / n["images_per_second"] for r, n in zip(rs, runs["naive"])]
        precision = name.split("-", 1)[1] if "-" in name else "float32"
        limit = runs.get(f"compute-{precision}", runs.get("compute-float32"))
        vs_limit = [r["images_per_second"] / c["images_per_second"] for r, c in zip(rs, limit)] if limit else []
        rows.append(
            {
                "variant": name,
                "images_per_second": statistics.median(ips),
                "vs_naive": statistics.median(vs_naive),
                "vs_compute_limit": statistics.median(vs_limit) if vs_limit else None,
                "vs_compute_float32": statistics.median(
                    [r["images_per_second"] / c["images_per_second"] for r, c in zip(rs, runs["compute-float32"])]
                )
                if "compute-float32" in runs
                else None,
                "vs_extract_float32": _median_ratio(rs, runs.get("extract-float32")),
                "vs_extract_bfloat16": _median_ratio(rs, runs.get("extract-bfloat16")),
                "peak_rss_mb": statistics.median([r["peak_rss_mb"] for r in rs]),
                "bytes_per_image": statistics.median([r.get("feature_bytes", r.get("bytes", 0)) / r["images"] for r in rs])
                if not name.startswith("compute")
                else None,
                "repeats": len(rs),
            }
        )
    interleaved = None
    if len(precisions) > 1:
        interleaved = _run_child("interleaved", *common, "--precisions", ",".join(precisions), "--rounds", str(max(3, args.repeats)))
        say("  interleaved: " + ", ".join(f"{p} {v:.2f} img/s" for p, v in interleaved["images_per_second"].items()))
    return {"images": args.images, "rows": rows, "calibration": calibration, "interleaved": interleaved}


def _median_ratio(rs: list[dict], base: list[dict] | None) -> float | None:
    """Median over repeats of the speed ratio to ``base`` within each repeat (same minute of a noisy machine)."""
    if not base:
        return None
    return statistics.median([r["images_per_second"] / b["images_per_second"] for r, b in zip(rs, base)])


def _backbones(args, tmp: Path, say) -> dict:
    """Each backbone's ``extract`` at ``auto`` precision on the same images, in turn within each repeat; ratios to the first within a repeat."""
    sample = _sample_tree(args.data / "train", tmp / "sample", args.images)
    runs: dict[str, list[dict]] = {b: [] for b in args.backbones}
    for rep in range(args.repeats):
        for b in args.backbones:
            r = _run_child("backbone", "--data", str(sample), "--batch", str(args.batch_size), "--precision", "auto", "--backbone", b, "--out", str(tmp / f"{b}.h5"))
            r["images_per_second"] = r["images"] / r["seconds"]
            runs[b].append(r)
            say(f"  repeat {rep + 1}: {b} {r['images_per_second']:.2f} img/s")
    first = args.backbones[0]
    rows = [
        {"backbone": b, "input_size": rs[0]["input_size"], "feature_shape": rs[0]["feature_shape"], "gmacs": rs[0]["gmacs"],
         "images_per_second": statistics.median(r["images_per_second"] for r in rs), "vs_first": _median_ratio(rs, runs[first]),
         "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs)}
        for b, rs in runs.items()
    ]  # fmt: skip
    return {"images": runs[first][0]["images"], "first": first, "rows": rows}


def _memory_scaling(args, tmp: Path, say) -> dict:
    """Peak RSS of extract on N and 10N images: rows are streamed, so it must not grow."""
    out = {}
    for n in (args.memory_images, 10 * args.memory_images):
        tree = _sample_tree(args.data / "train", tmp / f"mem{n}", n)
        r = _run_child("extract", "--data", str(tree), "--size", str(args.input_size), "--batch", str(args.batch_size), "--precision", "auto", "--out", str(tmp / f"mem{n}.h5"))
        out[n] = r["peak_rss_mb"]
        say(f"  memory: {n} images -> peak {r['peak_rss_mb']:.0f} MB")
    small, large = out.values()
    return {"images": list(out), "peak_rss_mb": list(out.values()), "growth": large / small - 1.0}


def _incremental(args, tmp: Path, say) -> dict:
    """A full run, then 1% added, then 1% removed: the updates must cost a small fraction."""
    from pipeline.extract import stage as extract
    from pipeline.extract.config import ExtractConfig

    n = args.incremental_images
    tree = _sample_tree(args.data / "train", tmp / "inc", n)
    out = tmp / "inc.h5"
    cfg = ExtractConfig(data_dir=tree, output=out, input_size=args.input_size, batch_size=args.batch_size, quiet=True)

    def timed() -> float:
        t0 = time.perf_counter()
        if extract.run(cfg) != 0:
            raise PipelineError("extract failed inside the incremental benchmark")
        return time.perf_counter() - t0

    full = timed()
    k = max(1, n // 100)
    extra = _sample_tree(args.data / "test", tmp / "inc", k)  # 1% new images, from the test split
    add = timed()
    from pipeline.images.listing import list_images

    listing = list_images(extra)
    for p in listing.paths[:: max(1, len(listing) // k)][:k]:
        (extra / p).unlink()
    remove = timed()
    say(f"  incremental: full {full:.1f} s, +{k} images {add:.2f} s, -{k} images {remove:.2f} s")
    return {"images": n, "changed": k, "full_seconds": full, "add_seconds": add, "remove_seconds": remove,
            "add_ratio": add / full, "remove_ratio": remove / full}  # fmt: skip


def _accuracy(args, say) -> dict:
    """Logistic regression (``train``'s protocol: C chosen by cross-validation on the training
    features) on the default data's features at each precision, against float32; and the
    cosine similarity of each image's features to its float32 features."""
    from pipeline.extract import stage as extract
    from pipeline.extract.config import ExtractConfig

    results = {}
    folder = args.output / "features"
    folder.mkdir(parents=True, exist_ok=True)
    for precision in ("float32", "bfloat16", "int8"):
        if precision != "float32" and precision not in args.precisions:
            continue
        files = {}
        for split in ("train", "test"):
            files[split] = folder / f"{precision}-{split}.h5"
            cfg = ExtractConfig(data_dir=args.data / split, output=files[split], precision=precision, quiet=True, batch_size=args.batch_size)
            if extract.run(cfg) != 0:
                raise PipelineError(f"extract failed for {files[split]}")
        results[precision] = _lr_accuracy(files["train"], files["test"], args.output / f"lr-{precision}")
        if precision != "float32":
            results[precision]["cosine_to_float32"] = _cosines([folder / f"float32-{s}.h5" for s in ("train", "test")], [files["train"], files["test"]])
        cos = results[precision].get("cosine_to_float32")
        say(f"  accuracy: LR on {precision} features: {results[precision]['accuracy']:.4f}" + (f"; cosine to float32 min {cos['min']:.4f} median {cos['median']:.4f}" if cos else ""))
    return results


def _cosines(reference: list[Path], other: list[Path]) -> dict:
    """Minimum and median cosine similarity of each image's features in ``other`` to the same image's (by path) in ``reference``."""
    from pipeline.featurefile.store import open_features

    sims = []
    for ref, oth in zip(reference, other):
        with open_features(ref) as a, open_features(oth) as b:
            where = {p: i for i, p in enumerate(a.paths)}
            order = np.asarray([where[p] for p in b.paths])
            x = a.db["features"][:].astype(np.float32).reshape(len(a), -1)[order]
            y = b.db["features"][:].astype(np.float32).reshape(len(b), -1)
        sims.append((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)))
    sims = np.concatenate(sims)
    return {"images": int(len(sims)), "min": float(sims.min()), "median": float(np.median(sims))}


def _lr_accuracy(train: Path, test: Path, out: Path) -> dict:
    from pipeline.classical import train as train_stage

    cfg = train_stage.TrainConfig(features=train, model="lr", test=test, output=out, quiet=True)
    metrics = train_stage.run(cfg)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "fit_seconds": metrics.get("fit_seconds")}


def _training(args, say) -> dict:
    """Our default LR search against GridSearchCV(LogisticRegression(), C over 6 values, cv=3) on flattened features."""
    folder = args.output / "features"
    precision = "bfloat16" if "bfloat16" in args.precisions else "float32"
    tr, te = folder / f"{precision}-train.h5", folder / f"{precision}-test.h5"
    t0 = time.perf_counter()
    ours = _lr_accuracy(tr, te, args.output / "lr-search")
    ours_seconds = time.perf_counter() - t0
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    from pipeline.featurefile.store import open_features

    def load(p):
        with open_features(p) as ff:
            return np.concatenate([b.reshape(len(b), -1) for _, b in ff.iter_chunks()]), ff.labels

    xtr, ytr = load(tr)
    xte, yte = load(te)
    t0 = time.perf_counter()
    grid = GridSearchCV(LogisticRegression(), {"C": [0.1, 1, 10, 100, 1000, 10000]}, cv=3).fit(xtr, ytr)
    naive_seconds = time.perf_counter() - t0
    naive_acc = float(grid.score(xte, yte))
    say(f"  training: ours {ours_seconds:.1f} s acc {ours['accuracy']:.4f}; GridSearchCV {naive_seconds:.1f} s acc {naive_acc:.4f}")
    return {"ours_seconds": ours_seconds, "ours_accuracy": ours["accuracy"], "gridsearch_seconds": naive_seconds,
            "gridsearch_accuracy": naive_acc, "speedup": naive_seconds / ours_seconds}  # fmt: skip


def run(args: BenchConfig) -> dict:
    """Run every benchmark step; write ``bench.json`` and ``bench.md`` into ``args.output``; return the figures (``--data-path`` and ``--train``: their own).

    One run per output folder (``OUT/bench.lock`` held throughout: a second is refused naming the holder).
    """
    args.validate()
    refuse_inside(args.output, _image_folders(args), "choose another -o folder")  # its tables and charts would be read as images next time
    with OutputLock(prepare_output_dir(args.output) / "bench"):
        return _measure(args)


def _image_folders(args: BenchConfig) -> list[tuple[str, Path | str | None]]:
    """The image folders this run reads: the data folder, or (``--train``, ``--data-path``) those its feature files were extracted from."""
    if not (args.train or args.data_path):
        return [("the data folder", args.data)]
    from pipeline.featurefile.store import open_features

    folders = []
    for path in (args.replay, args.test_features) if args.train else (args.replay,):
        if path is not None and Path(path).is_file():  # a missing file is refused by the measurement, in its own words
            with open_features(path) as ff:
                folders.append((f"the image folder of {path},", ff.attrs.get("data_dir")))
    return folders


def _measure(args: BenchConfig) -> dict:
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if args.data_path:  # its own measurement (datapath.py): no network, no data folder
        from pipeline.bench import datapath

        settle(args.output, "data_path")  # what a killed run left half moved is finished first
        check_members(args.output, "data_path", datapath.FILES)  # before the measurement, not after it
        return datapath.run(args.replay, args.output, say, args.repeats, batch_size=args.batch_size)
    if args.train:  # its own measurement (bench/train.py): the classical stage on real feature rows
        from pipeline.bench import train as bench_train

        settle(args.output, "train_bench")  # what a killed run left half moved is finished first
        check_members(args.output, "train_bench", bench_train.FILES)
        return bench_train.run_train_bench(args.replay, args.output, test=args.test_features, sizes=args.train_sizes, say=say)
    args.output.mkdir(parents=True, exist_ok=True)
    settle(args.output, "bench")
    check_members(args.output, "bench", FILES)
    from pipeline.backbones.network import CPU_FLAGS_ENV, cpu_flags

    machine = f"{platform.machine()} {os.cpu_count()} cores" + (" AVX512-BF16" if "avx512_bf16" in cpu_flags() else "")
    if args.isa == "avx2":  # before any network loads here or in a child: oneDNN reads it once
        os.environ.update(ONEDNN_MAX_CPU_ISA="AVX2", **{CPU_FLAGS_ENV: "avx2 fma"})
        machine += ", oneDNN limited to AVX2 (an AVX2-only CPU)"
    result = {"machine": machine, "input_size": args.input_size, "batch_size": args.batch_size, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="bench-") as t:
        tmp = Path(t)
        if args.backbones:  # the backbone table alone: the other tables are VGG16's
            say("backbones (each extraction in its own process):")
            result["backbones"] = _backbones(args, tmp, say)
        else:
            say("throughput (each variant in its own process):")
            result["throughput"] = _throughput(args, tmp, say)
        if not args.quick and not args.backbones:
            result["memory"] = _memory_scaling(args, tmp, say)
            result["incremental"] = _incremental(args, tmp, say)
    if not args.quick and not args.backbones:
        result["accuracy"] = _accuracy(args, say)
        result["training"] = _training(args, say)
    md = report.markdown(result)
    with publish(args.output, "bench", FILES, lock="bench.json", locked=False) as stage:  # both new, or both as before
        write_text_atomic(stage.path("bench.json"), json.dumps(result, indent=1))
        write_text_atomic(stage.path("bench.md"), md)
    print(md)
    return result


COMMAND = Command("bench", BenchConfig, run, "measure extraction speed, memory, storage, incremental cost and accuracy")
