"""``compare --sizes``: each strategy's test accuracy against the training images per class, features extracted once for the largest size.

For sizes N1 < N2 < ... every class's training images are taken in one seeded order and
size N keeps the first N of them, so each smaller set is inside the larger ones. Size N's
images are a tree of symbolic links, ``OUT/sizes/N/train/<class>/<file>`` (its ``test``
links to the real test tree: every size is scored on the same test images). The networks
train on those trees exactly as ``compare`` runs them (``compare.rows``); the frozen-feature
rows are fitted by ``train``'s own plan and fit (its search and defaults) on that size's rows
of one feature file extracted from the largest size's tree, so no image is extracted twice.
Each point carries its Wilson interval and its paired test against the best strategy at
that size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from pipeline.compare import rows as kinds
from pipeline.compare.config import CLASSICAL, SIZES_FILES
from pipeline.compare.verdicts import judged, summaries
from pipeline.core.errors import PipelineError
from pipeline.core.guard import refuse_inside
from pipeline.core.outputs import write_text_atomic
from pipeline.core.outputsets import publish
from pipeline.report.stats import ALPHA, CONFIDENCE

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
    for folder in (root, train):
        if folder.is_symlink():
            _in_the_way(folder)  # the links would be made where it leads (a linked folder inside is removed below: never wanted)
    if train.is_dir():
        for p in sorted(train.rglob("*")):
            if p.is_symlink() and p.relative_to(train).as_posix() not in wanted:
                p.unlink()
    for rel in paths:
        link, target = train / rel, (source / rel).resolve()
        try:
            link.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PipelineError(f"{link.parent}: cannot be a folder of the --sizes tree ({exc.strerror or exc}); move it out or choose another -o") from None
        if link.is_symlink() and os.readlink(link) == str(target):
            continue
        if link.is_symlink():
            link.unlink()
        elif os.path.lexists(link):
            _in_the_way(link)
        link.symlink_to(target)
    test = root / "test"
    if test.is_symlink() and os.readlink(test) != str(test_dir.resolve()):
        test.unlink()
    elif os.path.lexists(test) and not test.is_symlink():
        _in_the_way(test)
    if not test.is_symlink():
        test.symlink_to(test_dir.resolve(), target_is_directory=True)
    return root


def _in_the_way(path: Path) -> None:
    raise PipelineError(f"{path}: is not a link compare made (its --sizes tree holds only links to the training and test images); "
                        "move it out or choose another -o")  # fmt: skip


def run_sizes(config) -> list[dict]:
    """Every (size, strategy) row, training what is missing; writes ``sizes.md``, ``.csv``, ``.json`` and ``sizes.png``.

    Args:
        config: the ``CompareConfig`` (``sizes`` non-empty).

    Returns:
        One row per size and strategy, each with ``per_class`` (the size), its interval,
        its p-value against the best strategy at that size and its status.

    Raises:
        PipelineError: a class with fewer images than the largest size, or rows scored on
            different test sets.
    """
    from pipeline.core.progress import progress

    t0 = time.perf_counter()
    sizes = tuple(sorted(config.sizes))
    subsets = nested_subsets(config.data_root / "train", sizes, config.seed)
    base = config.output / "sizes"
    for folder in (f for n in sizes for f in (base / str(n), base / str(n) / "models")):  # links or records made where a link leads
        refuse_inside(folder, [("the data folder", config.data_root)], "choose another -o folder")
    roots = {n: link_tree(base / str(n), config.data_root / "train", config.data_root / "test", subsets[n]) for n in sizes}
    largest = dataclasses.replace(config, data_root=roots[sizes[-1]], output=base / str(sizes[-1]), sizes=())
    if any(s in CLASSICAL for s in config.strategies):
        train_h5, test_h5 = kinds.extract(largest, "train"), kinds.extract(config, "test")
    rows, seen = [], {}  # seen: the training file's images stat-ed once for every size and classical strategy
    with progress(len(sizes) * len(config.strategies), "compare --sizes", "run", quiet=config.quiet) as bar:
        for n in sizes:
            sub = dataclasses.replace(config, data_root=roots[n], output=base / str(n), sizes=())
            inputs = kinds.Inputs(roots[n])
            at_size = []
            for s in config.strategies:
                for point in config.points if s == "finetune" else config.points[:1]:
                    if s in CLASSICAL:
                        row = kinds.classical_row(sub, s, train_h5, test_h5, train_paths=subsets[n], folder=sub.models, seen=seen)
                    else:
                        row = kinds.net_row(sub, s, point, inputs)
                    at_size.append({**row, "per_class": n})
                bar.update(1)
            rows += judged(at_size)
    counts = {(r["strategy"], r["per_class"]): r.get("n_test") for r in rows}
    if len(set(counts.values())) > 1:
        raise PipelineError(f"rows were scored on different test sets (n_test: {counts}); re-run with --rerun")
    write_outputs(config.output, rows, sizes)
    print(f"compare --sizes: {len(rows)} runs in {time.perf_counter() - t0:.0f} s -> {config.output}/sizes.md, sizes.csv, sizes.png")
    return rows


def table(rows: list[dict], sizes: tuple[int, ...]) -> str:
    """Markdown: one line per strategy, one column per size: the accuracy, with its interval when the rows are judged (``*``: tied with that size's best)."""
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    by = {(r["strategy"], r["per_class"]): r for r in rows}

    def cell(r):
        if "ci_low" not in r:
            return f"{r['accuracy']:.4f}"
        mark = {"best": " (best)", "tied": " *", "different": ""}[r["status"]]
        return f"{r['accuracy']:.4f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]{mark}"

    lines = ["| strategy | " + " | ".join(f"{n}/class" for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for s in strategies:
        lines.append(f"| {s} | " + " | ".join(cell(by[(s, n)]) if (s, n) in by else "" for n in sizes) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(output: Path, rows: list[dict], sizes: tuple[int, ...]) -> None:
    """``sizes.md`` (the table and each size's best and ties), ``sizes.csv``, ``sizes.json`` and the chart ``sizes.png`` (with the intervals), published as one set."""
    md = table(rows, sizes)
    n_test = rows[0].get("n_test") if rows else 0
    lines = "\n".join(f"- {s}" for s in summaries(rows, sizes))
    with publish(output, "sizes", SIZES_FILES, lock="sizes.md", locked=False) as stage:  # all new, or all as before
        _write(stage, md, lines, n_test, rows)
    print(md, end="")
    print("\n".join(summaries(rows, sizes)))


def _write(stage, md: str, lines: str, n_test: int, rows: list[dict]) -> None:
    """Every file of the sizes set, into the staging folder ``stage``."""
    from pipeline.report.plots import line_chart

    write_text_atomic(stage.path("sizes.md"), f"Test accuracy on the same {n_test} test images by training images per class "
                                           f"(nested seeded subsets of the training tree), with {CONFIDENCE:.0%} Wilson intervals; "
                                           f"* = tied with that size's best (exact paired McNemar test, p >= {ALPHA:.2g}).\n\n" + md + "\n" + lines + "\n")  # fmt: skip
    csv_lines = ["strategy,per_class,accuracy,ci_low,ci_high,p_value,status,macro_f1,n_train,n_val"]
    csv_lines += [f"{r['strategy']},{r['per_class']},{r['accuracy']:.4f},{r['ci_low']:.4f},{r['ci_high']:.4f},{r['p_value']:.4g},{r['status']},"
                  f"{r['macro_f1']:.4f},{r['n_train']},{r['n_val']}" for r in rows]  # fmt: skip
    write_text_atomic(stage.path("sizes.csv"), "\n".join(csv_lines) + "\n")
    write_text_atomic(stage.path("sizes.json"), json.dumps([{k: v for k, v in r.items() if k != "predictions"} for r in rows], indent=1, default=str))
    series: dict[str, dict[int, float]] = {}
    bands: dict[str, dict[int, tuple[float, float]]] = {}
    for r in rows:
        series.setdefault(r["strategy"], {})[r["per_class"]] = r["accuracy"]
        bands.setdefault(r["strategy"], {})[r["per_class"]] = (r["ci_low"], r["ci_high"])
    line_chart(series, stage.path("sizes.png"), title=f"Test accuracy on the same {n_test} images ({CONFIDENCE:.0%} Wilson intervals)",
               xlabel="training images per class", ylabel="accuracy", bands=bands)  # fmt: skip
