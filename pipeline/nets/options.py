"""Settings both nets stages share (``finetune`` and ``scratch``): the data, split and training flags whose defaults are the same in both, each written once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import MAX_INT, PRECISIONS, RESIZE_METHODS, Interval, OneOf, option
from pipeline.core.errors import PipelineError
from pipeline.nets.images import TEST_SIZE

DEFAULT_OUT_DIR = Path("features/models")
#: Rules shared by both stages' per-config fields (their defaults differ, their ranges do not).
COUNT = Interval(int, 1, MAX_INT)
COUNT_OR_ZERO = Interval(int, 0, MAX_INT)
RATE = Interval(float, 0.0, None, closed="neither")


@dataclass(frozen=True)
class NetConfig:
    """The flags of ``finetune`` and ``scratch`` with one default for both.

    Each stage's config inherits these fields and adds its own (``input_size``, ``dense``,
    ``epochs``, ``lr``, ``patience`` are per stage: their defaults differ).

    Attributes:
        data_dir: class-per-folder training images.
        test_dir: class-per-folder test images with the same classes; None = hold out
            ``TEST_SIZE`` of the decodable images of data_dir with ``split_indices``.
        out_dir: folder of ``NAME.keras``, ``NAME.metrics.json`` and ``NAME.curves.png``.
        dropout: the dropout rate after the hidden dense layer.
        batch_size: images per step.
        val_split: share of the training images held out for validation (stratified).
        augment: random flip/translation/rotation/zoom of training images.
        precision: ``auto``, ``float32``, ``bfloat16`` or ``float16`` (mixed precision).
        resize: Pillow interpolation, as in extract.
        refit: train the final model again from its start on the training + validation rows for the
            epochs chosen on validation (the VTAB-1k / VPT protocol: the final model sees every image).
        seed: seeds Keras, the splits, the augmentation and the epoch sampling.
        allow_overlap: score on a test tree that shares images with the training tree (refused otherwise).
        quiet: no progress bars; the summary line is still printed.
        command_line: recorded in the metrics.
    """

    data_dir: Path = option(help="training images, one sub-folder per class", positional=True)
    test_dir: Path | None = option(  # argparse %-formats help texts: the percent sign is doubled
        None, f"test images with the same class sub-folders; none = {TEST_SIZE * 100:.0f}%% of DATA_DIR via the shared seeded split, "
        "the rows train scores on", flag="--test", metavar="TEST_DIR",
    )  # fmt: skip
    out_dir: Path = option(DEFAULT_OUT_DIR, "folder for the model, metrics and curves", flag="--output-dir", short="-o")
    dropout: float = option(0.5, "dropout rate after the dense layer", rule=Interval(float, 0.0, 1.0, closed="left"), message="must be in [0, 1)")
    batch_size: int = option(32, "images per step", rule=COUNT)
    val_split: float = option(
        0.2,
        "share of the training images for validation, stratified",
        rule=Interval(float, 0.0, 1.0, closed="neither"),
        message="must be between 0 and 1 (exclusive)",
    )
    augment: bool = option(True, "no random flip/translation/rotation/zoom of training images")
    precision: str = option("auto", "compute precision; auto = fastest that keeps accuracy", rule=OneOf(PRECISIONS))
    resize: str = option("bilinear", "resize interpolation, as in extract", rule=OneOf(RESIZE_METHODS))
    refit: bool = option(True, "keep the model trained on the training rows only (no refit on training + validation rows for the epochs validation chose)")
    seed: int = option(0, "seed of Keras, the splits and the augmentation", rule=COUNT_OR_ZERO)
    quiet: bool = option(False, "no progress bars; the summary line is still printed")
    allow_overlap: bool = option(False, "score on a --test folder that shares images (same file or same content) with DATA_DIR")
    command_line: str = option("", cli=False)

    def check_folders(self) -> None:
        """The checks of the output and test folders (cheap, before any work).

        Raises:
            PipelineError: ``-o`` is a file, or ``--test`` is the training folder.
        """
        out = Path(self.out_dir)
        if out.exists() and not out.is_dir():
            raise PipelineError(f"-o {out}: exists and is not a folder")
        if self.test_dir is not None and Path(self.test_dir).resolve() == Path(self.data_dir).resolve():
            raise PipelineError(f"--test {self.test_dir}: is the training folder; pass a separate test tree or omit --test")

    def strategy(self) -> str:  # pragma: no cover - each stage names its own
        raise NotImplementedError
