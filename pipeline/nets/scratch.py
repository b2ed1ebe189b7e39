"""The ``scratch`` stage: a small CNN trained from random weights on the same splits and augmentation as ``finetune`` (the baseline)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.core import config as settings
from pipeline.core.config import option
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import command_line
from pipeline.nets.images import load_data
from pipeline.nets.networks import Network, build_scratch_network
from pipeline.nets.options import COUNT, COUNT_OR_ZERO, RATE, NetConfig
from pipeline.nets.results import Result, finish
from pipeline.nets.training import prepare_run, train_phases


@dataclass(frozen=True)
class ScratchConfig(NetConfig):
    """Settings of ``python -m pipeline scratch``: a small CNN trained from random weights.

    The data flags are ``NetConfig``'s and mean what they mean for ``finetune`` (same splits,
    same augmentation). Architecture: ``len(filters)`` blocks of conv3x3 -> batchnorm ->
    relu -> maxpool, then global average pooling, Dense(dense, relu), Dropout, Dense(classes, softmax).

    Attributes:
        input_size: square side the images are resized to (at least ``2 ** len(filters)``).
        filters: filters of each conv block (not a flag).
        dense: units of the hidden dense layer.
        epochs, lr: at most ``epochs`` of Adam at ``lr``, early stopping.
        patience: epochs without a lower validation loss before stopping (best weights restored).
    """

    input_size: int = option(64, "square input side", rule=COUNT)
    filters: tuple[int, ...] = option((32, 64, 128, 256), "filters of each conv block", cli=False)
    dense: int = option(128, "units of the hidden dense layer", rule=COUNT)
    epochs: int = option(30, "maximum training epochs, early stopping", rule=COUNT)
    lr: float = option(1e-3, "Adam learning rate", rule=RATE)
    patience: int = option(5, "epochs without a better validation loss before stopping", rule=COUNT_OR_ZERO)

    def validate(self) -> "ScratchConfig":
        """Check every value; return self.

        Raises:
            PipelineError: ``--flag value: ...`` naming the flag and the rule broken.
        """
        settings.validate(self)
        need = 2 ** len(self.filters)
        if self.input_size < need:
            raise PipelineError(f"--input-size {self.input_size}: {len(self.filters)} pooling blocks need at least {need} pixels")
        if not self.filters or min(self.filters) < 1:
            raise PipelineError(f"filters {self.filters}: need at least one block of at least 1 filter")
        self.check_folders()
        return self

    def strategy(self) -> str:
        return "from scratch CNN"


def build_network(config: ScratchConfig, n_classes: int, precision: str) -> Network:
    """``build_scratch_network`` with the fields of ``config`` (seeded)."""
    return build_scratch_network(
        n_classes, input_size=config.input_size, filters=config.filters, dense=config.dense, dropout=config.dropout, precision=precision, seed=config.seed
    )


def fit(config: ScratchConfig) -> Result:
    """Train the baseline CNN from random weights on the same splits and augmentation as ``finetune``.

    Returns:
        Result: the network, the data and the metrics written to ``OUT_DIR/scratch.metrics.json``.

    Raises:
        PipelineError: bad settings, a bad data or test folder, an unwritable output
            folder, images over the memory budget, or too few images to split.
    """
    listing, test_listing, _pixel_bytes, precision = prepare_run(config)
    net = build_network(config, len(listing.class_names), precision)
    data = load_data(listing, test_listing, input_size=config.input_size, resize=config.resize, val_split=config.val_split, seed=config.seed, quiet=config.quiet)
    t0 = time.perf_counter()
    history, records = train_phases(
        net, data, {"train": (config.epochs, config.lr)}, precision=precision, batch_size=config.batch_size,
        patience=config.patience, augment=config.augment, seed=config.seed, quiet=config.quiet,
    )  # fmt: skip
    train_seconds = data.decode_seconds + time.perf_counter() - t0
    extra = {"mode": "plain", "unfreeze_from": None, "filters": list(config.filters)}
    return Result(net, data, finish("scratch", net, data, config, precision, history, records, extra, train_seconds))


def run(config: ScratchConfig) -> dict:
    """The stage: ``fit`` for callers that need only the metrics.

    Args:
        config: the settings; validated here, before any work.

    Returns:
        The metrics written to ``OUT_DIR/scratch.metrics.json``.

    Raises:
        PipelineError: as ``fit``.
    """
    return fit(config).metrics


def add_parser(subparsers) -> None:
    """Register ``scratch`` and its flags (generated from ScratchConfig's fields) on an argparse sub-parsers object."""
    p = subparsers.add_parser("scratch", help="train a small CNN from scratch on the same splits (baseline); writes scratch.keras/.metrics.json/.curves.png")
    settings.add_options(p, ScratchConfig)


def from_args(args, argv) -> ScratchConfig:
    """The parsed flags as a ScratchConfig, recording the command line."""
    return settings.from_args(ScratchConfig, args, command_line=command_line(argv))
