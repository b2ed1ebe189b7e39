"""The ``finetune`` stage: a backbone (``--backbone``, VGG16 by default) fine-tuned on an image tree from a logistic-regression probe (LP-FT, the default) or from a dense head trained from random, with a cached frozen prefix for speed.

Data flow (``fit``)::

    list_images -> reader.iter_batches (parallel decode) -> uint8 arrays in memory
      -> split_indices (test, then validation)
      -> --head probe: the probe (--probe MODEL.joblib, checked, or fitted on the training
         rows' frozen features) as the head -> phase finetune (unfrozen suffix + head)
      -> --head dense: phase head (new head, frozen base) -> phase finetune
      -> full model on the test set -> OUT_DIR/finetune.{keras,metrics.json,curves.png}
         (and finetune.probe.joblib when the probe was fitted here)

Every phase keeps its best weights by validation loss, its start included: with a probe
head, fine-tuning is kept only where validation says it helped. The probe is described in
``nets.probe``, the network in ``nets.networks``, the cached-prefix and plain modes in
``nets.training``, the outputs in ``nets.results``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.classical.bundle import write_bundle
from pipeline.rows.pooling import POOLS
from pipeline.core import config as settings
from pipeline.core.command import Command
from pipeline.core.config import MAX_INT, Interval, OneOf, gigabytes, option
from pipeline.core.errors import PipelineError
from pipeline.core.guard import refuse_inside
from pipeline.nets.images import Data, load_data
from pipeline.backbones.registry import BACKBONE, BACKBONES
from pipeline.nets.networks import HEADS, UNFREEZE_SPECIAL, VGG16_LAYERS, Network, assemble, base_features, build_base, dense_head
from pipeline.nets.options import COUNT, COUNT_OR_ZERO, RATE, NetConfig
from pipeline.images.overlap import record_of, refuse_trained_on
from pipeline.nets.probe import feature_spec, fit_probe, load_probe, probe_layers
from pipeline.nets.results import Result, finish
from pipeline.nets.training import build_cache, cache_plan, locked_output, prepare_run, train_phases
from pipeline.nets.training import refit as train_refit


#: The fine-tuning learning rate of the classic recipe (dense head from random first), as in the seeds.
CLASSIC_LR = 1e-5
#: The probe fitted here, saved in the run's set (``--probe`` runs and dense heads have none).
PROBE_FILE = "finetune.probe.joblib"


@dataclass(frozen=True)
class FinetuneConfig(NetConfig):
    """Settings of ``python -m pipeline finetune`` (the data flags are ``NetConfig``'s).

    Attributes:
        backbone: the network (``backbone.BACKBONES``), with its own preprocessing, feature
            layer and default input size.
        input_size: square side the images are resized to; None = the backbone's default
            (224, inception_v3 299), filled in when the config is made.
        unfreeze_from: first backbone layer trained in phase ``finetune`` (InceptionV3 also
            takes its blocks ``mixedN``), ``none`` (head only, ``--head dense``) or ``all``;
            None = the backbone's last block (vgg16: ``block5_conv1``).
        head: ``probe`` (LP-FT: the logistic-regression probe is the head) or ``dense``
            (the classic head from random: Dense(dense, relu), Dropout, softmax).
        probe: a ``train --model lr`` bundle to start from (its feature specification must be
            this run's); None = fit the probe here, on the training rows only.
        pool: ``flatten``, ``avg`` or ``max`` before the head (``train --pool``).
        dense: units of the dense head's hidden layer.
        head_epochs, head_lr: phase ``head`` of the dense head (frozen base, new head), Adam.
        epochs, lr: phase ``finetune`` (unfrozen suffix + head), Adam; at most ``epochs``, early stopping.
        patience: epochs without a lower validation loss before stopping (best weights restored).
        weights: ``imagenet``, ``none`` (random init, for tests) or a weights file path.
        cache: cache the frozen prefix's outputs (``cached-prefix`` mode) when it has layers.
        cache_copies: augmented copies of each training image in the cache.
        prefix_cache: folder of the frozen prefix's outputs for the test images (with
            ``--test``), shared by the runs that have the same prefix (compare passes one).
    """

    backbone: str = option(BACKBONE, "network: " + ", ".join(BACKBONES) + " (only vgg16 has the offline weights route)", rule=OneOf(tuple(BACKBONES)))
    input_size: int | None = option(
        None, "square input side; none = the backbone's default (224, inception_v3 299)", rule=Interval(int, 32, MAX_INT),
        message=f"every backbone needs at least 32 pixels (a whole number in [32, {MAX_INT}])",
    )
    unfreeze_from: str | None = option(
        None,
        "first backbone layer fine-tuned (a layer name of the backbone; inception_v3 also mixed1..mixed10), "
        "none = frozen base + dense head only, all = every layer; the default is the backbone's last block ("
        + ", ".join(f"{b.name}: {b.unfreeze_from}" for b in BACKBONES.values()) + ")",
        metavar="LAYER", shown="the backbone's last block",
    )
    head: str = option(
        "probe", "probe = LP-FT, start from the logistic-regression probe; dense = the classic dense head trained from random first", rule=OneOf(HEADS)
    )
    probe: Path | None = option(
        None, "a `train --model lr` bundle to start from (same input size, resize, weights, pooling); none = fit it on the training rows", metavar="MODEL.joblib"
    )
    pool: str = option("flatten", "pooling before the head, as train --pool", rule=OneOf(POOLS))
    dense: int = option(256, "units of the dense head's hidden layer", rule=COUNT)
    head_epochs: int = option(5, "--head dense: epochs of the new head on the frozen base (the probe is fitted instead)", rule=COUNT_OR_ZERO)
    epochs: int = option(10, "maximum training epochs, early stopping", rule=COUNT_OR_ZERO)
    # 3e-5: lowest validation loss over the plateau of LP-FT runs at 1e-5, 3e-5 and 1e-4 (docs/results.md)
    lr: float = option(3e-5, "fine-tuning Adam learning rate (chosen on validation rows for LP-FT; compare's classic dense-head row uses 1e-5)", rule=RATE)
    head_lr: float = option(1e-3, "--head dense: Adam learning rate of the new head on the frozen base", rule=RATE)
    patience: int = option(3, "epochs without a better validation loss before stopping", rule=COUNT_OR_ZERO)
    weights: str = option("imagenet", "imagenet, none (random init) or a weights file PATH")
    cache: bool = option(True, "plain Keras loop: full model, augmentation on the fly")
    prefix_cache: Path | None = option(
        None, "folder keeping the frozen prefix's outputs for the --test images, reused by runs with the same prefix and test images", metavar="DIR"
    )
    cache_copies: int = option(
        4,
        "cache the frozen prefix's outputs for K augmented copies of each training image, so epochs run only the trainable layers",
        rule=COUNT,
        message=f"must be at least 1 (a whole number in [1, {MAX_INT}])",
        metavar="K",
    )

    def __post_init__(self):
        # none: the backbone's own default, resolved once, where the config is made.
        spec = BACKBONES.get(self.backbone)
        if spec is not None and self.input_size is None:
            object.__setattr__(self, "input_size", spec.input_size)
        if spec is not None and self.unfreeze_from is None:
            object.__setattr__(self, "unfreeze_from", spec.unfreeze_from)

    def validate(self) -> "FinetuneConfig":
        """Check every value; return self. (Other backbones' layer names are checked on the built network, before the weights load.)

        Raises:
            PipelineError: ``--flag value: ...`` naming the flag and the rule broken.
        """
        settings.validate(self)
        least = BACKBONES[self.backbone].min_size
        if self.input_size < least:
            raise PipelineError(f"--input-size {self.input_size}: {self.backbone} needs at least {least} pixels")
        if self.backbone == BACKBONE and self.unfreeze_from not in VGG16_LAYERS + UNFREEZE_SPECIAL:
            raise PipelineError(
                f"--unfreeze-from {self.unfreeze_from}: not a VGG16 layer; choose none, all or one of " + ", ".join(VGG16_LAYERS)
            )
        if self.head == "probe":
            if self.unfreeze_from == "none":
                raise PipelineError("--unfreeze-from none with --head probe: nothing would be fine-tuned (the frozen base + probe is `train --model lr`)")
            if self.epochs < 1:
                raise PipelineError("--epochs 0 with --head probe: nothing would be fine-tuned")
        elif self.probe is not None:
            raise PipelineError(f"--probe {self.probe}: needs --head probe (the dense head starts from random)")
        if self.probe is not None and not Path(self.probe).is_file():
            raise PipelineError(f"--probe {self.probe}: no such file; write one with `train --model lr`")
        if self.head == "dense" and self.unfreeze_from == "none" and self.head_epochs < 1:
            raise PipelineError("--head-epochs 0 with --unfreeze-from none: nothing would be trained")
        if self.head == "dense" and self.head_epochs + self.epochs < 1:
            raise PipelineError("--head-epochs 0 and --epochs 0: nothing would be trained")
        self.check_folders()
        return self

    def strategy(self) -> str:
        if self.unfreeze_from == "none":
            return "frozen base + dense head" + (f" ({self.backbone})" if self.backbone != BACKBONE else "")
        where = "all layers" if self.unfreeze_from == "all" else f"from {self.unfreeze_from}"
        if self.backbone != BACKBONE:
            where = f"{self.backbone}, {where}"
        return f"LP-FT ({where})" if self.head == "probe" else f"finetune, dense head from random ({where})"


def build_network(config: FinetuneConfig, n_classes: int, precision: str, weights=None, probe=None) -> Network:
    """The network of ``config`` (seeded: the same config builds the same start).

    ``probe`` is the fitted probe estimator for ``--head probe`` (ignored for ``dense``).
    """
    base = build_base(
        input_size=config.input_size, unfreeze_from=config.unfreeze_from, precision=precision, seed=config.seed, weights=weights, backbone=config.backbone
    )
    return _on_base(config, base, n_classes, precision, probe)


def _on_base(config: FinetuneConfig, base, n_classes: int, precision: str, probe) -> Network:
    if config.head == "probe":
        layers = probe_layers(probe, config.pool, n_classes, path=config.probe or "probe")
    else:
        layers = dense_head(n_classes, pool=config.pool, dense=config.dense, dropout=config.dropout, precision=precision, seed=config.seed)
    return assemble(base, layers, input_size=config.input_size, unfreeze_from=config.unfreeze_from, head_phase=config.head == "dense",
                    fitted_start=config.head == "probe")  # fmt: skip


def _probe(config: FinetuneConfig, bundle, features, labels, data, precision: str, spec: dict):
    """(estimator, metrics section, bundle to write as ``PROBE_FILE`` or None) of the probe: the ``--probe`` bundle, or one fitted here on ``features`` (the rows it may see)."""
    if bundle is not None:
        fitted = bundle.get("metrics") or {}
        return bundle["estimator"], {"source": str(config.probe), "n_train": fitted.get("n_train"), "best_params": fitted.get("best_params"),
                                     "cv_score": fitted.get("cv_score"), "pool": config.pool, "file": str(config.probe)}, None  # fmt: skip
    t0 = time.perf_counter()
    if not config.quiet:
        print(f"probe: logistic regression (train's search) on the frozen features of {len(labels)} images", file=sys.stderr)
    probe = fit_probe(features, labels, class_names=data.class_names, spec=spec, precision=precision, seed=config.seed,
                      quiet=config.quiet, where=str(config.data_dir))  # fmt: skip
    path = Path(config.out_dir) / PROBE_FILE
    return probe.estimator, {**probe.info, "file": str(path), "seconds": round(time.perf_counter() - t0, 3)}, probe.bundle


def _test_features(config: FinetuneConfig, net: Network, data, precision: str, weights, test_digest: str | None):
    """The frozen prefix's outputs for the test images, shared through ``--prefix-cache`` (None without it, or without a prefix)."""
    if config.prefix_cache is None or net.cut == 0 or test_digest is None:
        return None, None
    import tensorflow as tf

    from pipeline.core.digests import load_or_compute

    def compute():  # no augmentation, in order
        step = config.batch_size
        return np.concatenate([net.prefix(tf.cast(data.test_x[s : s + step], tf.float32), training=False).numpy() for s in range(0, len(data.test_y), step)])

    out = net.prefix.outputs[0]
    fields = {"backbone": config.backbone, "weights": weights.checksum, "input_size": config.input_size, "resize": config.resize,
              "cut_layer": net.cut_layer, "precision": precision, "test_images": test_digest, "seed": config.seed if weights.name == "none" else None}  # fmt: skip
    dtype = tf.as_dtype(out.dtype).as_numpy_dtype
    x, reused = load_or_compute(config.prefix_cache, fields, (len(data.test_y), *out.shape[1:]), dtype,
                                compute)  # fmt: skip
    return x, {"folder": str(config.prefix_cache), "reused": reused, "cut_layer": net.cut_layer}


def fit(config: FinetuneConfig, listed=None) -> Result:
    """Fine-tune the backbone on ``config.data_dir`` and score it on the test set.

    ``--head probe`` (LP-FT): the probe (``--probe`` or fitted here on the training rows'
    frozen features) is the head; phase ``finetune`` unfreezes the layers from
    ``unfreeze_from`` on and trains them with the head at ``lr``. ``--head dense``: phase
    ``head`` trains a new head on the frozen base (``head_lr``), then phase ``finetune``
    (skipped for ``none``). Every phase stops early on the validation loss and keeps the
    best weights, its start included. With ``refit`` (the default) the network is then
    built again from its start (the probe fitted on the training + validation rows) and
    trained on all those rows for the epochs validation chose in each phase: that is the
    model saved and scored (``listed``: as ``prepare_run``'s).

    Returns:
        Result: the trained network, the data and the metrics written to
        ``OUT_DIR/finetune.metrics.json`` (keys: METRICS_KEYS and more).

    Raises:
        PipelineError: bad settings, a bad data or test folder (different classes), an
            unwritable output folder, images over the memory budget, unusable weights,
            a ``--probe`` bundle that does not match, or too few images to split.
    """
    listing, test_listing, pixel_bytes, precision = prepare_run(config, listed)
    from pipeline.backbones.weights import resolve_weights

    weights = resolve_weights(config.weights, backbone=config.backbone, progress=not config.quiet)
    spec = feature_spec(input_size=config.input_size, resize=config.resize, weights=weights, pool=config.pool, backbone=config.backbone)
    bundle = load_probe(config.probe, spec, listing.class_names) if config.probe is not None else None

    def start_base():  # seeded: the refit starts exactly where the selection started
        return build_base(input_size=config.input_size, unfreeze_from=config.unfreeze_from, precision=precision, seed=config.seed, weights=weights,
                          backbone=config.backbone)  # fmt: skip

    base = start_base()
    digest = {"train": listing.content_digest(), "test": None if test_listing is None else test_listing.content_digest()}  # before reading (compare key)
    data = load_data(listing, test_listing, input_size=config.input_size, resize=config.resize, val_split=config.val_split, seed=config.seed, quiet=config.quiet)
    if bundle is not None:  # a probe fitted on the test images would be scored on what it learnt
        refuse_trained_on(bundle.get("training_images"), test_listing or listing, data.test_paths, config.allow_overlap, f"the --probe bundle {config.probe}")
    every = data.all_rows() if config.refit else None
    n_train = len(data.train_y)
    t0 = time.perf_counter()
    features = None
    if config.head == "probe" and bundle is None:  # the frozen features of every row the probes may see, computed once
        if not config.quiet:
            print(f"probe: frozen features of {len((every or data).train_y)} images", file=sys.stderr)
        features = base_features(base, (every or data).train_x, config.batch_size)
    probe_rows = None if features is None else features[:n_train].copy()  # fit_probe scales its rows in place
    estimator, probe_info, probe_file = _probe(config, bundle, probe_rows, data.train_y, data, precision, spec) if config.head == "probe" else (None, None, None)
    net = _on_base(config, base, len(listing.class_names), precision, estimator)
    t_cache = time.perf_counter()
    # with a refit, the cache holds every row's augmented copies: the selection trains on the first n_train of them
    source = data if every is None else Data(data.class_names, every.train_x, every.train_y, data.val_x, data.val_y, data.test_x, data.test_y, data.test_source)
    copies, dtype, cache_bytes, why_plain = cache_plan(net, source, cache=config.cache, cache_copies=config.cache_copies, augment=config.augment, pixel_bytes=pixel_bytes)
    cache, cache_seconds = None, 0.0
    if copies:
        if not config.quiet:
            shape = "x".join(str(d) for d in net.prefix.outputs[0].shape[1:])
            print(f"caching the frozen prefix (up to {net.cut_layer}, {shape} {dtype.name}): "
                  f"{copies} cop{'ies' if copies > 1 else 'y'} of {len(source.train_y)} training + {len(source.val_y)} "
                  f"validation images = {gigabytes(cache_bytes)}", file=sys.stderr)  # fmt: skip
        cache = build_cache(net, source, copies, dtype, augment=config.augment, seed=config.seed, batch_size=config.batch_size, quiet=config.quiet)
        cache_seconds = time.perf_counter() - t_cache
    elif not config.quiet:
        print(f"plain mode (no prefix cache): {why_plain}", file=sys.stderr)
    plan = {"head": (config.head_epochs, config.head_lr), "finetune": (config.epochs, config.lr)}
    common = dict(precision=precision, batch_size=config.batch_size, patience=config.patience, augment=config.augment, seed=config.seed, quiet=config.quiet)
    history, records = train_phases(net, data, plan, cache=None if cache is None else (cache[0][:, :n_train], cache[1]), **common)
    refit = None
    if config.refit:
        def rebuilt():
            nonlocal estimator, probe_info, probe_file  # the saved probe is the refit's
            if config.head == "probe":
                estimator, probe_info, probe_file = _probe(config, bundle, features, every.train_y, data, precision, spec)
            return _on_base(config, start_base(), len(listing.class_names), precision, estimator)

        del net
        net, refit = train_refit(rebuilt, data, records, plan, history, cache=None if cache is None else (cache[0], cache[1][:0]), **common)
    features = cache = None  # the refit is done: free the frozen features and the cache before the test evaluation
    train_seconds = data.decode_seconds + time.perf_counter() - t0
    test_features, prefix_info = _test_features(config, net, data, precision, weights, digest["test"])
    head = next((r for r in records if r["name"] == "head"), None)
    extra = {
        "mode": "cached-prefix" if copies else "plain",
        "backbone": config.backbone,
        "unfreeze_from": config.unfreeze_from,
        "head": config.head,
        "pool": config.pool,
        "probe": probe_info,
        "refit": refit,
        "cache_copies": copies,
        "cache_bytes": cache_bytes if copies else 0,
        "cache_seconds": cache_seconds,
        "cache_layer": net.cut_layer if copies else None,
        "plain_reason": why_plain or None,
        "seconds_per_epoch_head": head["seconds_per_epoch"] if head else None,
        "weights": {"name": weights.name, "source": weights.source, "checksum": weights.checksum},
        "test_prefix": prefix_info,
        "data_digest": digest,
    }
    if probe_file is not None:  # the images it may have been fitted on, for evaluate's overlap rule
        probe_file["training_images"] = record_of(listing, data.test_paths if test_listing is None else ())
    files = {PROBE_FILE: None if probe_file is None else (lambda path: write_bundle(path, probe_file))}  # None: a previous run's probe goes
    return Result(net, data, finish("finetune", net, data, config, precision, history, records, extra, train_seconds, test_features, files))


def run(config: FinetuneConfig) -> dict:
    """``python -m pipeline finetune``: fine-tune under ``finetune.keras``'s lock, publish ``finetune.keras``, ``.curves.png``, ``.probe.joblib``
    (a probe fitted here) and ``.metrics.json`` as one set; the metrics. Errors as ``fit``'s; a second run on one ``-o`` is refused."""
    if config.prefix_cache is not None:  # checked before the training, not when it is first written (a file there was a traceback after it)
        if Path(config.prefix_cache).exists() and not Path(config.prefix_cache).is_dir():
            raise PipelineError(f"--prefix-cache {config.prefix_cache}: exists and is not a folder; the cache needs a folder of its own")
        refuse_inside(config.prefix_cache, [("the training images", config.data_dir), ("the test images", config.test_dir)], "choose another --prefix-cache")
    with locked_output(config, "finetune", (PROBE_FILE,), [("the --probe bundle", config.probe)]) as listed:
        return fit(config, listed).metrics


COMMAND = Command("finetune", FinetuneConfig, run, "fine-tune VGG16 (or --backbone) on an image tree from a logistic-regression probe (LP-FT) or a new dense head; writes finetune.keras/.metrics.json/.curves.png")
