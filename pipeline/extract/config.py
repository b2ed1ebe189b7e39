"""Extract settings: ``ExtractConfig``, the fields of ``python -m pipeline extract`` with their defaults and rules, checked once before any work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core import config as settings
from pipeline.core.config import EXTRACT_PRECISIONS, MAX_INT, RESIZE_METHODS, STORAGE_DTYPES, Interval, OneOf, option
from pipeline.core.errors import PipelineError
from pipeline.backbones import int8 as engines
from pipeline.backbones.registry import BACKBONE, BACKBONES

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
    backbone: str = option(BACKBONE, "network: " + ", ".join(BACKBONES) + " (only vgg16 has the offline weights route)", rule=OneOf(tuple(BACKBONES)))
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
        if self.input_size is None and self.backbone in BACKBONES:
            object.__setattr__(self, "input_size", BACKBONES[self.backbone].input_size)

    def validate(self) -> "ExtractConfig":
        """Check every value (each field's rule, then the rules across fields); return self.

        Raises:
            PipelineError: naming the flag, its value and what is allowed.
        """
        settings.validate(self)
        least = BACKBONES[self.backbone].min_size
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
