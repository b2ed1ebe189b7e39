"""The ``finetune`` stage: VGG16 base + a new dense head trained on an image tree in two phases, with a cached frozen prefix for speed.

Data flow (``fit``)::

    list_images -> reader.iter_batches (parallel decode) -> uint8 arrays in memory
      -> split_indices (test, then validation) -> phase 1 (head) -> phase 2 (unfrozen suffix + head)
      -> full model on the test set -> OUT_DIR/finetune.{keras,metrics.json,curves.png}

The network is described in ``nets.networks``, the cached-prefix and plain modes in
``nets.training``, the outputs in ``nets.results``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from pipeline.core import config as settings
from pipeline.core.config import MAX_INT, Interval, OneOf, option
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import command_line
from pipeline.nets.images import gigabytes, load_data
from pipeline.nets.networks import HEADS, UNFREEZE_SPECIAL, VGG16_LAYERS, Network, build_finetune_network
from pipeline.nets.options import COUNT, COUNT_OR_ZERO, RATE, NetConfig
from pipeline.nets.results import Result, finish
from pipeline.nets.training import build_cache, cache_plan, prepare_run, train_phases


@dataclass(frozen=True)
class FinetuneConfig(NetConfig):
    """Settings of ``python -m pipeline finetune`` (the data flags are ``NetConfig``'s).

    Attributes:
        input_size: square side the images are resized to (at least 32).
        unfreeze_from: first VGG16 layer trained in phase 2, ``none`` (head only) or ``all``.
        head: ``flatten`` or ``gap`` (global average pooling) before the dense layer.
        dense: units of the hidden dense layer.
        head_epochs, head_lr: phase 1 (frozen base, new head), Adam.
        epochs, lr: phase 2 (unfrozen suffix + head), Adam; at most ``epochs``, early stopping.
        patience: epochs without a lower validation loss before stopping (best weights restored).
        weights: ``imagenet``, ``none`` (random init, for tests) or a weights file path.
        cache: cache the frozen prefix's outputs (``cached-prefix`` mode) when it has layers.
        cache_copies: augmented copies of each training image in the cache.
    """

    input_size: int = option(
        224, "square input side", rule=Interval(int, 32, MAX_INT), message=f"VGG16 needs at least 32 pixels (a whole number in [32, {MAX_INT}])"
    )
    unfreeze_from: str = option(
        "block5_conv1",
        "first VGG16 layer trained in phase 2 (any VGG16 layer name), none = frozen base + head only, all = every layer",
        metavar="LAYER",
    )
    head: str = option("flatten", "flatten or global average pooling before the dense layer", rule=OneOf(HEADS))
    dense: int = option(256, "units of the hidden dense layer", rule=COUNT)
    head_epochs: int = option(5, "phase 1 epochs (frozen base, head only; the only phase with --unfreeze-from none)", rule=COUNT_OR_ZERO)
    epochs: int = option(10, "maximum training epochs, early stopping", rule=COUNT_OR_ZERO)
    lr: float = option(1e-5, "Adam learning rate", rule=RATE)
    head_lr: float = option(1e-3, "phase 1 Adam learning rate", rule=RATE)
    patience: int = option(3, "epochs without a better validation loss before stopping", rule=COUNT_OR_ZERO)
    weights: str = option("imagenet", "imagenet, none (random init) or a weights file PATH")
    cache: bool = option(True, "plain Keras loop: full model, augmentation on the fly")
    cache_copies: int = option(
        4,
        "cache the frozen prefix's outputs for K augmented copies of each training image, so epochs run only the trainable layers",
        rule=COUNT,
        message=f"must be at least 1 (a whole number in [1, {MAX_INT}])",
        metavar="K",
    )

    def validate(self) -> "FinetuneConfig":
        """Check every value; return self.

        Raises:
            PipelineError: ``--flag value: ...`` naming the flag and the rule broken.
        """
        settings.validate(self)
        if self.unfreeze_from not in VGG16_LAYERS + UNFREEZE_SPECIAL:
            raise PipelineError(
                f"--unfreeze-from {self.unfreeze_from}: not a VGG16 layer; choose none, all or one of " + ", ".join(VGG16_LAYERS)
            )
        if self.unfreeze_from == "none" and self.head_epochs < 1:
            raise PipelineError("--head-epochs 0 with --unfreeze-from none: nothing would be trained")
        if self.head_epochs + self.epochs < 1:
            raise PipelineError("--head-epochs 0 and --epochs 0: nothing would be trained")
        self.check_folders()
        return self

    def strategy(self) -> str:
        if self.unfreeze_from == "none":
            return "frozen base + dense head"
        if self.unfreeze_from == "all":
            return "finetune (all layers)"
        return f"finetune (from {self.unfreeze_from})"


def build_network(config: FinetuneConfig, n_classes: int, precision: str, weights=None) -> Network:
    """``build_finetune_network`` with the fields of ``config`` (seeded: the same config builds the same start)."""
    return build_finetune_network(
        n_classes,
        input_size=config.input_size,
        unfreeze_from=config.unfreeze_from,
        head=config.head,
        dense=config.dense,
        dropout=config.dropout,
        precision=precision,
        seed=config.seed,
        weights=weights,
    )


def fit(config: FinetuneConfig) -> Result:
    """Fine-tune VGG16 on ``config.data_dir`` and score it on the test set.

    Phase 1 trains the new head on the frozen base (``head_lr``); phase 2 unfreezes the
    layers from ``unfreeze_from`` on and trains them with the head at ``lr`` (skipped for
    ``none``). Both phases stop early on the validation loss and keep the best weights.

    Returns:
        Result: the trained network, the data and the metrics written to
        ``OUT_DIR/finetune.metrics.json`` (keys: METRICS_KEYS and more).

    Raises:
        PipelineError: bad settings, a bad data or test folder (different classes), an
            unwritable output folder, images over the memory budget, unusable weights,
            or too few images to split.
    """
    listing, test_listing, pixel_bytes, precision = prepare_run(config)
    from pipeline.extraction.weights import resolve_weights

    weights = resolve_weights(config.weights, progress=not config.quiet)
    net = build_network(config, len(listing.class_names), precision, weights)
    data = load_data(listing, test_listing, input_size=config.input_size, resize=config.resize, val_split=config.val_split, seed=config.seed, quiet=config.quiet)
    t0 = time.perf_counter()
    copies, dtype, cache_bytes, why_plain = cache_plan(
        net, data, cache=config.cache, cache_copies=config.cache_copies, augment=config.augment, pixel_bytes=pixel_bytes
    )
    cache = None
    cache_seconds = 0.0
    if copies:
        if not config.quiet:
            shape = "x".join(str(d) for d in net.prefix.outputs[0].shape[1:])
            print(f"caching the frozen prefix (up to {VGG16_LAYERS[net.cut - 1]}, {shape} {dtype.name}): "
                  f"{copies} cop{'ies' if copies > 1 else 'y'} of {len(data.train_y)} training + {len(data.val_y)} "
                  f"validation images = {gigabytes(cache_bytes)}", file=sys.stderr)  # fmt: skip
        cache = build_cache(net, data, copies, dtype, augment=config.augment, seed=config.seed, batch_size=config.batch_size, quiet=config.quiet)
        cache_seconds = time.perf_counter() - t0
    elif not config.quiet:
        print(f"plain mode (no prefix cache): {why_plain}", file=sys.stderr)
    history, records = train_phases(
        net, data, {"head": (config.head_epochs, config.head_lr), "finetune": (config.epochs, config.lr)},
        precision=precision, batch_size=config.batch_size, patience=config.patience, augment=config.augment,
        seed=config.seed, quiet=config.quiet, cache=cache,
    )  # fmt: skip
    train_seconds = data.decode_seconds + time.perf_counter() - t0
    del cache
    head = next((r for r in records if r["name"] == "head"), None)
    extra = {
        "mode": "cached-prefix" if copies else "plain",
        "unfreeze_from": config.unfreeze_from,
        "cache_copies": copies,
        "cache_bytes": cache_bytes if copies else 0,
        "cache_seconds": cache_seconds,
        "cache_layer": VGG16_LAYERS[net.cut - 1] if copies else None,
        "plain_reason": why_plain or None,
        "seconds_per_epoch_head": head["seconds_per_epoch"] if head else None,
        "weights": {"name": weights.name, "source": weights.source, "checksum": weights.checksum},
        "head": config.head,
    }
    return Result(net, data, finish("finetune", net, data, config, precision, history, records, extra, train_seconds))


def run(config: FinetuneConfig) -> dict:
    """The stage: ``fit`` for callers that need only the metrics.

    Args:
        config: the settings; validated here, before any work.

    Returns:
        The metrics written to ``OUT_DIR/finetune.metrics.json``.

    Raises:
        PipelineError: as ``fit``.
    """
    return fit(config).metrics


def add_parser(subparsers) -> None:
    """Register ``finetune`` and its flags (generated from FinetuneConfig's fields) on an argparse sub-parsers object."""
    p = subparsers.add_parser("finetune", help="fine-tune VGG16 + a new dense head on an image tree; writes finetune.keras/.metrics.json/.curves.png")
    settings.add_options(p, FinetuneConfig)


def from_args(args, argv) -> FinetuneConfig:
    """The parsed flags as a FinetuneConfig, recording the command line."""
    return settings.from_args(FinetuneConfig, args, command_line=command_line(argv))
