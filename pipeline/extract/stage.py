"""Extract stage: images -> a backbone's bottleneck features (``--backbone``, VGG16 by default) -> one HDF5 file, resumable after a kill and safe against bad files; with ``--ray``, one Ray task per shard, then merged.

``run`` checks the paths and lists the images (``pipeline.extract.preflight``), asks
``pipeline.extract.plan`` what the run must do (the backbone resolved once, with it), and
carries that ``Plan`` out: in this process, extract -> assemble -> summary; with
``--ray``, this same ``run`` as a task on each shard file (``pipeline.extract.distributed``
only runs the tasks), then the shards merged into the output (``pipeline.extract.shardset``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pipeline.core.command import Command
from pipeline.core.errors import PipelineError, printable
from pipeline.core.outputs import OutputLock, package_versions
from pipeline.core.signals import sigterm_as_interrupt
from pipeline.backbones import int8 as engines
from pipeline.extract import distributed
from pipeline.extract.config import ExtractConfig
from pipeline.extract.fingerprints import shard_path
from pipeline.featurefile.kept import kept_blocks
from pipeline.extract.loop import extract_rows
from pipeline.extract.preflight import check_paths
from pipeline.extract.plan import UP_TO_DATE, Plan, make_plan
from pipeline.extract.shardset import write_merged
from pipeline.featurefile.schema import RowBlock
from pipeline.featurefile.store import class_summary
from pipeline.featurefile.writer import write_feature_file
from pipeline.images.listing import Reject


def run(config: ExtractConfig) -> int:
    """Extract features for every image of ``config.data_dir`` into ``config.output``.

    A complete output made with the same settings is brought up to date incrementally:
    rows of unchanged files are kept, new or modified files are extracted and appended,
    rows of removed files are dropped. Any other difference needs ``--overwrite``. With
    ``config.ray`` every shard is such a run, as a Ray task, and the shards are merged.

    Returns the exit status: 0 when done (or already up to date), 1 when ``--strict``
    and some file was rejected, 130 when interrupted (the run can be resumed).

    Raises:
        PipelineError: bad settings, a bad data folder, an unwritable output, an output
            made with other settings (without ``--overwrite``), a locked output, a full
            disk; with ``ray``: Ray missing, a shard still failing after its retries.
    """
    config.validate()
    ray = distributed.import_ray() if config.ray else None
    if ray is not None:  # workers may run elsewhere and in another folder: send absolute paths
        config = dataclasses.replace(config, data_dir=Path(os.path.abspath(config.data_dir)), output=Path(os.path.abspath(config.output)))
    beside = shard_path(config.output, 0, 2) if ray is not None else None  # the longest names made beside the output
    whole = check_paths(config.output, config.data_dir, config.weights, beside=beside)
    with OutputLock(config.output):
        plan = make_plan(config, whole)
        if ray is not None:
            return _run_ray(config, plan, ray)
        return _run_local(config, plan)


def _say(config: ExtractConfig, msg: str) -> None:
    if not config.quiet:
        print(msg, file=sys.stderr)


def _run_local(config: ExtractConfig, plan: Plan) -> int:
    """Carry ``plan`` out in this process: extract its rows into the work area, then assemble the output."""
    output, listing, work, kept, todo = config.output, plan.listing, plan.work, plan.kept, plan.todo
    if plan.action == UP_TO_DATE:
        work.remove()  # left over if a run was killed between rename and clean-up
        print(f"{output}: up to date ({len(listing)} images, nothing changed; {class_summary(output, config.shards == 1)})")
        return 0
    if kept and kept.damaged:
        start, stop, why = kept.damaged[0]
        more = f" (and {len(kept.damaged) - 1} more chunks)" if len(kept.damaged) > 1 else ""
        _say(config, f"{output}: the chunk of rows {start}..{stop} {why}{more}: its images are extracted again")
    if kept:
        _say(config, f"updating {output}: keeping {len(kept.rows)} rows, dropping {kept.old_rows - len(kept.rows)}, {len(todo)} new or changed files to extract")
    elif len(plan.done):
        _say(config, f"resuming {output}: {len(plan.done)} of {len(listing)} files already done")
    t0 = time.perf_counter()
    loop_seconds = 0.0
    try:
        with sigterm_as_interrupt():
            if len(todo):
                net = plan.backbone.open(batch_size=config.batch_size, progress=not config.quiet)
                loop_seconds = extract_rows(
                    listing, todo, work, net,
                    input_size=config.input_size, batch_size=config.batch_size, storage=config.storage, resize=config.resize,
                    workers=config.workers, image_timeout=config.image_timeout, progress=not config.quiet, done=len(listing) - len(todo),
                )  # fmt: skip
            # Still in the block: an interrupt while assembling leaves the work area
            # whole (the temporary file is removed) and says so, like one during extraction.
            n, n_rej = _assemble(config, plan, loop_seconds)
            work.remove()
    except KeyboardInterrupt as exc:
        finished = len(work.done_indices(listing, plan.keep_parts, kept.covered if kept else None))
        print(f"interrupted ({exc or 'SIGINT'}) with {finished} files of this run done; run the same command again to resume from {work.path}", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - t0
    rate = len(todo) / loop_seconds if loop_seconds > 0 else 0.0
    detail = f"{len(todo)} processed this run in {seconds:.1f} s ({rate:.1f} img/s once the network was loaded)" if rate else f"{len(todo)} processed this run in {seconds:.1f} s"
    return summarize(output, n, n_rej, detail, config.strict, config.shards == 1)


def _run_ray(config: ExtractConfig, plan: Plan, ray) -> int:
    """Carry ``plan`` out on a Ray cluster: every shard a task running ``run`` on its shard file, then merge them into ``config.output``."""
    output, listing = config.output, plan.listing
    if plan.action == UP_TO_DATE:
        print(f"{output}: up to date ({len(listing)} images in {plan.shards} shards, nothing changed; {class_summary(output)})")
        return 0
    try:
        with distributed.cluster(ray, config.address):
            nodes = distributed.alive_nodes(ray)
            p = distributed.place(nodes, config.ray_workers, plan.shards)
            _say(config, f"ray: {len(nodes)} node(s), {p.shards} shards, {p.workers} at once, {'1 GPU + ' if p.num_gpus else ''}{p.num_cpus} CPU(s) per task")
            results = distributed.run_shards(ray, run, config, listing, p)
    except KeyboardInterrupt:
        print(f"interrupted; finished shards are kept and running ones resume: run the same command again to finish {output}", file=sys.stderr)
        return 130
    t0 = time.perf_counter()
    ran = {r["shard"] for r in results if r["rewritten"]}  # the others were up to date
    try:
        with sigterm_as_interrupt():
            n, n_rej = write_merged(output, [r["output"] for r in results], command_line=config.command_line, ran=ran)
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'SIGINT'}) while merging; the shards are complete: run the same command again to merge them into {output}", file=sys.stderr)
        return 130
    resumed = [r["shard"] for r in results if r["resumed_parts"]]
    detail = (
        f"{p.shards} shard{'s' if p.shards > 1 else ''} on {len({r['host'] for r in results})} host(s), "
        f"longest {max((r['seconds'] for r in results), default=0.0):.1f} s"
        + (f", shard(s) {', '.join(map(str, resumed))} resumed after an interruption" if resumed else "")
        + f"; merged in {time.perf_counter() - t0:.1f} s"
    )
    return summarize(output, n, n_rej, detail, config.strict)


def summarize(output: Path, n: int, n_rejected: int, detail: str, strict: bool, warn: bool = True) -> int:
    """Print the one-line end-of-run summary (with the classes and their image counts); return the exit status (1 for rejects under --strict)."""
    print(
        f"extracted {n} images, rejected {n_rejected}"
        + (f" (listed in rejected/ of {output})" if n_rejected else "")
        + f"; {detail} -> {output} ({class_summary(output, warn)})"
    )
    if strict and n_rejected:
        print(f"error: --strict: {n_rejected} files were rejected (see rejected/ in {output})", file=sys.stderr)
        return 1
    return 0


def _rate_measurement(output: Path, kept, images: int, seconds: float) -> dict:
    """``rate_images``/``rate_seconds``: this run's timing, or an update's previous file's when that one timed more images
    (compare's images/s after a 2-image update was the start-up's, a quarter of the rate)."""
    import h5py

    previous = (0, 0.0)
    if kept:
        try:
            with h5py.File(output, "r") as db:
                a = db.attrs
                previous = int(a.get("rate_images", a.get("images_processed_last_run", 0))), float(a.get("rate_seconds", a.get("extract_seconds", 0.0)))
        except (OSError, ValueError, TypeError):
            previous = (0, 0.0)
    best = previous if previous[0] > images and previous[1] > 0 else (images, seconds)
    return {"rate_images": int(best[0]), "rate_seconds": float(best[1])}


def _assemble(config: ExtractConfig, plan: Plan, loop_seconds: float) -> tuple[int, int]:
    """Write the output from the kept rows and the work area's parts; returns (rows, rejected)."""
    listing, work, kept = plan.listing, plan.work, plan.kept
    parts = work.index(listing, plan.keep_parts, exclude=kept.covered if kept else None)
    rejected: list[Reject] = list(kept.rejected) if kept else []
    covered = len(kept.covered) if kept else 0
    for part in parts:
        covered += len(part.indices) + len(part.rejected_indices)
        versions = listing.versions(part.rejected_indices).tolist()
        rejected.extend(
            Reject(listing.paths[i], r, *v, lim) for i, r, v, lim in zip(part.rejected_indices.tolist(), part.reasons, versions, part.limits)
        )
    if covered != len(listing):
        raise PipelineError(f"{work.path}: work area covers {covered} of {len(listing)} files; re-run to finish")
    rejected.extend(listing.skipped)

    def rows():
        if kept:
            yield from kept_blocks(kept, listing)
        for part in parts:  # one part in memory at a time
            yield RowBlock.of(work.features(part), listing, part.indices)

    backbone, weights = plan.backbone, plan.backbone.weights
    attrs = {
        "backbone": backbone.spec.name,
        "layer": backbone.spec.layer,
        "input_size": backbone.input_size,
        "feature_shape": list(backbone.feature_shape),
        "preprocessing": backbone.spec.preprocessing,
        "resize": config.resize,
        "weights": weights.name,
        "weights_source": weights.source,
        "weights_checksum": weights.checksum,
        "precision": backbone.precision,
        "storage_dtype": config.storage,
        "batch_size": config.batch_size,
        "data_dir": printable(str(Path(config.data_dir).resolve())),
        "shards": config.shards,
        "shard": config.shard,
        "versions": json.dumps(package_versions()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command_line": printable(config.command_line),
        "extract_seconds": loop_seconds,
        "images_processed_last_run": len(plan.todo),
        "incremental": bool(kept),
        "rows_kept": len(kept.rows) if kept else 0,
        **_rate_measurement(config.output, kept, len(plan.todo), loop_seconds),
        "fingerprint": json.dumps(plan.fingerprint, sort_keys=True),
        **engines.quantization_attrs(plan.fingerprint),  # int8: the model's key, calibration sample, OpenVINO/NNCF versions
    }
    n = write_feature_file(
        config.output,
        row_shape=backbone.feature_shape,
        storage=config.storage,
        class_names=listing.class_names,
        rows=rows(),
        rejected=rejected,
        attrs=attrs,
    )
    return n, len(rejected)


COMMAND = Command("extract", ExtractConfig, run, "bottleneck features (VGG16 or --backbone) of a class-per-folder image tree into HDF5")
