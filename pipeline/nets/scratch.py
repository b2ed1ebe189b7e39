"""The ``scratch`` stage: a network trained from random weights on the same splits and augmentation as ``finetune``: the small baseline CNN or a CIFAR ResNet (``--arch``)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from pipeline.core import config as settings
from pipeline.core.command import Command
from pipeline.core.config import MAX_INT, Interval, option
from pipeline.core.errors import PipelineError
from pipeline.nets.images import load_data
from pipeline.nets.networks import Network, build_scratch_network
from pipeline.nets.options import COUNT, COUNT_OR_ZERO, RATE, NetConfig
from pipeline.nets.resnet import blocks_per_stage, build_resnet_network, sgd
from pipeline.nets.results import Result, finish
from pipeline.nets.training import locked_output, prepare_run, train_phases
from pipeline.nets.training import refit as train_refit


#: ``--arch``: ``cnn`` or ``resnet``; ``resnetN`` is ``resnet`` with ``--depth N`` (``resnet20``).
ARCH_PATTERN = re.compile(r"cnn|resnet(\d+)?")
DEFAULT_DEPTH = 20
#: The settings that differ by architecture, used where a flag is left at ``none``:
#: the CNN's Adam run with early stopping; the ResNet's native small input and SGD over
#: the step schedule, every epoch run (the schedule needs its whole length; the epoch with
#: the lowest validation loss is kept). The ResNet's epochs and learning rate were chosen
#: on validation rows only (docs/results.md).
ARCH_DEFAULTS = {
    "cnn": {"input_size": 64, "epochs": 30, "lr": 1e-3, "patience": 5},
    "resnet": {"input_size": 32, "epochs": 40, "lr": 0.1, "patience": None},
}


def _by_arch(name: str) -> str:
    """``64 for cnn, 32 for resnet``: a flag's value per architecture, for its help."""
    return ", ".join(f"{'every epoch' if v is None else f'{v:g}'} for {arch}" for arch, v in ((a, d[name]) for a, d in ARCH_DEFAULTS.items()))


@dataclass(frozen=True)
class ScratchConfig(NetConfig):
    """Settings of ``python -m pipeline scratch``: a network trained from random weights.

    The data flags are ``NetConfig``'s and mean what they mean for ``finetune`` (same splits,
    same augmentation). ``--arch cnn``: ``len(filters)`` blocks of conv3x3 -> batchnorm ->
    relu -> maxpool, then global average pooling, Dense(dense, relu), Dropout, Dense(classes,
    softmax), trained with Adam and early stopping. ``--arch resnet``: the CIFAR ResNet of
    ``depth`` layers (``nets/resnet.py``), trained with SGD (momentum 0.9) over a step
    schedule (the learning rate divided by 10 at 50% and 75% of the epochs).

    Fields left at None take their architecture's value (ARCH_DEFAULTS) when the config is
    built, so a config always holds the values it runs with.

    Attributes:
        arch: ``cnn``, ``resnet``, or ``resnetN`` (= ``resnet`` with depth N).
        depth: layers of the ResNet, 6n+2 (None: 20, or N of ``resnetN``; None for cnn).
        input_size: square side the images are resized to (cnn: at least ``2 ** len(filters)``).
        filters: filters of each conv block of the cnn (not a flag).
        dense: units of the cnn's hidden dense layer.
        epochs, lr: at most ``epochs`` of Adam at ``lr`` (cnn) or ``epochs`` of SGD from ``lr`` (resnet).
        patience: epochs without a lower validation loss before stopping (best weights restored).
    """

    arch: str = option("cnn", "cnn (the small baseline CNN) or resnet (the CIFAR ResNet of --depth layers; resnetN = --depth N)")
    depth: int | None = option(None, "layers of the ResNet, 6n+2; none = 20 (N of --arch resnetN)", rule=Interval(int, 8, MAX_INT))
    input_size: int | None = option(None, f"square input side; none = {_by_arch('input_size')}", rule=COUNT)
    filters: tuple[int, ...] = option((32, 64, 128, 256), "filters of each conv block", cli=False)
    dense: int = option(128, "units of the cnn's hidden dense layer", rule=COUNT)
    epochs: int | None = option(None, f"training epochs (cnn: at most, early stopping); none = {_by_arch('epochs')}", rule=COUNT)
    lr: float | None = option(None, f"learning rate (cnn: Adam; resnet: SGD before the steps); none = {_by_arch('lr')}", rule=RATE)
    patience: int | None = option(None, f"epochs without a better validation loss before stopping; none = {_by_arch('patience')}", rule=COUNT_OR_ZERO)

    def __post_init__(self):
        family = self.family()
        if family is None:  # validate() names the bad --arch
            return
        resolved = dict(ARCH_DEFAULTS[family])
        if family == "resnet":
            number = ARCH_PATTERN.fullmatch(self.arch).group(1)
            resolved["depth"] = int(number) if number else DEFAULT_DEPTH
            resolved["patience"] = self.epochs if self.epochs is not None else resolved["epochs"]
        for name, value in resolved.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: the arch's value, once, at construction

    def family(self) -> str | None:
        """``cnn`` or ``resnet`` (None for an unknown ``--arch``)."""
        m = ARCH_PATTERN.fullmatch(self.arch) if isinstance(self.arch, str) else None
        return None if m is None else ("cnn" if self.arch == "cnn" else "resnet")

    def validate(self) -> "ScratchConfig":
        """Check every value; return self.

        Raises:
            PipelineError: ``--flag value: ...`` naming the flag and the rule broken.
        """
        family = self.family()
        if family is None:
            raise PipelineError(f"--arch {self.arch}: must be cnn, resnet or resnetN (N = 6n+2 layers, e.g. resnet20)")
        settings.validate(self)
        if family == "cnn":
            if self.depth is not None:
                raise PipelineError(f"--depth {self.depth}: only for --arch resnet")
            need = 2 ** len(self.filters)
            if self.input_size < need:
                raise PipelineError(f"--input-size {self.input_size}: {len(self.filters)} pooling blocks need at least {need} pixels")
            if not self.filters or min(self.filters) < 1:
                raise PipelineError(f"filters {self.filters}: need at least one block of at least 1 filter")
        else:
            number = ARCH_PATTERN.fullmatch(self.arch).group(1)
            if number and int(number) != self.depth:
                raise PipelineError(f"--depth {self.depth}: --arch {self.arch} means depth {int(number)}; give one of the two")
            blocks_per_stage(self.depth)
            if self.input_size < 4:
                raise PipelineError(f"--input-size {self.input_size}: a CIFAR ResNet halves the image twice and needs at least 4 pixels")
        self.check_folders()
        return self

    def strategy(self) -> str:
        return "from scratch CNN" if self.family() == "cnn" else f"from scratch ResNet-{self.depth}"


def build_network(config: ScratchConfig, n_classes: int, precision: str) -> Network:
    """The network of ``config.arch`` with the fields of ``config`` (seeded)."""
    if config.family() == "resnet":
        return build_resnet_network(n_classes, input_size=config.input_size, depth=config.depth, precision=precision, seed=config.seed)
    return build_scratch_network(
        n_classes, input_size=config.input_size, filters=config.filters, dense=config.dense, dropout=config.dropout, precision=precision, seed=config.seed
    )


def fit(config: ScratchConfig, listed=None) -> Result:
    """Train the network of ``config.arch`` from random weights on the same splits and augmentation as ``finetune``.

    With ``refit`` (the default) the epoch the validation loss chose is kept, and the
    network is trained again from the same start on the training + validation rows for
    that many epochs: that is the model saved and scored (``listed``: as ``prepare_run``'s).

    Returns:
        Result: the network, the data and the metrics written to ``OUT_DIR/scratch.metrics.json``.

    Raises:
        PipelineError: bad settings, a bad data or test folder, an unwritable output
            folder, images over the memory budget, or too few images to split.
    """
    listing, test_listing, _pixel_bytes, precision = prepare_run(config, listed)
    net = build_network(config, len(listing.class_names), precision)
    digest = {"train": listing.content_digest(), "test": None if test_listing is None else test_listing.content_digest()}  # before reading (compare key)
    data = load_data(listing, test_listing, input_size=config.input_size, resize=config.resize, val_split=config.val_split, seed=config.seed, quiet=config.quiet)
    t0 = time.perf_counter()
    plan = {"train": (config.epochs, config.lr)}
    common = dict(precision=precision, batch_size=config.batch_size, patience=config.patience, augment=config.augment, seed=config.seed, quiet=config.quiet,
                  make_optimizer=sgd if config.family() == "resnet" else None)  # fmt: skip
    history, records = train_phases(net, data, plan, **common)
    refit = None
    if config.refit:  # a ResNet runs the first epochs of the same step schedule (its length stays --epochs)
        net, refit = train_refit(lambda: build_network(config, len(listing.class_names), precision), data, records, plan, history, **common)
    train_seconds = data.decode_seconds + time.perf_counter() - t0
    if config.family() == "resnet":
        extra = {"mode": "plain", "unfreeze_from": None, "arch": "resnet", "depth": config.depth, "parameters": int(net.full.count_params()),
                 "optimizer": "SGD momentum 0.9, step schedule: lr / 10 at 50% and 75% of the epochs, weight decay 1e-4"}  # fmt: skip
    else:
        extra = {"mode": "plain", "unfreeze_from": None, "arch": "cnn", "filters": list(config.filters), "parameters": int(net.full.count_params())}
    extra.update(refit=refit, data_digest=digest)
    return Result(net, data, finish("scratch", net, data, config, precision, history, records, extra, train_seconds))


def run(config: ScratchConfig) -> dict:
    """``python -m pipeline scratch``: train ``--arch`` from random weights and publish ``scratch.keras``, ``.curves.png`` and
    ``.metrics.json`` as one set, the previous set of ``-o`` kept whole until then; the metrics (errors as ``fit``'s)."""
    with locked_output(config, "scratch") as listed:
        return fit(config, listed).metrics


COMMAND = Command("scratch", ScratchConfig, run, "train a small CNN or a CIFAR ResNet from scratch on the same splits; writes scratch.keras/.metrics.json/.curves.png")
