"""Training images of the nets stages: listing the training and test trees, decoding them to uint8 arrays in memory within a budget, and the test and validation splits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.config import gigabytes, physical_memory
from pipeline.core.errors import PipelineError
from pipeline.core.splits import NO_TRAINING_IMAGES, split_indices
from pipeline.images.listing import Listing
from pipeline.images.decode import iter_batches
from pipeline.images.overlap import listing_files, split_groups

#: Pixels and cached prefix outputs must fit in this share of the machine's RAM.
MEMORY_FRACTION = 0.5
#: Share of the decodable images of DATA_DIR held out as the test set when --test is absent
#: (the same call ``train`` makes on a feature file of the same folder).
TEST_SIZE = 0.2
_DECODE_BATCH = 64


@dataclass
class Data:
    """Decoded images (uint8 RGB, in memory) and their splits."""

    class_names: tuple[str, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    test_source: str
    rejected: list = field(default_factory=list)  # [(path, reason)]
    decode_seconds: float = 0.0
    test_paths: tuple[str, ...] = ()  # each test image's path relative to its tree, as a feature file records it

    def all_rows(self) -> "Data":
        """The training and validation images as one training set (no validation): the data of a refit."""
        empty_x, empty_y = self.val_x[:0], self.val_y[:0]
        return Data(self.class_names, np.concatenate([self.train_x, self.val_x]), np.concatenate([self.train_y, self.val_y]), empty_x, empty_y,
                    self.test_x, self.test_y, self.test_source, self.rejected, self.decode_seconds, self.test_paths)  # fmt: skip


def memory_budget() -> int:
    """Bytes the decoded pixels plus the prefix cache may take (MEMORY_FRACTION of the RAM)."""
    return int(physical_memory() * MEMORY_FRACTION)


def check_pixel_memory(data_dir: Path, n_images: int, input_size: int) -> int:
    """Bytes of ``n_images`` held in memory as uint8 (n * size * size * 3).

    Raises:
        PipelineError: that is over ``memory_budget()``.
    """
    need = n_images * input_size * input_size * 3
    budget = memory_budget()
    if need > budget:
        raise PipelineError(
            f"{data_dir}: {n_images} images at {input_size}x{input_size} need "
            f"{gigabytes(need)} in memory as uint8, over the budget of {gigabytes(budget)} "
            f"({MEMORY_FRACTION:.0%} of RAM); use a smaller --input-size or fewer images"
        )
    return need


def decode(listing: Listing, *, input_size: int, resize: str, quiet: bool, desc: str, kept: list | None = None):
    """All decodable images of ``listing`` in listing order, their labels, and the rejects [(path, reason)].

    ``kept``: a list that receives the relative path of each decoded image, in order.
    """
    from pipeline.core.progress import progress

    n = len(listing)
    pixels = np.empty((n, input_size, input_size, 3), np.uint8)
    labels = np.empty(n, np.int32)
    rejected = [(str(Path(listing.root) / r.path), r.reason) for r in listing.skipped]
    k = 0
    with progress(n, desc, quiet=quiet) as bar:
        for batch in iter_batches(listing, np.arange(n), size=input_size, interpolation=resize, batch_size=_DECODE_BATCH):
            ok = batch.ok
            m = int(ok.sum())
            pixels[k : k + m] = batch.pixels[ok]
            labels[k : k + m] = listing.labels[batch.indices[ok]]
            if kept is not None:
                kept.extend(listing.paths[i] for i in batch.indices[ok].tolist())
            k += m
            for i, good, reason in zip(batch.indices.tolist(), ok.tolist(), batch.reasons):
                if not good:
                    rejected.append((str(Path(listing.root) / listing.paths[i]), reason))
            bar.update(len(batch.indices))
    return pixels[:k].copy() if k < n else pixels, labels[:k], rejected


def split_rows(labels: np.ndarray, test_size: float, seed: int, what: str, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """``core.splits.split_indices`` (the project's one seeded stratified split, whole ``groups`` of identical images), its errors naming ``what``.

    Returns:
        (train_rows, test_rows) as sorted int64 arrays.
    """
    try:
        return split_indices(np.asarray(labels), test_size, seed, groups=groups)
    except PipelineError as exc:
        raise PipelineError(f"{what}: cannot split {len(labels)} images {1 - test_size:.0%}/{test_size:.0%}: {exc}") from None


def load_data(listing: Listing, test_listing: Listing | None, *, input_size: int, resize: str, val_split: float, seed: int, quiet: bool) -> Data:
    """Decode the images and split them: test (the test listing, or ``split_indices(labels,
    TEST_SIZE, seed)`` over the decodable images in listing order, as ``train`` splits a
    feature file), then validation (``split_indices(train_labels, val_split, seed)``); identical images stay on one side (``split_groups``).

    Raises:
        PipelineError: no decodable image in a folder, or too few images to leave training,
            validation and test images.
    """
    data_dir = listing.root
    t0 = time.perf_counter()
    train_paths, test_paths = [], []
    x, y, rejected = decode(listing, input_size=input_size, resize=resize, quiet=quiet, desc="decode train", kept=train_paths)
    if len(y) == 0:
        raise PipelineError(f"{data_dir}: none of the {len(listing)} images could be decoded")
    groups = split_groups(listing_files(listing, train_paths), f"the {'validation split' if test_listing is not None else 'test and validation splits'} of {data_dir}")
    if test_listing is not None:
        test_x, test_y, rej = decode(test_listing, input_size=input_size, resize=resize, quiet=quiet, desc="decode test", kept=test_paths)
        rejected += rej
        if len(test_y) == 0:
            raise PipelineError(f"--test {test_listing.root}: none of the {len(test_listing)} images could be decoded")
        pool = np.arange(len(y))
        test_source = f"{Path(test_listing.root).resolve()} (test folder)"
    else:
        pool, test_rows = split_rows(y, TEST_SIZE, seed, f"{data_dir} (test split)", groups)
        test_x, test_y = x[test_rows], y[test_rows]
        test_paths = [train_paths[i] for i in test_rows.tolist()]
        test_source = f"split of {Path(data_dir).resolve()} (split_indices test_size {TEST_SIZE}, seed {seed})"
    tr, va = split_rows(y[pool], val_split, seed, f"{data_dir} (validation split, --val-split {val_split})", groups[pool])
    tr, va = pool[tr], pool[va]
    for rows, what in ((tr, "training"), (va, "validation (--val-split)"), (test_y, "test")):
        if len(rows) == 0:
            raise PipelineError(f"{data_dir}: {len(y)} decodable images leave no {what} images; add images")
    for c in sorted(set(range(len(listing.class_names))) - set(y[tr].tolist())):  # its images undecodable, or twins of another class's held out
        raise PipelineError(f"{data_dir}: class {listing.class_names[c]!r} has no training images ({NO_TRAINING_IMAGES}); add images to it or remove its folder")
    data = Data(listing.class_names, x[tr], y[tr], x[va], y[va], test_x, test_y, test_source, rejected, test_paths=tuple(test_paths))
    data.decode_seconds = time.perf_counter() - t0
    return data
