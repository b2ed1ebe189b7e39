"""What an extract run must do, decided once before any work: nothing (up to date), an update keeping the rows that still hold, or a fresh extraction; with which fingerprint and int8 model, and which rows the work area holds and which are left to extract.

``make_plan`` is the one home of that decision, for a single-process run (one shard or all)
and for a ``--ray`` run (the merged output of every shard); the stage carries the returned
``Plan`` out without asking again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.core.errors import NeedsOverwrite
from pipeline.backbones import int8 as engines
from pipeline.backbones import network as bb
from pipeline.backbones.resolved import ResolvedBackbone, resolve_backbone
from pipeline.extract.config import ExtractConfig
from pipeline.extract.fingerprints import describe_difference, fingerprint, merged_fingerprint, same_settings, shard_listing, shard_path
from pipeline.featurefile.kept import Kept, find_kept
from pipeline.extract.workarea import WorkArea
from pipeline.featurefile.store import stored_output
from pipeline.featurefile.checks import stale_sources
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
        backbone: the network, resolved once: registry entry, feature shape, weights,
            precision (``--ray``: as asked, or for ``auto`` the existing output's; the workers
            resolve it) and for ``int8`` the model to use.
        fingerprint: what the output will record (``--ray``: the merged file's; None when
            it cannot be known before the shards ran).
        kept: for an update, what is kept of the existing output.
        work: the work area, reconciled with this run (None for ``--ray``: each shard has its own).
        done, todo: listing rows the work area already holds, and those left to extract.
        keep_parts: whether a work-area rejection under a limit still counts.
        shards: for ``--ray``, the number of shards (None: one per worker).
    """

    action: str
    listing: Listing
    backbone: ResolvedBackbone
    fingerprint: dict | None
    kept: Kept | None = None
    work: WorkArea | None = None
    done: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    todo: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    keep_parts: Callable[[str], bool] = lambda limit: True
    shards: int | None = None


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
        NeedsOverwrite: the output exists and differs, and ``overwrite`` is not set.
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
    raise NeedsOverwrite(f"{output}: exists and {why}")


def _shard_whole(output: Path, whole: Listing, shards: int, k: int, keep) -> bool:
    """Whether shard ``k`` of a merged ``output`` still holds its files as extracted (an up-to-date shard)."""
    path, listing = shard_path(output, k, shards), shard_listing(whole, shards, k)
    return stored_output(path).fingerprint is not None and find_kept(path, listing, keep).whole(len(listing))


def make_plan(config: ExtractConfig, whole: Listing) -> Plan:
    """Decide what a run of ``config`` over the data folder's listing ``whole`` must do.

    Earlier rejections are kept by the limit behind them: content ones, and those of unchanged
    limits; none with ``--retry-rejected``. The work area's own rejections are this run's (or
    an interrupted one's): kept by their limits only. An int8 run calibrates one model on the
    whole folder (every shard), and an update keeps the existing output's model.

    Raises:
        PipelineError: the weights cannot be found or provisioned (``resolve_weights``); the
            output, or an interrupted run's work area, was made with other settings (or by
            another version of the pipeline) and ``--overwrite`` is not set.
    """
    stored = stored_output(config.output)
    old, output, overwrite = stored.fingerprint, config.output, config.overwrite
    current = limits(config.image_timeout)
    keep_parts = lambda limit: limit_holds(limit, current)  # noqa: E731
    keep = (lambda limit: False) if config.retry_rejected else keep_parts
    retry = sum(not keep(r.limit) for r in stored.rejected)
    settings = {"resize": config.resize, "storage": config.storage}
    # --ray: "auto" precision is resolved on the workers (they may have GPUs the driver lacks): take the file's.
    precision = (old.get("precision") if old and config.precision == "auto" else config.precision) if config.ray else bb.resolve_precision(config.precision)
    backbone = resolve_backbone(config.backbone, config.weights, config.input_size, precision, progress=not config.quiet)
    if config.ray:  # only a merged file can be compared with (and updated by) a sharded run
        listing, unusable = whole, stored.problem or "it was not made by a sharded extraction"
        shards = config.shards if config.shards > 1 else (int(old.get("shards", 1)) if stored.merged else None)
        parts = [shard_listing(whole, shards, k) for k in range(shards)] if stored.merged and shards else None
        fp = merged_fingerprint([fingerprint(p, backbone, shards=shards, shard=k, whole=whole, **settings) for k, p in enumerate(parts)]) if parts else None
        fresh = stored.merged and not stale_sources(output) and not retry
    else:
        listing, unusable, shards = shard_listing(whole, config.shards, config.shard), stored.problem, config.shards
        fp = fingerprint(listing, backbone, shards=shards, shard=config.shard, whole=whole, **settings)
        if precision == engines.INT8:  # one model calibrated on the whole folder, or the one of the output an update keeps rows of
            calibration = engines.sample_calibration(whole, input_size=config.input_size, resize=config.resize, weights_checksum=backbone.weights.checksum, backbone=config.backbone)
            model = old.get("calibration") if old and not overwrite and old.get("precision") == engines.INT8 else None
            if model and model != calibration.key and all(old.get(k) == fp[k] for k in MODEL_SETTINGS):
                calibration = engines.Calibration.known(model)
            backbone = dataclasses.replace(backbone, calibration=calibration)
            fp["calibration"] = calibration.key
        fresh = not retry
    action = decide(output, old, fp, overwrite, current=fresh, unusable=unusable)
    if config.ray and action == UP_TO_DATE and not all(_shard_whole(output, whole, shards, k, keep) for k in range(shards)):
        action = UPDATE  # a shard changed by another tool or damaged: its task repairs it, then the merge
    if config.ray:
        return Plan(action, listing, backbone, fp, work=None, shards=shards)
    # Up to date only if the file still holds every listed file, each row as extracted (by
    # path, version and class, in chunks that decompress): else an update repairs it.
    kept = find_kept(output, listing, keep) if action in (UP_TO_DATE, UPDATE) else None
    if action == UP_TO_DATE and kept.whole(len(listing)):
        return Plan(action, listing, backbone, fp, work=WorkArea(output), shards=shards)
    action = UPDATE if kept is not None else action
    # The work area also records the output an update keeps rows of.
    work = WorkArea(output).resume(dict(fp, kept_from=old["listing_sha256"] if kept else None), fp, overwrite)
    covered = kept.covered if kept else None
    done = work.done_indices(listing, keep_parts, covered)
    todo = np.setdiff1d(np.arange(len(listing), dtype=np.int64), done if kept is None else np.union1d(done, covered))
    return Plan(action, listing, backbone, fp, kept, work, done, todo, keep_parts, shards)

