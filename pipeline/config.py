"""Frozen per-stage settings with their defaults, validated once before any expensive work starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

#: Interpolation names understood by ``keras.utils.load_img`` (and Pillow).
RESIZE_METHODS = ("nearest", "bilinear", "bicubic", "hamming", "box", "lanczos")
#: ``--precision`` values: the compute dtype policy of the network. ``auto`` picks the
#: fastest one that keeps downstream accuracy (see ``backbone.resolve_precision``).
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
STORAGE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of ``python -m pipeline extract``.

    Attributes:
        data_dir: class-per-folder image tree.
        output: the HDF5 feature file to write.
        input_size: square side the images are resized to (224 gives 7x7x512 features).
        batch_size: images per network call.
        weights: ``imagenet``, ``none`` (explicit random init) or a weights file path.
        precision: compute precision (``auto``, ``float32``, ``bfloat16``, ``float16``).
        storage: dtype of the stored features.
        resize: Pillow/``load_img`` interpolation used for resizing.
        workers: decoding threads (0 = one per core).
        image_timeout: seconds one image may take to decode before it is rejected.
        strict: exit non-zero if any file was rejected.
        overwrite: replace an output (or partial run) made from other images or settings.
        quiet: no progress bar (for batch logs); the summary line is still printed.
        shards, shard: extract only the ``shard``-th of ``shards`` deterministic slices.
        command_line: recorded in the output file.
    """

    data_dir: Path
    output: Path
    input_size: int = 224
    batch_size: int = 32
    weights: str = "imagenet"
    precision: str = "auto"
    storage: str = "float16"
    resize: str = "bilinear"
    workers: int = 0
    image_timeout: float = 60.0
    strict: bool = False
    overwrite: bool = False
    quiet: bool = False
    shards: int = 1
    shard: int = 0
    command_line: str = ""

    def validate(self) -> "ExtractConfig":
        """Check every value; return self. Raises PipelineError naming the bad setting."""
        if self.input_size < 32:
            raise PipelineError(f"--input-size {self.input_size}: VGG16 needs at least 32 pixels")
        if self.batch_size < 1:
            raise PipelineError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.precision not in PRECISIONS:
            raise PipelineError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if self.storage not in STORAGE_DTYPES:
            raise PipelineError(f"--storage {self.storage}: choose one of {', '.join(STORAGE_DTYPES)}")
        if self.resize not in RESIZE_METHODS:
            raise PipelineError(f"--resize {self.resize}: choose one of {', '.join(RESIZE_METHODS)}")
        if self.workers < 0:
            raise PipelineError(f"--workers {self.workers}: must be 0 (auto) or more")
        if self.image_timeout <= 0:
            raise PipelineError(f"--image-timeout {self.image_timeout}: must be positive")
        if self.shards < 1 or not 0 <= self.shard < self.shards:
            raise PipelineError(f"--shard {self.shard} of --shards {self.shards}: need 0 <= shard < shards")
        if self.output.suffix.lower() not in (".h5", ".hdf5"):
            raise PipelineError(f"{self.output}: the output must be an HDF5 file ending in .h5 or .hdf5")
        return self
