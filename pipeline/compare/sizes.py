"""``compare --sizes``: each strategy's test accuracy against the training images per class, features extracted once for the largest size.

For sizes N1 < N2 < ... every class's training images are taken in one seeded order and
size N keeps the first N of them, so each smaller set is inside the larger ones. Size N's
images are a tree of symbolic links, ``OUT/sizes/N/train/<class>/<file>`` (its ``test``
links to the real test tree: every size is scored on the same test images). The networks
train on those trees exactly as ``compare`` runs them; the frozen-feature rows are fitted
(with ``train``'s search and defaults) on the rows of one feature file extracted from the
largest size's tree, so no image is extracted twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.outputs import write_text_atomic

#: The strategies ``--sizes`` can draw (every one that trains on images or on feature rows).
SIZE_STRATEGIES = ("scratch", "scratch-resnet", "lr", "svm", "rf", "head", "finetune-dense", "finetune", "finetune-plain")
CLASSICAL = ("lr", "svm", "rf")


def check_sizes(sizes: tuple[int, ...], strategies: tuple[str, ...]) -> None:
    """Refuse sizes below 1, repeated sizes, and strategies ``--sizes`` cannot draw (before any work)."""
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise PipelineError(f"--sizes {','.join(map(str, sizes))}: every size must be a whole number of training images per class, at least 1")
    if len(set(sizes)) != len(sizes):
        raise PipelineError(f"--sizes {','.join(map(str, sizes))}: a size is repeated")
    unfit = [s for s in strategies if s not in SIZE_STRATEGIES]
    if unfit:
        raise PipelineError(f"--sizes: strategy {unfit[0]!r} cannot be drawn against the data size; choose from {', '.join(SIZE_STRATEGIES)}")


def nested_subsets(train_dir: Path, sizes: tuple[int, ...], seed: int) -> dict[int, list[str]]:
    """Size -> the relative paths of its images: per class, the first N of one seeded order.

    Raises:
        PipelineError: a class has fewer images than the largest size.
    """
    from pipeline.images.listing import list_images

    listing = list_images(train_dir)
    paths = np.asarray(listing.paths, dtype=object)
    orders = []
    for k, name in enumerate(listing.class_names):
        mine = np.flatnonzero(listing.labels == k)
        if len(mine) < max(sizes):
            raise PipelineError(f"--sizes {max(sizes)}: class {name!r} of {train_dir} has only {len(mine)} images")
        orders.append(paths[mine[np.random.default_rng([seed, k]).permutation(len(mine))]])
    return {n: sorted(p for order in orders for p in order[:n]) for n in sizes}


def link_tree(root: Path, source: Path, test_dir: Path, paths: list[str]) -> Path:
    """``root/train/<path>`` -> ``source/<path>`` for each path and ``root/test`` -> ``test_dir``, as symbolic links (rebuilt when they differ)."""
    train = root / "train"
    wanted = set(paths)
    if train.is_dir():
        for p in sorted(train.rglob("*")):
            if p.is_symlink() and p.relative_to(train).as_posix() not in wanted:
                p.unlink()
    for rel in paths:
        link, target = train / rel, (source / rel).resolve()
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and os.readlink(link) == str(target):
            continue
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target)
    test = root / "test"
    if test.is_symlink() and os.readlink(test) != str(test_dir.resolve()):
        test.unlink()
    if not test.is_symlink():
        test.symlink_to(test_dir.resolve(), target_is_directory=True)
    return root


def _classical_row(config, model: str, train_h5: Path, test_h5: Path, paths: list[str]) -> dict:
    """A frozen-feature row at one size: ``train``'s defaults and search on that size's rows of the largest size's feature file."""
    from pipeline.classical import train
    from pipeline.classical.fitting import fit_in_memory, predict_matrix
    from pipeline.classical.features import read_groups
    from pipeline.core.metrics import scores
    from pipeline.featurefile.store import check_compatible, open_features

    cfg = train.TrainConfig(features=train_h5, model=model, test=test_h5, output=config.output, seed=config.seed, quiet=config.quiet)
    cfg.validate()
    with open_features(train_h5) as ff, open_features(test_h5) as test_ff:
        check_compatible(ff, test_ff)
        index = {p: i for i, p in enumerate(ff.paths)}
        missing = [p for p in paths if p not in index]
        if missing:
            raise PipelineError(f"{train_h5}: no row for {missing[0]} (rejected at extraction?); remove it from the training tree")
        rows = np.sort(np.asarray([index[p] for p in paths], np.int64))
        (x_test,) = read_groups(test_ff, [np.arange(len(test_ff))], cfg.pool, None, True)
        fitted, _ = fit_in_memory(ff, rows, [], ff.labels, cfg.search_grid(), model=model, pool=cfg.pool, scaling=cfg.scaling, cv=cfg.cv,
                                  seed=cfg.seed, n_jobs=cfg.n_jobs, quiet=True, memory_budget_mb=cfg.memory_budget_mb)  # fmt: skip
        s = scores(test_ff.labels, predict_matrix(fitted.estimator, x_test), test_ff.label_names)
    names = {"lr": "frozen features + logistic regression", "svm": "frozen features + linear SVM", "rf": "frozen features + random forest"}
    return {"strategy": names[model], "accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "n_train": int(len(rows)), "n_val": 0,
            "n_test": int(len(x_test)), "best_params": fitted.search.best_params}  # fmt: skip


def run_sizes(config, extract, keras_row) -> list[dict]:
    """Every (size, strategy) row, training what is missing; writes ``sizes.md``, ``.csv``, ``.json`` and ``sizes.png``.

    Args:
        config: the ``CompareConfig`` (``sizes`` non-empty).
        extract: ``(config, split) -> feature file`` (compare's extraction of ``data_root/split``).
        keras_row: ``(config, strategy, unfreeze) -> row`` (compare's nets row).

    Returns:
        One row per size and strategy, each with ``per_class`` (the size).

    Raises:
        PipelineError: a class with fewer images than the largest size, or rows scored on
            different test sets.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    sizes = tuple(sorted(config.sizes))
    subsets = nested_subsets(config.data_root / "train", sizes, config.seed)
    base = config.output / "sizes"
    roots = {n: link_tree(base / str(n), config.data_root / "train", config.data_root / "test", subsets[n]) for n in sizes}
    largest = dataclasses.replace(config, data_root=roots[sizes[-1]], output=base / str(sizes[-1]), sizes=())
    classical = [s for s in config.strategies if s in CLASSICAL]
    if classical:
        train_h5, test_h5 = extract(largest, "train"), extract(config, "test")
    rows = []
    with tqdm(total=len(sizes) * len(config.strategies), desc="compare --sizes", unit="run", disable=config.quiet, file=sys.stderr) as bar:
        for n in sizes:
            sub = dataclasses.replace(config, data_root=roots[n], output=base / str(n), sizes=())
            for s in config.strategies:
                points = config.unfreeze if s == "finetune" else config.unfreeze[:1]
                for point in points:
                    row = _classical_row(sub, s, train_h5, test_h5, subsets[n]) if s in CLASSICAL else keras_row(sub, s, point)
                    rows.append({**row, "per_class": n})
                bar.update(1)
    counts = {(r["strategy"], r["per_class"]): r.get("n_test") for r in rows}
    if len(set(counts.values())) > 1:
        raise PipelineError(f"rows were scored on different test sets (n_test: {counts}); re-run with --rerun")
    write_outputs(config.output, rows, sizes)
    print(f"compare --sizes: {len(rows)} runs in {time.perf_counter() - t0:.0f} s -> {config.output}/sizes.md, sizes.csv, sizes.png")
    return rows


def table(rows: list[dict], sizes: tuple[int, ...]) -> str:
    """Markdown: one line per strategy, one accuracy column per size."""
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    acc = {(r["strategy"], r["per_class"]): r["accuracy"] for r in rows}
    lines = ["| strategy | " + " | ".join(f"{n}/class" for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for s in strategies:
        lines.append(f"| {s} | " + " | ".join(f"{acc[(s, n)]:.4f}" if (s, n) in acc else "" for n in sizes) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(output: Path, rows: list[dict], sizes: tuple[int, ...]) -> None:
    """``sizes.md`` (the table), ``sizes.csv``, ``sizes.json`` and the chart ``sizes.png``."""
    from pipeline.core.plots import line_chart

    md = table(rows, sizes)
    n_test = rows[0].get("n_test") if rows else 0
    write_text_atomic(output / "sizes.md", f"Test accuracy on the same {n_test} test images by training images per class "
                                           "(nested seeded subsets of the training tree).\n\n" + md)  # fmt: skip
    csv_lines = ["strategy,per_class,accuracy,macro_f1,n_train,n_val"]
    csv_lines += [f"{r['strategy']},{r['per_class']},{r['accuracy']:.4f},{r['macro_f1']:.4f},{r['n_train']},{r['n_val']}" for r in rows]
    write_text_atomic(output / "sizes.csv", "\n".join(csv_lines) + "\n")
    write_text_atomic(output / "sizes.json", json.dumps(rows, indent=1, default=str))
    series: dict[str, dict[int, float]] = {}
    for r in rows:
        series.setdefault(r["strategy"], {})[r["per_class"]] = r["accuracy"]
    line_chart(series, output / "sizes.png", title=f"Test accuracy on the same {n_test} images", xlabel="training images per class", ylabel="accuracy")
    print(md, end="")
