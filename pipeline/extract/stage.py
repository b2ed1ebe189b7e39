"""Extract stage: images -> a backbone's bottleneck features (``--backbone``, VGG16 by default) -> one HDF5 file, resumable after a kill and safe against bad files; with ``--ray``, one Ray task per shard, then merged.

``run`` decides, for both paths, what an existing output needs: nothing (up to date), an
incremental update (same settings, other images: unchanged rows are kept) or, with
``--overwrite``, a fresh extraction. A ``--ray`` run gives each shard task this same
``run`` on its own shard file (``pipeline.extract.distributed`` only runs the tasks)
and merges the shards into the output (``pipeline.extract.shardset``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.core import config as settings
from pipeline.core.config import EXTRACT_PRECISIONS, MAX_INT, RESIZE_METHODS, STORAGE_DTYPES, Interval, OneOf, option
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import OutputLock, command_line, package_versions
from pipeline.core.signals import sigterm_as_interrupt
from pipeline.backbones import network as bb
from pipeline.extract import distributed
from pipeline.backbones import int8 as engines
from pipeline.extract import preflight
from pipeline.extract.incremental import Base, base_rows, plan_incremental, rejects_to_retry
from pipeline.images.reader import Listing, Reject, limit_holds, limits, list_images
from pipeline.extract.loop import extract_rows
from pipeline.extract.fingerprints import describe_difference, fingerprint, merged_fingerprint, same_settings, shard_listing, shard_path
from pipeline.extract.shardset import merge_locked, stale_sources
from pipeline.featurefile.store import check_output_writable, stored_fingerprint, write_feature_file
from pipeline.backbones.weights import resolve_weights
from pipeline.extract.workarea import WorkArea

#: Default of ``--ray-retries``: retries of a shard whose worker died or failed unexpectedly.
RAY_RETRIES = 3
_COUNT = Interval(int, 1, MAX_INT)


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of ``python -m pipeline extract``.

    Attributes:
        data_dir: class-per-folder image tree.
        output: the HDF5 feature file to write.
        backbone: the network (``backbone.BACKBONES``): its preprocessing, feature layer and
            default input size are its own, and recorded in the file.
        input_size: square side the images are resized to; None = the backbone's default
            (224, 299 for inception_v3), filled in when the config is made.
        batch_size: images per network call.
        weights: ``imagenet``, ``none`` (explicit random init) or a weights file path (for the backbone).
        precision: compute precision (``auto``, ``float32``, ``bfloat16``, ``float16``, or ``int8``:
            OpenVINO, calibrated on a seeded sample of the images; see ``engines``).
        storage: dtype of the stored features.
        resize: Pillow/``load_img`` interpolation used for resizing.
        workers: decoding threads (0 = one per core).
        image_timeout: seconds one image may take to decode before it is rejected.
        retry_rejected: decode every file an earlier run rejected again (rejections caused by a
            limit are retried anyway when the limit changes; content rejections are kept
            while the file is unchanged).
        strict: exit non-zero if any file was rejected.
        overwrite: replace an output (or partial run) made from other images or settings.
        quiet: no progress bar (for batch logs); the summary line is still printed.
        shards, shard: extract only shard ``shard`` of ``shards`` (files assigned by a hash
            of their path); with ``ray``, ``shards`` > 1 sets the number of shard tasks.
        ray: run every shard as a Ray task, retry failed ones, merge them into ``output``.
        address: with ``ray``, the cluster to join (default ``$RAY_ADDRESS``, else a local one).
        ray_workers: with ``ray``, shard tasks at once (default one per GPU, else one per node).
        ray_retries: with ``ray``, retries of a shard whose worker died or failed.
        command_line: recorded in the output file.
    """

    data_dir: Path = option(help="folder with one sub-folder per class", positional=True)
    output: Path = option(help="HDF5 file to write (e.g. features/train.h5)", short="-o")
    backbone: str = option(bb.BACKBONE, "network: " + ", ".join(bb.BACKBONES) + " (only vgg16 has the offline weights route)", rule=OneOf(tuple(bb.BACKBONES)))
    input_size: int | None = option(
        None, "square input side; none = the backbone's default (224, inception_v3 299; vgg16 at 224 gives 7x7x512 features)",
        rule=Interval(int, 32, MAX_INT), message=f"every backbone needs at least 32 pixels (a whole number in [32, {MAX_INT}])",
    )  # fmt: skip
    batch_size: int = option(32, "images per network call", rule=_COUNT)
    weights: str = option("imagenet", "imagenet, none (random init, explicit) or a weights file PATH")
    precision: str = option(
        "auto", "compute precision; auto = fastest TensorFlow one that keeps accuracy; int8 = OpenVINO, calibrated on a sample of the images",
        rule=OneOf(EXTRACT_PRECISIONS),
    )  # fmt: skip
    storage: str = option("float16", "stored feature dtype", rule=OneOf(STORAGE_DTYPES))
    resize: str = option("bilinear", "resize interpolation, as in keras.utils.load_img", rule=OneOf(RESIZE_METHODS))
    workers: int = option(0, "decoding threads; 0 = automatic", rule=Interval(int, 0, MAX_INT))
    image_timeout: float = option(
        60.0, "seconds one image may take to decode before it is rejected", rule=Interval(float, 0.0, None, closed="neither")
    )
    retry_rejected: bool = option(False, "decode the files an earlier run rejected again (a limit's rejections are retried anyway when it changes)")
    strict: bool = option(False, "exit 1 if any file is rejected")
    overwrite: bool = option(False, "replace an output made from other images or settings")
    quiet: bool = option(False, "no progress bar (batch logs); the summary line is still printed")
    shards: int = option(1, "split the images into this many deterministic shards, by a hash of each path (with --ray, 1 = one per worker)", rule=_COUNT)
    shard: int = option(0, "which shard to extract, 0-based", rule=Interval(int, 0, MAX_INT))
    ray: bool = option(False, "run the shards as Ray tasks (a GPU each, else CPU workers), retry failed ones, merge into OUTPUT")
    address: str | None = option(None, "with --ray: cluster to join (auto, HOST:6379, ray://HOST:10001); none = $RAY_ADDRESS, else a local cluster")
    ray_workers: int | None = option(
        None, "with --ray: shard tasks at once; none = one per GPU, else one per node",
        rule=_COUNT, message=f"must be at least 1 (a whole number in [1, {MAX_INT}])",
    )  # fmt: skip
    ray_retries: int = option(RAY_RETRIES, "with --ray: retries of a shard whose worker died or failed", rule=Interval(int, 0, MAX_INT))
    command_line: str = option("", cli=False)

    def __post_init__(self):
        # --input-size none: the backbone's default side, resolved once, where the config is made.
        if self.input_size is None and self.backbone in bb.BACKBONES:
            object.__setattr__(self, "input_size", bb.BACKBONES[self.backbone].input_size)

    def validate(self) -> "ExtractConfig":
        """Check every value (each field's rule, then the rules across fields); return self.

        Raises:
            PipelineError: naming the flag, its value and what is allowed.
        """
        settings.validate(self)
        least = bb.BACKBONES[self.backbone].min_size
        if self.input_size < least:
            raise PipelineError(f"--input-size {self.input_size}: {self.backbone} needs at least {least} pixels")
        if self.shard >= self.shards:
            raise PipelineError(f"--shard {self.shard} of --shards {self.shards}: need 0 <= shard < shards")
        if Path(self.output).suffix.lower() not in (".h5", ".hdf5"):
            raise PipelineError(f"{self.output}: the output must be an HDF5 file ending in .h5 or .hdf5")
        if self.ray and self.shard != 0:
            raise PipelineError(f"--shard {self.shard}: --ray runs every shard; leave --shard out")
        if not self.ray and (self.address is not None or self.ray_workers is not None or self.ray_retries != RAY_RETRIES):
            raise PipelineError("--address, --ray-workers and --ray-retries only apply with --ray")
        if self.precision == engines.INT8:
            if self.ray:
                raise PipelineError("--precision int8 with --ray: not supported yet; run the shards with --shards N --shard K (one calibration for all) and merge them")
            engines.require_int8()  # a missing extra fails here, before any work
        return self


def add_parser(sub) -> None:
    """The ``extract`` command and its flags, read from ``ExtractConfig``."""
    p = sub.add_parser("extract", help="bottleneck features (VGG16 or --backbone) of a class-per-folder image tree into HDF5")
    settings.add_options(p, ExtractConfig)


def from_args(args, argv) -> ExtractConfig:
    """The parsed flags as an ``ExtractConfig``, recording the command line."""
    return settings.from_args(ExtractConfig, args, command_line=command_line(argv))


#: What a run does with an existing output (``decide``).
UP_TO_DATE, UPDATE, REPLACE = "up to date", "update", "replace"


def decide(output: Path, old: dict | None, fp: dict | None, overwrite: bool, *, current: bool = True, unusable: str) -> str:
    """What a run does with an existing ``output``; the one decision of both paths.

    Args:
        output: the output file.
        old: its fingerprint (None: no complete feature file there).
        fp: the fingerprint this run would give it (None: not known before the run, as for
            ``--ray`` with neither ``--shards`` nor a merged output to take the count from).
        overwrite: ``--overwrite``.
        current: whether the file still reads what ``old`` describes (for ``--ray``: a merged
            file whose shard files are the ones merged).
        unusable: why an existing file that cannot be compared has to be replaced.

    Returns:
        UP_TO_DATE (nothing to do), UPDATE (same settings, other images: keep the rows that
        still hold) or REPLACE (no output yet, or ``--overwrite``).

    Raises:
        PipelineError: the output exists and differs, and ``overwrite`` is not set.
    """
    if not output.exists():
        return REPLACE
    if old is not None and fp is not None:
        if old == fp and current:
            return UP_TO_DATE
        if same_settings(old, fp) and not overwrite:
            return UPDATE
        why = f"differs: {describe_difference(old, fp)}"
    else:
        why = unusable
    if overwrite:
        return REPLACE
    raise PipelineError(f"{output}: exists and {why}; pass --overwrite to replace it")


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
    preflight.check_not_a_link(config.output)
    preflight.check_names_fit(shard_path(config.output, 0, 2) if ray is not None else config.output)
    preflight.check_outside_folder(config.output, config.data_dir)
    listing = list_images(config.data_dir)  # a bad data folder fails here, before any work
    preflight.check_not_an_input(config.output, listing, config.weights)
    check_output_writable(config.output)
    with OutputLock(config.output):
        weights = resolve_weights(config.weights, backbone=config.backbone, progress=not config.quiet)
        if ray is not None:
            return _run_ray(config, listing, weights, ray)
        return _run_local(config, shard_listing(listing, config.shards, config.shard), weights, listing)


def _say(config: ExtractConfig, msg: str) -> None:
    if not config.quiet:
        print(msg, file=sys.stderr)


def _fingerprint(config: ExtractConfig, listing: Listing, weights, precision: str, whole: Listing, calibration=None) -> dict:
    return fingerprint(
        listing, weights, precision,
        input_size=config.input_size, resize=config.resize, storage=config.storage, shards=config.shards, shard=config.shard, whole=whole,
        calibration=calibration.key if calibration else None,
    )  # fmt: skip


def keep_rejected(config: ExtractConfig, retry: bool | None = None):
    """Which earlier rejections a run keeps, by the limit behind them: content ones, and those of
    unchanged limits; none when ``retry`` (default ``--retry-rejected``). The work area's own
    rejections are this run's (or an interrupted one's): kept by their limits only."""
    if config.retry_rejected if retry is None else retry:
        return lambda limit: False
    current = limits(config.image_timeout)
    return lambda limit: limit_holds(limit, current)


def _run_local(config: ExtractConfig, listing: Listing, weights, whole: Listing) -> int:
    """Extract ``listing`` (one shard's of ``whole``, or all) into ``config.output`` in this process."""
    output = config.output
    precision = bb.resolve_precision(config.precision)
    old, _ = stored_fingerprint(output)
    # int8: one model for the whole folder (every shard), kept by an existing output's updates.
    calibration = (
        engines.plan_calibration(whole, None if config.overwrite else old, input_size=config.input_size, resize=config.resize, weights=weights)
        if precision == engines.INT8 else None
    )  # fmt: skip
    fp = _fingerprint(config, listing, weights, precision, whole, calibration)
    keep = keep_rejected(config)
    retry = rejects_to_retry(output, keep) if old is not None else 0
    action = decide(output, old, fp, config.overwrite, current=not retry, unusable="differs: it is not a complete feature file")
    work = WorkArea(output)
    if action == UP_TO_DATE:
        work.remove()  # left over if a run was killed between rename and clean-up
        print(f"{output}: up to date ({len(listing)} images, nothing changed)")
        return 0
    base = plan_incremental(output, old, listing, keep) if action == UPDATE else None
    manifest_fp = dict(fp, base=base.fingerprint["listing_sha256"] if base else None)
    if work.exists():
        manifest = work.manifest()
        if manifest != manifest_fp:
            if manifest is not None and same_settings(manifest, fp):
                # Other images (or another previous output) only: the finished parts of files that
                # are unchanged still hold, as an incremental update's kept rows do.
                work.set_manifest(manifest_fp)
            elif config.overwrite or manifest is None:
                work.remove()
            else:
                raise PipelineError(
                    f"{work.path}: an interrupted run with other settings ({describe_difference(manifest, fp)}); "
                    "re-run with its settings to resume, or pass --overwrite to start again"
                )
    if not work.exists():
        work.start(manifest_fp)
    exclude = base.covered if base else None
    keep_parts = keep_rejected(config, retry=False)
    done = work.done_indices(listing, keep_parts, exclude)
    covered = np.union1d(done, base.covered) if base else done
    todo = np.setdiff1d(np.arange(len(listing), dtype=np.int64), covered)
    if base:
        _say(
            config,
            f"updating {output}: keeping {len(base.keep_rows)} rows, dropping {base.old_rows - len(base.keep_rows)}, "
            f"{len(todo)} new or changed files to extract"
        )
    elif len(done):
        _say(config, f"resuming {output}: {len(done)} of {len(listing)} files already done")
    t0 = time.perf_counter()
    loop_seconds = 0.0
    try:
        with sigterm_as_interrupt():
            if len(todo):
                loop_seconds = extract_rows(
                    listing, todo, work, weights, precision,
                    input_size=config.input_size, batch_size=config.batch_size, storage=config.storage, resize=config.resize,
                    workers=config.workers, image_timeout=config.image_timeout, progress=not config.quiet, done=len(covered),
                    calibration=calibration,
                )  # fmt: skip
            # Still in the block: an interrupt while assembling leaves the work area
            # whole (the temporary file is removed) and says so, like one during extraction.
            n, n_rej = _assemble(config, listing, work, fp, weights, precision, base, loop_seconds, len(todo), keep_parts)
            work.remove()
    except KeyboardInterrupt as exc:
        finished = len(work.done_indices(listing, keep_parts, exclude))
        print(
            f"interrupted ({exc or 'SIGINT'}) with {finished} files of this run done; "
            f"run the same command again to resume from {work.path}",
            file=sys.stderr,
        )
        return 130
    seconds = time.perf_counter() - t0
    rate = len(todo) / loop_seconds if loop_seconds > 0 else 0.0
    return summarize(output, n, n_rej, f"{len(todo)} processed this run in {seconds:.1f} s ({rate:.1f} img/s)", config.strict)


def _shard_configs(config: ExtractConfig, shards: int, workers: int | None = None) -> list[ExtractConfig]:
    """The config of each of ``shards`` shards of a ``--ray`` run: a quiet single-process extract of one shard file."""
    return [
        dataclasses.replace(
            config, output=shard_path(config.output, k, shards), shards=shards, shard=k, ray=False, address=None,
            ray_workers=None, ray_retries=RAY_RETRIES, quiet=True, strict=False, workers=config.workers if workers is None else workers,
        )  # fmt: skip
        for k in range(shards)
    ]


def _run_ray(config: ExtractConfig, listing: Listing, weights, ray) -> int:
    """Extract every shard as a Ray task running ``run`` on its shard file, then merge them into ``config.output``."""
    output = config.output
    old, merged = stored_fingerprint(output)
    shards = config.shards if config.shards > 1 else (int(old.get("shards", 1)) if merged else None)
    fp = None
    if merged and shards:  # only a merged file can be compared with (and updated by) a sharded run
        # "auto" precision is resolved on the workers (they may have GPUs the driver lacks): take the file's.
        precision = old.get("precision") if config.precision == "auto" else config.precision
        fp = merged_fingerprint([_fingerprint(c, shard_listing(listing, shards, c.shard), weights, precision, listing) for c in _shard_configs(config, shards)])
    unusable = "it is not a complete feature file" if old is None else "it was not made by a sharded extraction"
    current = merged and not stale_sources(output) and not rejects_to_retry(output, keep_rejected(config))
    action = decide(output, old, fp, config.overwrite, current=current, unusable=unusable)
    if action == UP_TO_DATE:
        print(f"{output}: up to date ({len(listing)} images in {shards} shards, nothing changed)")
        return 0
    try:
        with distributed.cluster(ray, config.address):
            nodes = distributed.alive_nodes(ray)
            p = distributed.plan(nodes, config.ray_workers, shards)
            _say(config, f"ray: {len(nodes)} node(s), {p.shards} shards, {p.workers} at once, {'1 GPU + ' if p.num_gpus else ''}{p.num_cpus} CPU(s) per task")
            configs = _shard_configs(config, p.shards, workers=config.workers or p.num_cpus)
            sizes = [len(shard_listing(listing, p.shards, k)) for k in range(p.shards)]
            results = distributed.run_shards(
                ray, run, configs, p, retries=config.ray_retries, sizes=sizes, batch_size=config.batch_size, progress=not config.quiet
            )
    except KeyboardInterrupt:
        print(f"interrupted; finished shards are kept and running ones resume: run the same command again to finish {output}", file=sys.stderr)
        return 130
    t0 = time.perf_counter()
    ran = {r["shard"] for r in results if r["rewritten"]}  # the others were up to date
    try:
        with sigterm_as_interrupt():
            n, n_rej = merge_locked(output, [c.output for c in configs], overwrite=True, command_line=config.command_line, ran=ran)
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


def summarize(output: Path, n: int, n_rejected: int, detail: str, strict: bool) -> int:
    """Print the one-line end-of-run summary; return the exit status (1 for rejects under --strict)."""
    print(
        f"extracted {n} images, rejected {n_rejected}"
        + (f" (listed in rejected/ of {output})" if n_rejected else "")
        + f"; {detail} -> {output}"
    )
    if strict and n_rejected:
        print(f"error: --strict: {n_rejected} files were rejected (see rejected/ in {output})", file=sys.stderr)
        return 1
    return 0


def _text(value: str) -> str:
    """A string HDF5 can store (UTF-8): bytes of a name that is not valid UTF-8 appear as escapes."""
    return os.fsencode(value).decode("utf-8", "backslashreplace")


def _assemble(config, listing: Listing, work: WorkArea, fp: dict, weights, precision: str, base: Base | None, loop_seconds: float, processed: int, keep):
    """Write the output from the kept rows of ``base`` and the work area's parts; returns (rows, rejected)."""
    parts = work.index(listing, keep, exclude=base.covered if base else None)
    rejected: list[Reject] = list(base.kept_rejected) if base else []
    covered = len(base.covered) if base else 0
    for part in parts:
        covered += len(part.indices) + len(part.rejected_indices)
        versions = listing.versions(part.rejected_indices).tolist()
        rejected.extend(
            Reject(listing.paths[i], r, *v, lim) for i, r, v, lim in zip(part.rejected_indices.tolist(), part.reasons, versions, part.limits)
        )
    if covered != len(listing):
        raise PipelineError(f"{work.path}: work area covers {covered} of {len(listing)} files; re-run to finish")
    rejected.extend(listing.unlisted_rejects())

    def rows():
        if base:
            yield from base_rows(base, listing)
        for part in parts:  # one part in memory at a time
            idx = part.indices
            yield (
                work.features(part),
                listing.labels[idx],
                [listing.paths[i] for i in idx.tolist()],
                listing.sizes[idx],
                listing.mtimes_ns[idx],
                listing.inodes[idx],
                listing.ctimes_ns[idx],
            )

    net = bb.get_spec(config.backbone)
    attrs = {
        "backbone": net.name,
        "layer": net.layer,
        "input_size": config.input_size,
        "feature_shape": list(net.feature_shape(config.input_size)),
        "preprocessing": net.preprocessing,
        "resize": config.resize,
        "weights": weights.name,
        "weights_source": weights.source,
        "weights_checksum": weights.checksum,
        "precision": precision,
        "storage_dtype": config.storage,
        "batch_size": config.batch_size,
        "data_dir": _text(str(Path(config.data_dir).resolve())),
        "shards": config.shards,
        "shard": config.shard,
        "versions": json.dumps(package_versions()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command_line": _text(config.command_line),
        "extract_seconds": loop_seconds,
        "images_processed_last_run": processed,
        "incremental": bool(base),
        "rows_kept": len(base.keep_rows) if base else 0,
        "fingerprint": json.dumps(fp, sort_keys=True),
        **engines.quantization_attrs(fp),  # int8: the model's key, calibration sample, OpenVINO/NNCF versions
    }
    n = write_feature_file(
        config.output,
        row_shape=net.feature_shape(config.input_size),
        storage=config.storage,
        class_names=listing.class_names,
        rows=rows(),
        rejected=rejected,
        attrs=attrs,
    )
    return n, len(rejected)
