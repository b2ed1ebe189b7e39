"""What an extract run must do, decided once before any work: nothing (up to date), an update keeping the rows that still hold, or a fresh extraction; with which fingerprint and int8 model, and which rows the work area holds and which are left to extract.

``make_plan`` is the one home of that decision, for a single-process run (one shard or all)
and for a ``--ray`` run (the merged output of every shard); the stage carries the returned
``Plan`` out without asking again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.backbones import int8 as engines
from pipeline.backbones import network as bb
from pipeline.extract.config import ExtractConfig
from pipeline.extract.fingerprints import describe_difference, fingerprint, merged_fingerprint, same_settings, shard_listing
from pipeline.extract.incremental import Kept, find_kept
from pipeline.extract.workarea import WorkArea
from pipeline.featurefile.store import Stored, stored_output
from pipeline.featurefile.verify import stale_sources
from pipeline.images.decode import limit_holds, limits
from pipeline.images.listing import Listing

#: What a run does with an existing output.
UP_TO_DATE, UPDATE, REPLACE = "up to date", "update", "replace"
#: Fingerprint settings an int8 output's model depends on: when an existing output agrees
#: on them, an update keeps its model (and so computes features like its kept rows).
MODEL_SETTINGS = ("backbone", "layer", "preprocessing", "input_size", "resize", "weights_checksum")


@dataclass(frozen=True)
class Plan:
    """What one run must do.

    Attributes:
        action: ``UP_TO_DATE``, ``UPDATE`` (same settings, other images: the rows that still
            hold are kept) or ``REPLACE`` (no output yet, or ``--overwrite``).
        listing: the files of this output (one shard's, when sharded; all, for ``--ray``).
        precision: the compute precision, resolved (``--ray``: as the workers will resolve it).
        fingerprint: what the output will record (``--ray``: the merged file's; None when
            it cannot be known before the shards ran).
        calibration: for ``int8``, the model to use.
        kept: for an update, what is kept of the existing output.
        work: the work area, reconciled with this run (None for ``--ray``: each shard has its own).
        done, todo: listing rows the work area already holds, and those left to extract.
        keep_parts: whether a work-area rejection under a limit still counts.
        shards: for ``--ray``, the number of shards (None: one per worker).
    """

    action: str
    listing: Listing
    precision: str | None
    fingerprint: dict | None
    calibration: engines.Calibration | None = None
    kept: Kept | None = None
    work: WorkArea | None = None
    done: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    todo: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    keep_parts: Callable[[str], bool] = lambda limit: True
    shards: int | None = None


def keep_rejected(config: ExtractConfig, retry: bool | None = None) -> Callable[[str], bool]:
    """Which earlier rejections a run keeps, by the limit behind them: content ones, and those of
    unchanged limits; none when ``retry`` (default ``--retry-rejected``). The work area's own
    rejections are this run's (or an interrupted one's): kept by their limits only."""
    if config.retry_rejected if retry is None else retry:
        return lambda limit: False
    current = limits(config.image_timeout)
    return lambda limit: limit_holds(limit, current)


def decide(output: Path, old: dict | None, fp: dict | None, overwrite: bool, *, current: bool = True, unusable: str) -> str:
    """What a run does with an existing ``output``.

    Args:
        output: the output file.
        old: its fingerprint (None: no complete feature file of this version there).
        fp: the fingerprint this run would give it (None: not known before the run, as for
            ``--ray`` with neither ``--shards`` nor a merged output to take the count from).
        overwrite: ``--overwrite``.
        current: whether the file still reads what ``old`` describes (for ``--ray``: a merged
            file whose shard files are the ones merged) and no rejection is to be retried.
        unusable: why an existing file that cannot be compared has to be replaced.

    Returns:
        UP_TO_DATE, UPDATE or REPLACE.

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


def make_plan(config: ExtractConfig, whole: Listing, weights) -> Plan:
    """Decide what a run of ``config`` over the data folder's listing ``whole`` must do.

    Raises:
        PipelineError: the output, or an interrupted run's work area, was made with other
            settings (or by another version of the pipeline) and ``--overwrite`` is not set.
    """
    stored = stored_output(config.output)
    keep = keep_rejected(config)
    retry = sum(not keep(r.limit) for r in stored.rejected)
    if config.ray:
        return _ray_plan(config, whole, weights, stored, retry)
    listing = shard_listing(whole, config.shards, config.shard)
    precision = bb.resolve_precision(config.precision)
    fp = _fingerprint(config, listing, whole, weights, precision, config.shards, config.shard)
    # int8: one model for the whole folder (every shard), kept by an existing output's updates.
    calibration = engines.sample_calibration(
        whole, input_size=config.input_size, resize=config.resize, weights_checksum=weights.checksum, backbone=weights.backbone
    ) if precision == engines.INT8 else None  # fmt: skip
    old = stored.fingerprint
    model = old.get("calibration") if old and not config.overwrite and old.get("precision") == engines.INT8 else None
    if calibration and model and model != calibration.key and all(old.get(k) == fp[k] for k in MODEL_SETTINGS):
        calibration = engines.Calibration.known(model)
    if calibration:
        fp["calibration"] = calibration.key
    action = decide(config.output, old, fp, config.overwrite, current=not retry, unusable=stored.problem)
    work = WorkArea(config.output)
    if action == UP_TO_DATE:
        return Plan(action, listing, precision, fp, calibration, work=work)
    kept = find_kept(config.output, listing, keep) if action == UPDATE else None
    # The manifest also names the output an update keeps rows of; its parts hold for the same settings.
    manifest = dict(fp, kept_from=old["listing_sha256"] if kept else None)
    if work.exists() and work.manifest() != manifest:
        found = work.manifest()
        if found is not None and same_settings(found, fp):
            # Other images (or another previous output) only: the finished parts of files that
            # are unchanged still hold, as an update's kept rows do.
            work.set_manifest(manifest)
        elif config.overwrite or found is None:
            work.remove()
        else:
            raise PipelineError(
                f"{work.path}: an interrupted run with other settings ({describe_difference(found, fp)}); "
                "re-run with its settings to resume, or pass --overwrite to start again"
            )
    if not work.exists():
        work.start(manifest)
    keep_parts = keep_rejected(config, retry=False)
    covered = kept.covered if kept else None
    done = work.done_indices(listing, keep_parts, covered)
    todo = np.setdiff1d(np.arange(len(listing), dtype=np.int64), done if kept is None else np.union1d(done, covered))
    return Plan(action, listing, precision, fp, calibration, kept, work, done, todo, keep_parts)


def _fingerprint(config: ExtractConfig, listing: Listing, whole: Listing, weights, precision: str, shards: int, shard: int) -> dict:
    return fingerprint(
        listing, weights, precision,
        input_size=config.input_size, resize=config.resize, storage=config.storage, shards=shards, shard=shard, whole=whole,
    )  # fmt: skip


def _ray_plan(config: ExtractConfig, whole: Listing, weights, stored: Stored, retry: int) -> Plan:
    """The plan of a ``--ray`` run: only a merged file can be compared with (and updated by) a sharded run."""
    old = stored.fingerprint
    shards = config.shards if config.shards > 1 else (int(old.get("shards", 1)) if stored.merged else None)
    # "auto" precision is resolved on the workers (they may have GPUs the driver lacks): take the file's.
    precision = old.get("precision") if old and config.precision == "auto" else config.precision
    fp = merged_fingerprint([_fingerprint(config, shard_listing(whole, shards, k), whole, weights, precision, shards, k) for k in range(shards)]) if stored.merged and shards else None
    current = stored.merged and not stale_sources(config.output) and not retry
    action = decide(config.output, old, fp, config.overwrite, current=current, unusable=stored.problem or "it was not made by a sharded extraction")
    return Plan(action, whole, precision, fp, shards=shards)
