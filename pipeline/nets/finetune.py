"""Fine-tuning stage: VGG16 base + new dense head trained end to end on images (and a from-scratch CNN baseline), with a cached frozen prefix for speed.

Data flow (``run_finetune``)::

    list_images -> reader.iter_batches (parallel decode) -> uint8 arrays in memory
      -> split_indices (test, then validation) -> phase 1 (head) -> phase 2 (unfrozen suffix + head)
      -> full model on the test set -> OUT_DIR/finetune.{keras,metrics.json,curves.png}

The network is three nested Keras models that share their layers::

    full   = pixels uint8 -> to_float -> frozen_prefix(training=False) -> trainable_top
    prefix = float RGB 0..255 -> VGG16 preprocessing -> VGG16 layers before --unfreeze-from
    top    = prefix output -> VGG16 layers from --unfreeze-from on -> head

"cached-prefix" mode runs the frozen prefix once per augmented copy of every training
image (``--cache-copies``) and once for the validation images, then trains only ``top``
on those cached tensors (each epoch draws one copy per image). "plain" mode (``--no-cache``,
``--unfreeze-from all``, or when the cache would not fit in memory) trains the whole
chain with augmentation on the fly. Either way the saved model is ``full``: uint8 RGB
pixels in, class probabilities out, loadable with ``keras.saving.load_model`` and no
custom objects (the preprocessing is built from stock layers; see ``_preprocess_layers``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.extraction import backbone as bb
from pipeline.core import plots
from pipeline.core.config import PRECISIONS, RESIZE_METHODS
from pipeline.core.errors import PipelineError
from pipeline.extraction.reader import Listing, iter_batches, list_images
from pipeline.core.outputs import atomic_output, write_text_atomic

#: Every layer of the headless VGG16, in order (``--unfreeze-from`` takes any of them).
VGG16_LAYERS: tuple[str, ...] = (
    "block1_conv1", "block1_conv2", "block1_pool",
    "block2_conv1", "block2_conv2", "block2_pool",
    "block3_conv1", "block3_conv2", "block3_conv3", "block3_pool",
    "block4_conv1", "block4_conv2", "block4_conv3", "block4_pool",
    "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool",
)
#: ``none``: frozen base, head only (phase 1 only); ``all``: every VGG16 layer trains in phase 2.
UNFREEZE_SPECIAL = ("none", "all")
HEADS = ("flatten", "gap")
#: Augmentation applied to training images only (Keras preprocessing layers, seeded).
AUGMENTATION = {"flip": "horizontal", "translation": 0.1, "rotation": 0.05, "zoom": 0.1}
#: Pixels and cached prefix outputs must fit in this share of the machine's RAM.
MEMORY_FRACTION = 0.5
#: Share of the decodable images of DATA_DIR held out as the test set when --test is absent
#: (the same call ``train`` makes on a feature file of the same folder).
TEST_SIZE = 0.2
DEFAULT_OUT_DIR = Path("features/models")
#: Keys every ``*.metrics.json`` written here carries (the contract ``compare`` reads).
#: ``train_seconds`` = decoding the images + building the prefix cache + every epoch (model
#: construction and the test evaluation excluded); ``seconds_per_epoch`` = mean wall time of
#: an epoch of the last phase (fine-tuning; the head phase for ``none``; validation included);
#: ``images_per_second`` = test-set inference of the saved (full) model, after a warm-up.
METRICS_KEYS = (
    "strategy", "accuracy", "macro_f1", "per_class", "train_seconds", "images_per_second",
    "model_bytes", "seed", "n_train", "n_val", "n_test", "test_source", "epochs_run",
    "seconds_per_epoch", "mode", "input_size", "unfreeze_from", "precision", "rejected",
)
_DECODE_BATCH = 64


# --------------------------------------------------------------------------- configuration


def _check_common(c) -> None:
    """Checks shared by both configs (data flags)."""
    if c.batch_size < 1:
        raise PipelineError(f"--batch-size {c.batch_size}: must be at least 1")
    if not 0.0 < c.val_split < 1.0:
        raise PipelineError(f"--val-split {c.val_split}: must be between 0 and 1 (exclusive)")
    if c.patience < 0:
        raise PipelineError(f"--patience {c.patience}: must be 0 or more")
    if c.dense < 1:
        raise PipelineError(f"--dense {c.dense}: must be at least 1 unit")
    if not 0.0 <= c.dropout < 1.0:
        raise PipelineError(f"--dropout {c.dropout}: must be in [0, 1)")
    if c.precision not in PRECISIONS:
        raise PipelineError(f"--precision {c.precision}: choose one of {', '.join(PRECISIONS)}")
    if c.resize not in RESIZE_METHODS:
        raise PipelineError(f"--resize {c.resize}: choose one of {', '.join(RESIZE_METHODS)}")
    if c.seed < 0:
        raise PipelineError(f"--seed {c.seed}: must be 0 or more")
    if not (c.lr > 0 and math.isfinite(c.lr)):
        raise PipelineError(f"--lr {c.lr}: must be a positive number")
    if c.epochs < 0:
        raise PipelineError(f"--epochs {c.epochs}: must be 0 or more")
    out = Path(c.out_dir)
    if out.exists() and not out.is_dir():
        raise PipelineError(f"-o {out}: exists and is not a folder")
    if c.test_dir is not None and Path(c.test_dir).resolve() == Path(c.data_dir).resolve():
        raise PipelineError(f"--test {c.test_dir}: is the training folder; pass a separate test tree or omit --test")


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of ``python -m pipeline finetune``.

    Attributes:
        data_dir: class-per-folder training images.
        test_dir: class-per-folder test images with the same classes; None = hold out
            ``TEST_SIZE`` of the decodable images of data_dir with ``split_indices``.
        out_dir: folder of ``finetune.keras``, ``finetune.metrics.json``, ``finetune.curves.png``.
        input_size: square side the images are resized to (at least 32).
        unfreeze_from: first VGG16 layer trained in phase 2, ``none`` (head only) or ``all``.
        head: ``flatten`` or ``gap`` (global average pooling) before the dense layer.
        dense, dropout: units of the hidden dense layer and the dropout rate after it.
        head_epochs, head_lr: phase 1 (frozen base, new head), Adam.
        epochs, lr: phase 2 (unfrozen suffix + head), Adam; at most ``epochs``, early stopping.
        batch_size: images per step.
        val_split: share of the training images held out for validation (stratified).
        patience: epochs without a lower validation loss before stopping (best weights restored).
        augment: random flip/translation/rotation/zoom of training images.
        precision: ``auto``, ``float32``, ``bfloat16`` or ``float16`` (mixed precision).
        weights: ``imagenet``, ``none`` (random init, for tests) or a weights file path.
        seed: seeds Keras, the splits, the augmentation and the epoch sampling.
        cache: cache the frozen prefix's outputs (``cached-prefix`` mode) when it has layers.
        cache_copies: augmented copies of each training image in the cache.
        resize: Pillow interpolation, as in extract.
        quiet: no progress bars; the summary line is still printed.
        command_line: recorded in the metrics.
    """

    data_dir: Path
    test_dir: Path | None = None
    out_dir: Path = DEFAULT_OUT_DIR
    input_size: int = 224
    unfreeze_from: str = "block5_conv1"
    head: str = "flatten"
    dense: int = 256
    dropout: float = 0.5
    head_epochs: int = 5
    epochs: int = 10
    lr: float = 1e-5
    head_lr: float = 1e-3
    batch_size: int = 32
    val_split: float = 0.2
    patience: int = 3
    augment: bool = True
    precision: str = "auto"
    weights: str = "imagenet"
    seed: int = 0
    cache: bool = True
    cache_copies: int = 4
    resize: str = "bilinear"
    quiet: bool = False
    command_line: str = ""

    def validate(self) -> "FinetuneConfig":
        """Check every value; return self. Raises PipelineError naming the flag and the rule."""
        if self.input_size < 32:
            raise PipelineError(f"--input-size {self.input_size}: VGG16 needs at least 32 pixels")
        if self.unfreeze_from not in VGG16_LAYERS + UNFREEZE_SPECIAL:
            raise PipelineError(
                f"--unfreeze-from {self.unfreeze_from}: not a VGG16 layer; choose none, all or one of "
                + ", ".join(VGG16_LAYERS)
            )
        if self.head not in HEADS:
            raise PipelineError(f"--head {self.head}: choose one of {', '.join(HEADS)}")
        if self.head_epochs < 0:
            raise PipelineError(f"--head-epochs {self.head_epochs}: must be 0 or more")
        if self.unfreeze_from == "none" and self.head_epochs < 1:
            raise PipelineError("--head-epochs 0 with --unfreeze-from none: nothing would be trained")
        if self.head_epochs + self.epochs < 1:
            raise PipelineError("--head-epochs 0 and --epochs 0: nothing would be trained")
        if not (self.head_lr > 0 and math.isfinite(self.head_lr)):
            raise PipelineError(f"--head-lr {self.head_lr}: must be a positive number")
        if self.cache_copies < 1:
            raise PipelineError(f"--cache-copies {self.cache_copies}: must be at least 1")
        _check_common(self)
        return self

    def strategy(self) -> str:
        if self.unfreeze_from == "none":
            return "frozen base + dense head"
        if self.unfreeze_from == "all":
            return "finetune (all layers)"
        return f"finetune (from {self.unfreeze_from})"


@dataclass(frozen=True)
class ScratchConfig:
    """Settings of ``python -m pipeline scratch``: a small CNN trained from random weights.

    The data flags mean what they mean in FinetuneConfig (same splits, same augmentation).
    Architecture: ``len(filters)`` blocks of conv3x3 -> batchnorm -> relu -> maxpool, then
    global average pooling, Dense(dense, relu), Dropout, Dense(classes, softmax).
    """

    data_dir: Path
    test_dir: Path | None = None
    out_dir: Path = DEFAULT_OUT_DIR
    input_size: int = 64
    filters: tuple[int, ...] = (32, 64, 128, 256)
    dense: int = 128
    dropout: float = 0.5
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 32
    val_split: float = 0.2
    patience: int = 5
    augment: bool = True
    precision: str = "auto"
    seed: int = 0
    resize: str = "bilinear"
    quiet: bool = False
    command_line: str = ""

    def validate(self) -> "ScratchConfig":
        """Check every value; return self. Raises PipelineError naming the flag and the rule."""
        need = 2 ** len(self.filters)
        if self.input_size < need:
            raise PipelineError(f"--input-size {self.input_size}: {len(self.filters)} pooling blocks need at least {need} pixels")
        if not self.filters or min(self.filters) < 1:
            raise PipelineError(f"filters {self.filters}: need at least one block of at least 1 filter")
        if self.epochs < 1:
            raise PipelineError(f"--epochs {self.epochs}: must be at least 1")
        _check_common(self)
        return self

    def strategy(self) -> str:
        return "from scratch CNN"


def _config_json(config) -> dict:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


# --------------------------------------------------------------------------- data


def split_indices(labels: np.ndarray, test_size: float, seed: int, what: str = "the images") -> tuple[np.ndarray, np.ndarray]:
    """``pipeline.classical.train.split_indices`` (the project's one seeded stratified split), errors naming ``what``.

    Returns (train_rows, test_rows) as sorted int64 arrays.
    """
    from pipeline.core.splits import split_indices as shared

    try:
        a, b = shared(np.asarray(labels), test_size, seed)
    except ValueError as exc:
        raise PipelineError(f"{what}: cannot split {len(labels)} images {1 - test_size:.0%}/{test_size:.0%}: {exc}") from None
    return np.sort(np.asarray(a, dtype=np.int64)), np.sort(np.asarray(b, dtype=np.int64))


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


def _list_inputs(config) -> tuple[Listing, Listing | None]:
    listing = list_images(config.data_dir)
    test_listing = None
    if config.test_dir is not None:
        test_listing = list_images(config.test_dir)
        if test_listing.class_names != listing.class_names:
            raise PipelineError(
                f"--test {config.test_dir}: its classes {list(test_listing.class_names)} differ from "
                f"{list(listing.class_names)} in {config.data_dir}; the test folder needs the same class sub-folders"
            )
    return listing, test_listing


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def memory_budget() -> int:
    """Bytes the decoded pixels plus the prefix cache may take (MEMORY_FRACTION of the RAM)."""
    return int(_physical_memory() * MEMORY_FRACTION)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _check_pixel_memory(config, n_images: int) -> int:
    """Pixels are held in memory as uint8: n * size * size * 3 bytes. Error out above the budget."""
    need = n_images * config.input_size * config.input_size * 3
    budget = memory_budget()
    if need > budget:
        raise PipelineError(
            f"{config.data_dir}: {n_images} images at {config.input_size}x{config.input_size} need "
            f"{_gb(need)} in memory as uint8, over the budget of {_gb(budget)} "
            f"({MEMORY_FRACTION:.0%} of RAM); use a smaller --input-size or fewer images"
        )
    return need


def _decode(listing: Listing, config, desc: str):
    """All decodable images of listing in listing order, their labels, and the rejects."""
    from tqdm import tqdm

    n = len(listing)
    size = config.input_size
    pixels = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty(n, np.int32)
    rejected = [(str(Path(listing.root) / p), reason) for p, reason, _, _ in listing.unlisted]
    k = 0
    with tqdm(total=n, desc=desc, unit="img", disable=config.quiet, file=sys.stderr, dynamic_ncols=True) as bar:
        for batch in iter_batches(listing, np.arange(n), size=size, interpolation=config.resize, batch_size=_DECODE_BATCH):
            ok = batch.ok
            m = int(ok.sum())
            pixels[k : k + m] = batch.pixels[ok]
            labels[k : k + m] = listing.labels[batch.indices[ok]]
            k += m
            for i, good, reason in zip(batch.indices.tolist(), ok.tolist(), batch.reasons):
                if not good:
                    rejected.append((str(Path(listing.root) / listing.paths[i]), reason))
            bar.update(len(batch.indices))
    return pixels[:k].copy() if k < n else pixels, labels[:k], rejected


def load_data(config, listing: Listing, test_listing: Listing | None) -> Data:
    """Decode the images and split them: test (``--test`` or ``split_indices(labels, TEST_SIZE, seed)``
    over the decodable images in listing order, as ``train`` splits a feature file), then
    validation (``split_indices(train_labels, val_split, seed)``).

    Raises:
        PipelineError: no decodable image in a folder, or a class too small to split.
    """
    t0 = time.perf_counter()
    x, y, rejected = _decode(listing, config, "decode train")
    if len(y) == 0:
        raise PipelineError(f"{config.data_dir}: none of the {len(listing)} images could be decoded")
    if test_listing is not None:
        test_x, test_y, rej = _decode(test_listing, config, "decode test")
        rejected += rej
        if len(test_y) == 0:
            raise PipelineError(f"--test {config.test_dir}: none of the {len(test_listing)} images could be decoded")
        pool = np.arange(len(y))
        test_source = f"{Path(config.test_dir).resolve()} (test folder)"
    else:
        pool, test_rows = split_indices(y, TEST_SIZE, config.seed, f"{config.data_dir} (test split)")
        test_x, test_y = x[test_rows], y[test_rows]
        test_source = f"split of {Path(config.data_dir).resolve()} (split_indices test_size {TEST_SIZE}, seed {config.seed})"
    tr, va = split_indices(y[pool], config.val_split, config.seed, f"{config.data_dir} (validation split, --val-split {config.val_split})")
    tr, va = pool[tr], pool[va]
    for rows, what in ((tr, "training"), (va, "validation (--val-split)"), (test_y, "test")):
        if len(rows) == 0:
            raise PipelineError(f"{config.data_dir}: {len(y)} decodable images leave no {what} images; add images")
    data = Data(listing.class_names, x[tr], y[tr], x[va], y[va], test_x, test_y, test_source, rejected)
    data.decode_seconds = time.perf_counter() - t0
    return data


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator | None = None, copies: bool = False):
    """A tf.data pipeline of (x, y) batches from in-memory arrays, prefetched.

    With ``rng`` every epoch (every new iterator) is a fresh permutation; with ``copies``
    ``x`` is (K, n, ...) and every epoch draws one of the K copies of each row.
    """
    import tensorflow as tf

    n = len(y)
    n_copies = x.shape[0] if copies else 1
    row_shape = x.shape[2:] if copies else x.shape[1:]

    def gen():
        order = rng.permutation(n) if rng is not None else np.arange(n)
        pick = rng.integers(0, n_copies, n) if copies else None
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            if copies:
                yield x[pick[idx], idx], y[idx]
            else:
                yield x[idx], y[idx]

    spec = (tf.TensorSpec((None, *row_shape), tf.as_dtype(x.dtype)), tf.TensorSpec((None,), tf.int32))
    ds = tf.data.Dataset.from_generator(gen, output_signature=spec)
    ds = ds.apply(tf.data.experimental.assert_cardinality(math.ceil(n / batch_size)))
    return ds.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- models


def _preprocess_layers():
    """``backbone.preprocess`` (RGB->BGR, minus the ImageNet BGR means, float32) as stock Keras layers.

    A frozen 3x3 permutation Dense flips the channels (exact: one weight is 1, the others 0,
    and the values are still integers 0..255, so even TF32 or bfloat16 matmuls keep them),
    then a Rescaling with a per-channel offset subtracts the means. Stock layers keep the
    saved model loadable without custom objects or unsafe Lambda deserialisation; a test
    checks the result is bit-identical to ``backbone.preprocess``.
    """
    import keras

    flip = keras.layers.Dense(3, use_bias=False, trainable=False, dtype="float32", name="rgb_to_bgr")
    flip.build((None, 3))
    flip.set_weights([np.eye(3, dtype=np.float32)[::-1].copy()])
    offset = keras.layers.Rescaling(1.0, offset=[-m for m in bb.BGR_MEANS], dtype="float32", name="subtract_imagenet_bgr_means")
    return [flip, offset]


def augmentation_layers(seed: int):
    """The training-time augmentation (AUGMENTATION), float32, seeded; inactive at inference."""
    import keras

    a = AUGMENTATION
    return [
        keras.layers.RandomFlip(a["flip"], seed=seed, dtype="float32", name="aug_flip"),
        keras.layers.RandomTranslation(a["translation"], a["translation"], fill_mode="reflect", seed=seed + 1, dtype="float32", name="aug_translate"),
        keras.layers.RandomRotation(a["rotation"], fill_mode="reflect", seed=seed + 2, dtype="float32", name="aug_rotate"),
        keras.layers.RandomZoom(a["zoom"], fill_mode="reflect", seed=seed + 3, dtype="float32", name="aug_zoom"),
    ]


def _apply(layers, x, **kwargs):
    for layer in layers:
        x = layer(x, **kwargs)
    return x


@dataclass
class Network:
    """The models of one run; they share their layers, so training ``top`` trains ``full``.

    Attributes:
        full: uint8 RGB pixels (n, s, s, 3) -> class probabilities (float32); the saved model.
        prefix: float RGB 0..255 -> output of the frozen part (never trained); None for scratch.
        top: prefix output (or float pixels for scratch) -> class probabilities.
        phases: (name, layers of ``top`` trainable in that phase) in training order.
        cut: number of VGG16 layers in the frozen prefix.
    """

    full: object
    prefix: object | None
    top: object
    phases: list
    cut: int = 0


def _dense_init(seed: int):
    import keras

    return keras.initializers.GlorotUniform(seed=seed)


def find_layer(model, name: str):
    """The layer called ``name`` anywhere in ``model`` (nested models included)."""
    for layer in model.layers:
        if layer.name == name:
            return layer
        if hasattr(layer, "layers"):
            try:
                return find_layer(layer, name)
            except ValueError:
                pass
    raise ValueError(f"no layer {name!r} in {model.name}")


def build_finetune_network(config: FinetuneConfig, n_classes: int, precision: str, weights=None) -> Network:
    """VGG16 base (from ``build_vgg16``, ``weights`` loaded if given) + new head, split at ``unfreeze_from``.

    Deterministic for a given config: the base is initialised from ``config.seed`` and every
    new layer has its own seeded initialiser, so tests can rebuild the starting point.
    """
    import keras

    from pipeline.extraction.weights import load_weights

    policy = bb.POLICIES[precision]
    vgg = bb.build_vgg16(config.input_size, precision, config.seed)
    if weights is not None:
        load_weights(vgg, weights)
    vgg_layers = [vgg.get_layer(name) for name in VGG16_LAYERS]
    if config.unfreeze_from == "none":
        cut = len(vgg_layers)
    elif config.unfreeze_from == "all":
        cut = 0
    else:
        cut = VGG16_LAYERS.index(config.unfreeze_from)
    s = config.input_size

    pre = _preprocess_layers()
    prefix_in = keras.Input((s, s, 3), dtype="float32", name="rgb_0_255")
    prefix_out = _apply(vgg_layers[:cut], _apply(pre, prefix_in))
    prefix = keras.Model(prefix_in, prefix_out, name="frozen_prefix")
    prefix.trainable = False

    seed = config.seed
    top_in = keras.Input(tuple(prefix_out.shape[1:]), dtype=prefix_out.dtype, name="prefix_output")
    suffix = vgg_layers[cut:]
    pool = keras.layers.Flatten(dtype=policy, name="head_flatten") if config.head == "flatten" else keras.layers.GlobalAveragePooling2D(dtype=policy, name="head_gap")
    head = [
        pool,
        keras.layers.Dense(config.dense, activation="relu", kernel_initializer=_dense_init(seed + 101), dtype=policy, name="head_dense"),
        keras.layers.Dropout(config.dropout, seed=seed + 102, dtype=policy, name="head_dropout"),
        # float32 softmax: mixed precision keeps the probabilities and the loss in float32
        keras.layers.Dense(n_classes, activation="softmax", kernel_initializer=_dense_init(seed + 103), dtype="float32", name="predictions"),
    ]
    top = keras.Model(top_in, _apply(head, _apply(suffix, top_in)), name="trainable_top")

    pixels = keras.Input((s, s, 3), dtype="uint8", name="pixels")
    x = keras.layers.Rescaling(1.0, dtype="float32", name="to_float")(pixels)
    full = keras.Model(pixels, top(prefix(x, training=False)), name="vgg16_finetune")
    phases = [("head", head)]
    if config.unfreeze_from != "none":
        phases.append(("finetune", suffix + head))
    return Network(full, prefix, top, phases, cut)


def build_scratch_network(config: ScratchConfig, n_classes: int, precision: str) -> Network:
    """The baseline CNN (see ScratchConfig), with seeded initialisers."""
    import keras

    policy = bb.POLICIES[precision]
    keras.utils.set_random_seed(config.seed)
    s = config.input_size
    seed = config.seed
    body_in = keras.Input((s, s, 3), dtype="float32", name="rgb_0_255")
    x = keras.layers.Rescaling(1.0 / 255, dtype=policy, name="scale_0_1")(body_in)
    for i, f in enumerate(config.filters, start=1):
        x = keras.layers.Conv2D(f, 3, padding="same", use_bias=False, kernel_initializer=keras.initializers.HeNormal(seed=seed + i), dtype=policy, name=f"block{i}_conv")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, dtype=policy, name=f"block{i}_bn")(x)  # small data: few steps per epoch
        x = keras.layers.Activation("relu", dtype=policy, name=f"block{i}_relu")(x)
        x = keras.layers.MaxPooling2D(dtype=policy, name=f"block{i}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(dtype=policy, name="gap")(x)
    x = keras.layers.Dense(config.dense, activation="relu", kernel_initializer=_dense_init(seed + 101), dtype=policy, name="dense")(x)
    x = keras.layers.Dropout(config.dropout, seed=seed + 102, dtype=policy, name="dropout")(x)
    out = keras.layers.Dense(n_classes, activation="softmax", kernel_initializer=_dense_init(seed + 103), dtype="float32", name="predictions")(x)
    top = keras.Model(body_in, out, name="scratch_cnn")
    pixels = keras.Input((s, s, 3), dtype="uint8", name="pixels")
    full = keras.Model(pixels, top(keras.layers.Rescaling(1.0, dtype="float32", name="to_float")(pixels)), name="scratch")
    return Network(full, None, top, [("train", [l for l in top.layers if not isinstance(l, keras.layers.InputLayer)])])


# --------------------------------------------------------------------------- training


def _optimizer(lr: float, precision: str):
    import keras

    opt = keras.optimizers.Adam(learning_rate=lr)
    if precision == "float16":  # float16 gradients underflow without loss scaling
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def _verbose(quiet: bool):
    if quiet:
        return 0
    return 1 if sys.stdout.isatty() else 2


def _cache_plan(net: Network, data: Data, config: FinetuneConfig, pixel_bytes: int):
    """(copies, dtype, bytes, why-not) of the prefix cache; copies 0 = plain mode."""
    if not config.cache:
        return 0, None, 0, "--no-cache"
    if net.cut == 0:
        return 0, None, 0, "the frozen prefix has no VGG16 layer (--unfreeze-from all/block1_conv1)"
    import tensorflow as tf

    out = net.prefix.outputs[0]
    dtype = np.dtype(tf.as_dtype(out.dtype).as_numpy_dtype)
    copies = config.cache_copies if config.augment else 1
    per_image = int(np.prod(out.shape[1:])) * dtype.itemsize
    need = (copies * len(data.train_y) + len(data.val_y)) * per_image
    budget = memory_budget() - pixel_bytes
    if need > budget:
        return 0, None, need, (f"the cache ({copies} copies x {len(data.train_y)} + {len(data.val_y)} images x "
                               f"{per_image / 1e6:.2f} MB = {_gb(need)}) exceeds the memory budget ({_gb(budget)} left)")
    return copies, dtype, need, ""


def _build_cache(net: Network, data: Data, config: FinetuneConfig, copies: int, dtype):
    """Prefix outputs: (copies, n_train, ...) of augmented training images and (n_val, ...) of validation images."""
    import tensorflow as tf
    from tqdm import tqdm

    prefix = net.prefix
    aug = augmentation_layers(config.seed) if config.augment else []

    @tf.function(reduce_retracing=True)
    def clean(x):
        return prefix(tf.cast(x, tf.float32), training=False)

    @tf.function(reduce_retracing=True)
    def augmented(x):
        y = tf.cast(x, tf.float32)
        for layer in aug:
            y = layer(y, training=True)
        return prefix(y, training=False)

    shape = tuple(prefix.outputs[0].shape[1:])
    n, bs = len(data.train_y), config.batch_size
    train = np.empty((copies, n, *shape), dtype)
    val = np.empty((len(data.val_y), *shape), dtype)
    total = copies * n + len(data.val_y)
    with tqdm(total=total, desc=f"cache {copies}x", unit="img", disable=config.quiet, file=sys.stderr, dynamic_ncols=True) as bar:
        for k in range(copies):
            fn = augmented if aug else clean
            for s in range(0, n, bs):
                train[k, s : s + bs] = fn(data.train_x[s : s + bs]).numpy()
                bar.update(min(bs, n - s))
        for s in range(0, len(val), bs):
            val[s : s + bs] = clean(data.val_x[s : s + bs]).numpy()
            bar.update(min(bs, len(val) - s))
    return train, val


def _train_phases(net: Network, data: Data, config, precision: str, epochs_by_phase: dict, lr_by_phase: dict, cache=None):
    """Run the phases; returns (history dict, per-phase records). cache = (train, val) or None."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._t)

    rng = np.random.default_rng(config.seed + 1)
    if cache is not None:
        # a wrapper is compiled, never ``top`` itself, so the saved model carries no optimizer state
        features = keras.Input(net.top.inputs[0].shape[1:], dtype=net.top.inputs[0].dtype, name="cached_prefix_output")
        model = keras.Model(features, net.top(features), name="train_model")
        train_ds = _batches(cache[0], data.train_y, config.batch_size, rng, copies=True)
        val_ds = _batches(cache[1], data.val_y, config.batch_size)
    else:
        pixels = keras.Input(data.train_x.shape[1:], dtype="uint8", name="pixels")
        x = keras.layers.Rescaling(1.0, dtype="float32", name="to_float")(pixels)
        if config.augment:
            x = _apply(augmentation_layers(config.seed), x)
        if net.prefix is not None:
            x = net.prefix(x, training=False)
        model = keras.Model(pixels, net.top(x), name="train_model")
        train_ds = _batches(data.train_x, data.train_y, config.batch_size, rng)
        val_ds = _batches(data.val_x, data.val_y, config.batch_size)

    history: dict[str, list] = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": [], "phase": []}
    records = []
    top_layers = [l for l in net.top.layers if not isinstance(l, keras.layers.InputLayer)]
    for name, trainable in net.phases:
        epochs = epochs_by_phase[name]
        if epochs < 1:
            continue
        chosen = {id(l) for l in trainable}
        for layer in top_layers:
            layer.trainable = id(layer) in chosen
        model.compile(optimizer=_optimizer(lr_by_phase[name], precision), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        timer = EpochTimer()
        stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True)
        if not config.quiet:
            print(f"phase {name}: {epochs} epochs at most, lr {lr_by_phase[name]:g}, "
                  f"{sum(int(np.prod(w.shape)) for w in model.trainable_weights)} trainable parameters", file=sys.stderr)
        h = model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=[timer, stop], shuffle=False, verbose=_verbose(config.quiet))
        n = len(h.history["loss"])
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            history[key] += [float(v) for v in h.history.get(key, [math.nan] * n)]
        history["phase"] += [name] * n
        records.append({
            "name": name,
            "epochs_run": n,
            "best_epoch": int(stop.best_epoch) + 1,
            "best_val_loss": float(stop.best),
            "lr": lr_by_phase[name],
            "trainable_params": int(sum(int(np.prod(w.shape)) for w in model.trainable_weights)),
            "epoch_seconds": [round(t, 3) for t in timer.seconds],
            "seconds_per_epoch": float(np.mean(timer.seconds)) if timer.seconds else 0.0,
        })
    for layer in top_layers:  # leave the saved model in its natural state: head and suffix trainable
        layer.trainable = True
    return history, records


# --------------------------------------------------------------------------- evaluation and outputs


def _evaluate(full, data: Data, batch_size: int):
    """Test-set probabilities from the full model and its measured throughput (images/s)."""
    n = len(data.test_y)
    # warm up on both batch shapes the timed run will see, so tracing is not timed
    r = n % batch_size
    warm = data.test_x[: min(n, batch_size + r)]
    full.predict(warm, batch_size=batch_size, verbose=0)
    t0 = time.perf_counter()
    probs = full.predict(data.test_x, batch_size=batch_size, verbose=0)
    seconds = time.perf_counter() - t0
    return probs, (n / seconds if seconds > 0 else 0.0)


def _scores(y_true, y_pred, class_names) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)
        },
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def _write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _save_model(model, path: Path) -> int:
    with atomic_output(path, suffix=".keras") as tmp:  # Keras picks the format by the .keras suffix
        model.save(tmp)
    return path.stat().st_size


def _curves_title(config, history: dict, mode: str, precision: str) -> str:
    """Title naming the epochs of each phase (the curves run on across the phases)."""
    spans, start = [], 1
    phases = history["phase"]
    for i, name in enumerate(phases):
        if i + 1 == len(phases) or phases[i + 1] != name:
            spans.append(f"{name} {start}-{i + 1}" if i + 1 > start else f"{name} {start}")
            start = i + 2
    return f"{config.strategy()}, {mode}, {config.input_size}px, {precision} (epochs: {', '.join(spans)})"


def _prepare_out_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"-o {out_dir}: cannot create the output folder: {exc.strerror or exc}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise PipelineError(f"-o {out_dir}: output folder is not writable")
    return out_dir


def _package_versions() -> dict:
    from pipeline.extraction.extract import package_versions

    return package_versions()


def _finish(name: str, net: Network, data: Data, config, precision: str, history, records, extra: dict, train_seconds: float) -> dict:
    """Evaluate the full model on the test set, write the three outputs, print the summary."""
    out_dir = Path(config.out_dir)
    probs, ips = _evaluate(net.full, data, config.batch_size)
    y_pred = probs.argmax(axis=1)
    model_path = out_dir / f"{name}.keras"
    model_bytes = _save_model(net.full, model_path)
    curves = out_dir / f"{name}.curves.png"
    plots.training_curves({k: v for k, v in history.items() if k != "phase"}, curves,
                          title=_curves_title(config, history, extra["mode"], precision))
    main = records[-1]
    metrics = {
        "strategy": config.strategy(),
        **_scores(data.test_y, y_pred, data.class_names),
        "train_seconds": train_seconds,
        "images_per_second": ips,
        "model_bytes": model_bytes,
        "seed": config.seed,
        "n_train": int(len(data.train_y)),
        "n_val": int(len(data.val_y)),
        "n_test": int(len(data.test_y)),
        "test_source": data.test_source,
        "epochs_run": int(len(history["loss"])),
        "seconds_per_epoch": main["seconds_per_epoch"],
        "input_size": config.input_size,
        "precision": precision,
        "rejected": len(data.rejected),
        **extra,
        "class_names": list(data.class_names),
        "phases": records,
        "history": history,
        "decode_seconds": data.decode_seconds,
        "rejected_files": [list(r) for r in data.rejected],
        "model_file": str(model_path),
        "curves_file": str(curves),
        "augmentation": AUGMENTATION if config.augment else None,
        "seeds": {"keras": config.seed, "split": config.seed, "augmentation": config.seed, "epoch_sampling": config.seed + 1},
        "config": _config_json(config),
        "versions": _package_versions(),
    }
    missing = [k for k in METRICS_KEYS if k not in metrics]
    if missing:  # a programming error, not a user error
        raise RuntimeError(f"metrics lack contract keys {missing}")
    metrics_path = out_dir / f"{name}.metrics.json"
    _write_json(metrics_path, metrics)
    print(
        f"{config.strategy()}: test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
        f"on {metrics['n_test']} images; {metrics['mode']}, {metrics['seconds_per_epoch']:.2f} s/epoch, "
        f"{metrics['epochs_run']} epochs, {len(data.rejected)} rejected -> {model_path}, {metrics_path.name}, {curves.name}"
    )
    return metrics


def _start(config):
    """Validation and everything cheap that can fail, before any decoding or training."""
    config.validate()
    listing, test_listing = _list_inputs(config)
    _prepare_out_dir(config.out_dir)
    n_images = len(listing) + (len(test_listing) if test_listing is not None else 0)
    pixel_bytes = _check_pixel_memory(config, n_images)
    precision = bb.resolve_precision(config.precision)
    import keras

    keras.utils.set_random_seed(config.seed)
    return listing, test_listing, pixel_bytes, precision


@dataclass
class Result:
    """What a run leaves in memory: ``net.full`` is the model saved to disk."""

    net: Network
    data: Data
    metrics: dict


def fit_finetune(config: FinetuneConfig) -> Result:
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
            or classes too small to split.
    """
    listing, test_listing, pixel_bytes, precision = _start(config)
    from pipeline.extraction.weights import resolve_weights

    weights = resolve_weights(config.weights, progress=not config.quiet)
    net = build_finetune_network(config, len(listing.class_names), precision, weights)
    data = load_data(config, listing, test_listing)
    t0 = time.perf_counter()
    copies, dtype, cache_bytes, why_plain = _cache_plan(net, data, config, pixel_bytes)
    cache = None
    cache_seconds = 0.0
    if copies:
        if not config.quiet:
            shape = "x".join(str(d) for d in net.prefix.outputs[0].shape[1:])
            print(f"caching the frozen prefix (up to {VGG16_LAYERS[net.cut - 1]}, {shape} {dtype.name}): "
                  f"{copies} cop{'ies' if copies > 1 else 'y'} of {len(data.train_y)} training + {len(data.val_y)} "
                  f"validation images = {_gb(cache_bytes)}", file=sys.stderr)
        cache = _build_cache(net, data, config, copies, dtype)
        cache_seconds = time.perf_counter() - t0
    elif not config.quiet:
        print(f"plain mode (no prefix cache): {why_plain}", file=sys.stderr)
    history, records = _train_phases(
        net, data, config, precision,
        {"head": config.head_epochs, "finetune": config.epochs},
        {"head": config.head_lr, "finetune": config.lr},
        cache,
    )
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
    return Result(net, data, _finish("finetune", net, data, config, precision, history, records, extra, train_seconds))


def run_finetune(config: FinetuneConfig) -> dict:
    """``fit_finetune`` for callers that need only the metrics (the stage entry point)."""
    return fit_finetune(config).metrics


def fit_scratch(config: ScratchConfig) -> Result:
    """Train the baseline CNN from random weights on the same splits and augmentation.

    Returns:
        Result: the network, the data and the metrics written to ``OUT_DIR/scratch.metrics.json``.

    Raises:
        PipelineError: as run_finetune (no weights involved).
    """
    listing, test_listing, _pixel_bytes, precision = _start(config)
    net = build_scratch_network(config, len(listing.class_names), precision)
    data = load_data(config, listing, test_listing)
    t0 = time.perf_counter()
    history, records = _train_phases(net, data, config, precision, {"train": config.epochs}, {"train": config.lr})
    train_seconds = data.decode_seconds + time.perf_counter() - t0
    extra = {"mode": "plain", "unfreeze_from": None, "filters": list(config.filters)}
    return Result(net, data, _finish("scratch", net, data, config, precision, history, records, extra, train_seconds))


def run_scratch(config: ScratchConfig) -> dict:
    """``fit_scratch`` for callers that need only the metrics (the stage entry point)."""
    return fit_scratch(config).metrics


# --------------------------------------------------------------------------- command line


def _add_data_flags(p, input_size: int, epochs: int, lr: float, dense: int, patience: int) -> None:
    p.add_argument("data_dir", type=Path, help="training images, one sub-folder per class")
    p.add_argument("--test", type=Path, default=None, metavar="TEST_DIR",
                   help=f"test images with the same class sub-folders (default: {TEST_SIZE:.0%} of DATA_DIR "
                        "via the shared seeded split, the rows train scores on)")
    p.add_argument("-o", "--output-dir", dest="out_dir", type=Path, default=DEFAULT_OUT_DIR,
                   help=f"folder for the model, metrics and curves (default {DEFAULT_OUT_DIR})")
    p.add_argument("--input-size", type=int, default=input_size, help=f"square input side (default {input_size})")
    p.add_argument("--dense", type=int, default=dense, help=f"units of the hidden dense layer (default {dense})")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout rate after the dense layer (default 0.5)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"maximum training epochs, early stopping (default {epochs})")
    p.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate (default {lr:g})")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--val-split", type=float, default=0.2, help="share of the training images for validation, stratified (default 0.2)")
    p.add_argument("--patience", type=int, default=patience, help=f"epochs without a better validation loss before stopping (default {patience})")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no random flip/translation/rotation/zoom of training images")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="compute precision; auto = fastest that keeps accuracy (default)")
    p.add_argument("--resize", default="bilinear", choices=RESIZE_METHODS, help="resize interpolation, as in extract (default bilinear)")
    p.add_argument("--seed", type=int, default=0, help="seed of Keras, the splits and the augmentation (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars; the summary line is still printed")


def add_finetune_parser(sub) -> None:
    """Register ``finetune`` on an argparse sub-parsers object."""
    p = sub.add_parser("finetune", help="fine-tune VGG16 + a new dense head on an image tree; writes finetune.keras/.metrics.json/.curves.png")
    _add_data_flags(p, input_size=224, epochs=10, lr=1e-5, dense=256, patience=3)
    p.add_argument("--unfreeze-from", default="block5_conv1", metavar="LAYER",
                   help="first VGG16 layer trained in phase 2 (any VGG16 layer name), none = frozen base + head only, "
                        "all = every layer (default block5_conv1)")
    p.add_argument("--head", default="flatten", choices=HEADS, help="flatten or global average pooling before the dense layer (default flatten)")
    p.add_argument("--head-epochs", type=int, default=5, help="phase 1 epochs (frozen base, head only; the only phase with --unfreeze-from none) (default 5)")
    p.add_argument("--head-lr", type=float, default=1e-3, help="phase 1 Adam learning rate (default 1e-3)")
    p.add_argument("--weights", default="imagenet", help="imagenet (default), none (random init) or a weights file PATH")
    p.add_argument("--cache-copies", type=int, default=4, metavar="K",
                   help="cache the frozen prefix's outputs for K augmented copies of each training image, so epochs run only the "
                        "trainable layers (default 4)")
    p.add_argument("--no-cache", dest="cache", action="store_false", help="plain Keras loop: full model, augmentation on the fly")


def add_scratch_parser(sub) -> None:
    """Register ``scratch`` on an argparse sub-parsers object."""
    p = sub.add_parser("scratch", help="train a small CNN from scratch on the same splits (baseline); writes scratch.keras/.metrics.json/.curves.png")
    _add_data_flags(p, input_size=64, epochs=30, lr=1e-3, dense=128, patience=5)


def _command_line(argv) -> str:
    return shlex.join(["python", "-m", "pipeline", *argv])


def run_finetune_cli(args, argv) -> int:
    """CLI entry: flags -> FinetuneConfig -> run_finetune; exit 0."""
    config = FinetuneConfig(
        data_dir=args.data_dir, test_dir=args.test, out_dir=args.out_dir, input_size=args.input_size,
        unfreeze_from=args.unfreeze_from, head=args.head, dense=args.dense, dropout=args.dropout,
        head_epochs=args.head_epochs, epochs=args.epochs, lr=args.lr, head_lr=args.head_lr,
        batch_size=args.batch_size, val_split=args.val_split, patience=args.patience, augment=args.augment,
        precision=args.precision, weights=args.weights, seed=args.seed, cache=args.cache,
        cache_copies=args.cache_copies, resize=args.resize, quiet=args.quiet, command_line=_command_line(argv),
    )
    run_finetune(config)
    return 0


def run_scratch_cli(args, argv) -> int:
    """CLI entry: flags -> ScratchConfig -> run_scratch; exit 0."""
    config = ScratchConfig(
        data_dir=args.data_dir, test_dir=args.test, out_dir=args.out_dir, input_size=args.input_size,
        dense=args.dense, dropout=args.dropout, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        val_split=args.val_split, patience=args.patience, augment=args.augment, precision=args.precision,
        seed=args.seed, resize=args.resize, quiet=args.quiet, command_line=_command_line(argv),
    )
    run_scratch(config)
    return 0
