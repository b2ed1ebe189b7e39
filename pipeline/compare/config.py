"""Compare's settings and names, each written once: the strategies, the table's row names, the flags (``CompareConfig``) and the one parser of compare's comma-list flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.backbones.registry import BACKBONE, BACKBONES
from pipeline.core.config import MAX_INT, Interval, ListOf, OneOf, option, validate
from pipeline.core.errors import PipelineError

#: Every strategy compare knows, in table order. ``scratch``: the small CNN from random weights;
#: ``scratch-resnet``: the CIFAR ResNet (``--resnet-depth``, ResNet-20) from random weights at
#: its native small input; ``head``: frozen base + dense head;
#: ``finetune-dense``: the classic fine-tuning (dense head from random first); ``probe``: the
#: logistic-regression probe LP-FT starts from, alone; ``finetune``: LP-FT, one row per
#: ``--unfreeze`` point; ``finetune-plain``: LP-FT from the first point with the plain Keras loop.
STRATEGIES = ("scratch", "scratch-resnet", "lr", "svm", "rf", "head", "finetune-dense", "probe", "finetune", "finetune-plain")
DEFAULT_STRATEGIES = ("scratch", "scratch-resnet", "lr", "svm", "rf", "head", "finetune-dense", "probe", "finetune")
DEFAULT_UNFREEZE = ("block5_conv1",)
#: The table's files, published as one set (``core.outputsets``), in the order they are moved into place.
TABLE_FILES = ("compare.png", "compare.csv", "compare.md", "compare.json")
#: ``--sizes``'s set (``compare/sizes.py``).
SIZES_FILES = ("sizes.png", "sizes.csv", "sizes.md", "sizes.json")
#: The frozen-feature rows (``train``'s models on extracted features) and the rows trained on images by a nets stage.
CLASSICAL = ("lr", "svm", "rf")
NETS = ("scratch", "scratch-resnet", "head", "finetune-dense", "finetune", "finetune-plain")
#: The table's row names of the frozen-feature rows and of the probe (the nets rows are named by their stage).
CLASSICAL_NAMES = {"lr": "frozen features + logistic regression", "svm": "frozen features + linear SVM", "rf": "frozen features + random forest"}
PROBE_NAME = "logistic-regression probe (LP-FT's start)"
#: Config fields that do not change a result: a metrics file recorded with other values still counts.
IGNORED_FIELDS = ("command_line", "quiet", "prefix_cache", "allow_overlap")


def backbone_row_name(backbone: str) -> str:
    """The row of ``--backbones``: frozen features of ``backbone`` + logistic regression (VGG16's is the ``lr`` row)."""
    return CLASSICAL_NAMES["lr"] if backbone == BACKBONE else f"frozen {backbone} features + logistic regression"


#: The fewest training images per class a size may have: the frozen-feature rows' 3-fold search needs 3 of each class.
MIN_SIZE = 3
#: The strategies ``--sizes`` can draw (every one that trains on images or on feature rows).
SIZE_STRATEGIES = ("scratch", "scratch-resnet", "lr", "svm", "rf", "head", "finetune-dense", "finetune", "finetune-plain")


def check_sizes(sizes: tuple[int, ...], strategies: tuple[str, ...], backbones: tuple[str, ...] = ()) -> None:
    """Refuse sizes below ``MIN_SIZE``, repeated sizes, strategies ``--sizes`` cannot draw and ``--backbones`` (before any work)."""
    if backbones:
        raise PipelineError("--backbones with --sizes: the backbone rows are drawn in the one table only; run them without --sizes")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < MIN_SIZE for n in sizes):
        raise PipelineError(f"--sizes {','.join(map(str, sizes))}: every size must be a whole number of training images per class, at least {MIN_SIZE} "
                            "(the frozen-feature rows' 3-fold search needs 3 of each class)")
    if len(set(sizes)) != len(sizes):
        raise PipelineError(f"--sizes {','.join(map(str, sizes))}: a size is repeated")
    unfit = [s for s in strategies if s not in SIZE_STRATEGIES]
    if unfit:
        raise PipelineError(f"--sizes: strategy {unfit[0]!r} cannot be drawn against the data size; choose from {', '.join(SIZE_STRATEGIES)}")


@dataclass(frozen=True)
class CompareConfig:
    """Settings of ``python -m pipeline compare``.

    Attributes:
        data_root: folder with ``train/`` and ``test/`` class trees (every row is scored on ``test/``).
        output: where features, models, ``compare.md``, ``compare.csv`` and ``compare.png`` go.
        strategies: which rows to produce.
        unfreeze: the LP-FT rows' ``--unfreeze-from`` points (one row each); for a
            ``backbone`` other than VGG16 the default is that backbone's last block.
        backbone: the network of the fine-tuning rows and of the probe.
        backbones: one frozen-features + logistic-regression row per backbone (features
            extracted once per backbone, scored on the same test images).
        input_size: input side for extraction and fine-tuning (every backbone).
        scratch_input_size: input side of the from-scratch CNN.
        resnet_depth, resnet_input_size: the from-scratch ResNet's depth (6n+2) and input side
            (None: the scratch stage's default for a ResNet).
        epochs, head_epochs, scratch_epochs, resnet_epochs: the most epochs of each network
            (validation chooses how many; None: the scratch stage's default for a ResNet).
        refit: the network rows' final models are trained on the training + validation rows
            for the epochs validation chose (``--no-refit``: on the training rows only).
        repeats: every network row is trained this many times, seeds ``seed`` .. ``seed + repeats - 1``.
        seed: one seed for every split, initialisation and augmentation (the first seed of the repeats).
        weights: backbone weights for extraction and fine-tuning (``none`` only for tests).
        rerun: train again even where a result with the same settings and inputs exists.
        sizes: training images per class to draw each strategy against (``--sizes``; empty:
            the one table of the whole training tree). See ``compare/sizes.py``.
        allow_overlap: score on a test tree that shares images with the training tree (refused
            before any work otherwise: every row would be scored on images it trained on).
    """

    data_root: Path = option(Path("data/fashion-mnist"), "folder with train/ and test/ class trees", flag="--data")
    output: Path = option(Path("features"), "output folder (features, models, compare.md/.csv/.png)", short="-o")
    strategies: tuple[str, ...] = option(DEFAULT_STRATEGIES, f"comma list from {', '.join(STRATEGIES)}", rule=ListOf(what="strategies"), metavar="S1,S2,...")
    unfreeze: tuple[str, ...] = option(DEFAULT_UNFREEZE, "one LP-FT row per point: layers to fine-tune from, or all (another --backbone: its last block)", rule=ListOf(what="layers"), metavar="L1,L2,...")
    backbone: str = option(BACKBONE, "network of the fine-tuning and probe rows", rule=OneOf(tuple(BACKBONES)))
    backbones: tuple[str, ...] = option((), "one frozen-features + logistic-regression row per backbone, features extracted once each; none = VGG16's lr row only", rule=ListOf(what="backbones"), metavar="B1,B2,...")
    input_size: int = option(224, "input side of extraction and fine-tuning", rule=Interval(int, 32, MAX_INT), message="every backbone needs at least 32 pixels")
    scratch_input_size: int = option(64, "from-scratch CNN input side", rule=Interval(int, 16, MAX_INT))
    epochs: int = option(10, "fine-tuning epochs at most (validation chooses how many)", rule=Interval(int, 1, MAX_INT))
    head_epochs: int = option(5, "dense-head epochs on the frozen base at most", rule=Interval(int, 0, MAX_INT))
    scratch_epochs: int = option(30, "from-scratch epochs at most", rule=Interval(int, 1, MAX_INT))
    resnet_depth: int = option(20, "layers of the from-scratch ResNet (6n+2)", rule=Interval(int, 8, MAX_INT))
    resnet_input_size: int | None = option(None, "from-scratch ResNet input side; none = scratch's default for a ResNet", rule=Interval(int, 4, MAX_INT))
    resnet_epochs: int | None = option(None, "from-scratch ResNet epochs (step schedule); none = scratch's default for a ResNet", rule=Interval(int, 1, MAX_INT))
    refit: bool = option(True, "network rows keep the model trained on the training rows only (no refit on training + validation rows)")
    repeats: int = option(1, "train every network row this many times (seeds SEED..SEED+N-1); the table shows the mean, the spread and each seed",
                          rule=Interval(int, 1, MAX_INT), metavar="N")  # fmt: skip
    seed: int = option(0, "one seed for every split, initialisation and augmentation", rule=Interval(int, 0, MAX_INT))
    weights: str = option("imagenet", "backbone weights: imagenet, none (tests only) or a weights file PATH")
    rerun: bool = option(False, "train again even where a result with the same settings and inputs exists")
    sizes: tuple[int, ...] = option(
        (),
        "draw each strategy's test accuracy against these training images per class (nested seeded subsets of "
        "DATA/train; features extracted once, for the largest); writes sizes.md/.csv/.json/.png; none = one table",
        rule=ListOf(int, what="whole numbers (e.g. 100,300,500)"),
        metavar="N1,N2,...",
    )
    allow_overlap: bool = option(False, "score on a DATA/test that shares images (same file or same content) with DATA/train")
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> "CompareConfig":
        """Check every value; return self.

        Raises:
            PipelineError: an unknown strategy, backbone or unfreeze point, a ResNet depth
                that is not 6n+2, an input side a backbone cannot take, or a data root
                without train/ and test/.
        """
        from pipeline.nets.networks import VGG16_LAYERS

        validate(self)
        for s in self.strategies:
            if s not in STRATEGIES:
                raise PipelineError(f"--strategies: unknown strategy '{s}'; choose from {', '.join(STRATEGIES)}")
        for b in self.backbones:
            if b not in BACKBONES:
                raise PipelineError(f"--backbones: unknown backbone '{b}'; choose from {', '.join(BACKBONES)}")
        for b in {self.backbone, *self.backbones}:
            if self.input_size < BACKBONES[b].min_size:
                raise PipelineError(f"--input-size {self.input_size}: {b} needs at least {BACKBONES[b].min_size} pixels")
        if "scratch-resnet" in self.strategies and ((self.resnet_depth - 2) % 6 or self.resnet_depth < 8):
            raise PipelineError(f"--resnet-depth {self.resnet_depth}: a CIFAR ResNet has 6n+2 layers (8, 14, 20, 32, 44, 56, 110, ...)")
        if not self.unfreeze:
            raise PipelineError("--unfreeze: needs at least one point")
        if self.backbone == BACKBONE:
            for point in self.unfreeze:
                if point not in (*VGG16_LAYERS, "all"):
                    raise PipelineError(f"--unfreeze {point}: not a VGG16 layer; choose all or one of {', '.join(VGG16_LAYERS)}")
        if self.sizes:
            check_sizes(self.sizes, self.strategies, self.backbones)
        for split in ("train", "test"):
            if not (self.data_root / split).is_dir():
                raise PipelineError(f"{self.data_root / split}: missing; compare needs {self.data_root}/train and {self.data_root}/test class trees")
        return self

    @property
    def models(self) -> Path:
        return self.output / "models"

    @property
    def points(self) -> tuple[str, ...]:
        """The LP-FT rows' unfreeze points: ``unfreeze``, or the backbone's last block when ``unfreeze`` is VGG16's default and the backbone is another."""
        if self.backbone != BACKBONE and self.unfreeze == DEFAULT_UNFREEZE:
            return (BACKBONES[self.backbone].unfreeze_from,)
        return self.unfreeze

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seeds of the network rows: ``seed`` .. ``seed + repeats - 1``."""
        return tuple(range(self.seed, self.seed + self.repeats))
