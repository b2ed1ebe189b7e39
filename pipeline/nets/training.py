"""Training of the nets stages: the checks before any work, batches from memory, the cached-prefix plan and cache, and the phased Keras training loop.

"cached-prefix" mode runs the frozen prefix once per augmented copy of every training
image (``cache_copies``) and once for the validation images, then trains only ``top`` on
those cached tensors (each epoch draws one copy per image). "plain" mode (no cache, a
prefix without backbone layers, or a cache over the memory budget) trains the whole chain
with augmentation on the fly.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import math
import sys
import time

import numpy as np

from pipeline.core.guard import refuse_inputs_as_outputs, refuse_inside
from pipeline.core.outputs import OutputLock, prepare_output_dir
from pipeline.core.outputsets import check_members, settle
from pipeline.core.signals import stop_if_terminated
from pipeline.backbones.network import resolve_precision
from pipeline.images.overlap import list_inputs
from pipeline.core.config import gigabytes
from pipeline.nets.images import Data, check_pixel_memory, memory_budget
from pipeline.nets.networks import Network, apply_layers, augmentation_layers
from pipeline.nets.options import NetConfig
from pipeline.nets.results import set_files


@contextmanager
def locked_output(config: NetConfig, name: str, own_files: tuple[str, ...] = (), inputs=()):
    """The output folder, never inside the images read, locked for the run, a set a killed run left finished and its files (``set_files(name)``
    and ``own_files``) checked replaceable (``core.outputsets``) and never one of ``inputs`` ((what, path): --probe); settings and folders first."""
    config.validate()
    listed = list_inputs(config.data_dir, config.test_dir, config.allow_overlap)  # bad folders fail before an output folder is made
    refuse_inside(config.out_dir, [("the training images", config.data_dir), ("the test images", config.test_dir)], "choose another -o folder")
    refuse_inputs_as_outputs([Path(config.out_dir) / m for m in set_files(name, own_files)], [(w, p) for w, p in inputs if p], "choose another -o folder")
    with OutputLock(prepare_output_dir(config.out_dir) / f"{name}.keras"):
        settle(config.out_dir, name, locked=True)
        check_members(config.out_dir, name, set_files(name, own_files))
        yield listed


def prepare_run(config: NetConfig, listed=None):
    """Validation and everything cheap that can fail, before any decoding or training (``listed``: ``locked_output``'s listings; None: list here).

    Returns:
        (listing, test listing or None, bytes of the decoded pixels, resolved precision).

    Raises:
        PipelineError: bad settings, a bad data or test folder, an unwritable output
            folder, or images over the memory budget.
    """
    listing, test_listing = listed or list_inputs(config.validate().data_dir, config.test_dir, config.allow_overlap)
    prepare_output_dir(config.out_dir)
    # a refit holds the training images twice: split for the selection, joined for the refit
    n_images = len(listing) * (2 if config.refit else 1) + (len(test_listing) if test_listing is not None else 0)
    pixel_bytes = check_pixel_memory(config.data_dir, n_images, config.input_size)
    precision = resolve_precision(config.precision)
    import keras

    keras.utils.set_random_seed(config.seed)
    return listing, test_listing, pixel_bytes, precision


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator | None = None, copies: bool = False):
    """A tf.data pipeline of (x, y) batches from in-memory arrays, prefetched.

    With ``rng`` every epoch (every new iterator) is a fresh permutation; with ``copies``
    ``x`` is (K, n, ...) and every epoch takes one of the K copies of each row: each row
    walks through its copies in its own random order, so no copy of a row comes back
    before all K were seen (K epochs see every augmented copy once).
    """
    import tensorflow as tf

    n = len(y)
    n_copies = x.shape[0] if copies else 1
    row_shape = x.shape[2:] if copies else x.shape[1:]
    walk = {"orders": None, "epoch": 0}

    def next_copies():
        k = walk["epoch"] % n_copies
        if k == 0:  # a new round: every row's copies in a fresh random order
            walk["orders"] = rng.permuted(np.tile(np.arange(n_copies), (n, 1)), axis=1) if rng is not None else np.tile(np.arange(n_copies), (n, 1))
        walk["epoch"] += 1
        return walk["orders"][:, k]

    def gen():
        order = rng.permutation(n) if rng is not None else np.arange(n)
        pick = next_copies() if copies else None
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            yield (x[pick[idx], idx] if copies else x[idx]), y[idx]

    spec = (tf.TensorSpec((None, *row_shape), tf.as_dtype(x.dtype)), tf.TensorSpec((None,), tf.int32))
    ds = tf.data.Dataset.from_generator(gen, output_signature=spec)
    ds = ds.apply(tf.data.experimental.assert_cardinality(math.ceil(n / batch_size)))
    return ds.prefetch(tf.data.AUTOTUNE)


def optimizer(lr: float, precision: str, base=None):
    """Adam at ``lr`` (or ``base``, an optimizer the stage built); with loss scaling for float16, whose gradients underflow without it."""
    import keras

    opt = base if base is not None else keras.optimizers.Adam(learning_rate=lr)
    if precision == "float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def _stop_on_signal():
    """A callback that raises, at the next batch, a SIGTERM or Ctrl-C that Keras or tf.data swallowed (``core.signals``)."""
    import keras

    return keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: stop_if_terminated())


def _verbose(quiet: bool):
    return 0 if quiet else 1 if sys.stdout.isatty() else 2


def cache_plan(net: Network, data: Data, *, cache: bool, cache_copies: int, augment: bool, pixel_bytes: int):
    """(copies, dtype, bytes, why-not) of the prefix cache; copies 0 = plain mode.

    The cache holds ``cache_copies`` augmented copies of each training image (one without
    augmentation) and the validation images; it must fit in the memory budget left after
    the ``pixel_bytes`` of decoded pixels.
    """
    if not cache:
        return 0, None, 0, "--no-cache"
    if net.cut == 0:
        return 0, None, 0, "the frozen prefix has no backbone layer (--unfreeze-from all or the first layer)"
    import tensorflow as tf

    out = net.prefix.outputs[0]
    dtype = np.dtype(tf.as_dtype(out.dtype).as_numpy_dtype)
    copies = cache_copies if augment else 1
    per_image = int(np.prod(out.shape[1:])) * dtype.itemsize
    need = (copies * len(data.train_y) + len(data.val_y)) * per_image
    budget = memory_budget() - pixel_bytes
    if need > budget:
        return 0, None, need, (f"the cache ({copies} copies x {len(data.train_y)} + {len(data.val_y)} images x "
                               f"{per_image / 1e6:.2f} MB = {gigabytes(need)}) exceeds the memory budget ({gigabytes(budget)} left)")  # fmt: skip
    return copies, dtype, need, ""


def build_cache(net: Network, data: Data, copies: int, dtype, *, augment: bool, seed: int, batch_size: int, quiet: bool):
    """Prefix outputs: (copies, n_train, ...) of augmented training images and (n_val, ...) of validation images."""
    import tensorflow as tf
    from pipeline.core.progress import progress

    prefix = net.prefix
    aug = augmentation_layers(seed) if augment else []

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
    n, bs = len(data.train_y), batch_size
    train = np.empty((copies, n, *shape), dtype)
    val = np.empty((len(data.val_y), *shape), dtype)
    total = copies * n + len(data.val_y)
    with progress(total, f"cache {copies}x", quiet=quiet) as bar:
        for k in range(copies):
            fn = augmented if aug else clean
            for s in range(0, n, bs):
                train[k, s : s + bs] = fn(data.train_x[s : s + bs]).numpy()
                bar.update(min(bs, n - s))
        for s in range(0, len(val), bs):
            val[s : s + bs] = clean(data.val_x[s : s + bs]).numpy()
            bar.update(min(bs, len(val) - s))
    return train, val


def _training_model(net: Network, data: Data, cache, *, augment: bool, seed: int, batch_size: int):
    """The model ``fit`` runs and its (train, validation) datasets.

    A wrapper around ``net.top`` is compiled, never ``top`` itself, so the saved model
    carries no optimizer state.
    """
    import keras

    rng = np.random.default_rng(seed + 1)
    if cache is not None:
        features = keras.Input(net.top.inputs[0].shape[1:], dtype=net.top.inputs[0].dtype, name="cached_prefix_output")
        model = keras.Model(features, net.top(features), name="train_model")
        return model, batches(cache[0], data.train_y, batch_size, rng, copies=True), batches(cache[1], data.val_y, batch_size)
    pixels = keras.Input(data.train_x.shape[1:], dtype="uint8", name="pixels")
    x = keras.layers.Rescaling(1.0, dtype="float32", name="to_float")(pixels)
    if augment:
        x = apply_layers(augmentation_layers(seed), x)
    if net.prefix is not None:
        x = net.prefix(x, training=False)
    model = keras.Model(pixels, net.top(x), name="train_model")
    return model, batches(data.train_x, data.train_y, batch_size, rng), batches(data.val_x, data.val_y, batch_size)


def keep_best(patience: int, start_loss: float, start_weights: list):
    """A Keras callback: early stopping on the validation loss whose first candidate is the phase's start.

    Keras's ``EarlyStopping`` only weighs the epochs it ran; here the weights the phase
    starts from (for LP-FT, the probe) are epoch 0, so a phase whose epochs never lower the
    validation loss ends exactly where it started. It stops after ``patience`` epochs
    without a lower loss (at least one), then restores the best weights; ``best_epoch`` is
    0 when the start was kept.
    """
    import keras

    class KeepBest(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.patience = max(int(patience), 1)
            self.best, self.best_weights, self.best_epoch, self.wait = float(start_loss), start_weights, 0, 0

        def on_epoch_end(self, epoch, logs=None):
            loss = float((logs or {}).get("val_loss", math.nan))
            if loss < self.best:  # NaN is never better
                self.best, self.best_epoch, self.wait = loss, epoch + 1, 0
                self.best_weights = self.model.get_weights()
                return
            self.wait += 1
            if self.wait >= self.patience:
                self.model.stop_training = True

        def on_train_end(self, logs=None):
            self.model.set_weights(self.best_weights)

    return KeepBest()


def train_phases(net: Network, data: Data, plan: dict, *, precision: str, batch_size: int, patience: int, augment: bool, seed: int, quiet: bool, cache=None,
                 make_optimizer=None, validate: bool = True, schedule: dict | None = None):
    """Run the phases of ``net`` in order; each stops early on the validation loss and keeps its best weights, its start included.

    Args:
        net: the network; ``net.phases`` names the layers trainable in each phase.
        data: the decoded images and their splits.
        plan: phase name -> (maximum epochs, Adam learning rate); a phase with 0 epochs is skipped.
        precision: the resolved precision (float16 gets loss scaling).
        batch_size, patience, augment, seed, quiet: as the stage's flags.
        cache: (train, val) prefix outputs from ``build_cache``, or None for plain mode.
        make_optimizer: ``(lr, epochs, steps_per_epoch) -> optimizer`` for each phase (e.g.
            SGD over a step schedule); None = Adam at the phase's learning rate.
        validate: False for a refit: every phase runs exactly its epochs, on every row of
            ``data.train_*``, without validation, early stopping or a kept start.
        schedule: phase name -> the epochs its optimizer's schedule spans (a refit runs the
            first epochs of the selection's schedule); None = the phase's epochs.

    Returns:
        (history, records): per-epoch ``loss``/``accuracy``/``val_loss``/``val_accuracy``/``phase``
        across the phases (with a fitted start, epoch 0 is phase ``probe``: its validation
        scores, no training loss), and one record per phase run (epochs, best epoch (0 =
        the start was kept), the start's validation scores, timings...).
    """
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._t)

    model, train_ds, val_ds = _training_model(net, data, cache, augment=augment, seed=seed, batch_size=batch_size)
    history: dict[str, list] = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": [], "phase": []}
    records = []
    top_layers = [l for l in net.top.layers if not isinstance(l, keras.layers.InputLayer)]
    for name, trainable in net.phases:
        epochs, lr = plan[name]
        if epochs < 1:
            continue
        chosen = {id(l) for l in trainable}
        for layer in top_layers:
            layer.trainable = id(layer) in chosen
        span = (schedule or {}).get(name, epochs)
        base = make_optimizer(lr, span, math.ceil(len(data.train_y) / batch_size)) if make_optimizer else None
        model.compile(optimizer=optimizer(lr, precision, base), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        if not validate:
            records.append(_fixed_phase(model, train_ds, name, epochs, lr, history, quiet))
            continue
        start = model.evaluate(val_ds, verbose=0, return_dict=True)
        if net.fitted_start and not records:
            for key, value in (("loss", math.nan), ("accuracy", math.nan), ("val_loss", start["loss"]), ("val_accuracy", start["accuracy"]), ("phase", "probe")):
                history[key].append(value if key == "phase" else float(value))
        timer = EpochTimer()
        keep = keep_best(patience, start["loss"], model.get_weights())
        if not quiet:
            print(f"phase {name}: {epochs} epochs at most, lr {lr:g}, "
                  f"{sum(int(np.prod(w.shape)) for w in model.trainable_weights)} trainable parameters; "
                  f"start: val_loss {start['loss']:.4f}, val_accuracy {start['accuracy']:.4f}", file=sys.stderr)  # fmt: skip
        h = model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=[timer, keep, _stop_on_signal()], shuffle=False, verbose=_verbose(quiet))
        n = len(h.history["loss"])
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            history[key] += [float(v) for v in h.history.get(key, [math.nan] * n)]
        history["phase"] += [name] * n
        records.append({
            "name": name,
            "epochs_run": n,
            "best_epoch": keep.best_epoch,
            "best_val_loss": keep.best,
            "start_val_loss": float(start["loss"]),
            "start_val_accuracy": float(start["accuracy"]),
            "lr": lr,
            "trainable_params": int(sum(int(np.prod(w.shape)) for w in model.trainable_weights)),
            "epoch_seconds": [round(t, 3) for t in timer.seconds],
            "seconds_per_epoch": float(np.mean(timer.seconds)) if timer.seconds else 0.0,
        })  # fmt: skip
    for layer in top_layers:  # leave the saved model in its natural state: head and suffix trainable
        layer.trainable = True
    return history, records


def _fixed_phase(model, train_ds, name: str, epochs: int, lr: float, history: dict, quiet: bool) -> dict:
    """One phase of a refit: exactly ``epochs`` epochs on every row, no validation; its record (``best_epoch`` = ``epochs``)."""
    t0 = time.perf_counter()
    if not quiet:
        print(f"refit phase {name}: {epochs} epochs (chosen on validation), lr {lr:g}", file=sys.stderr)
    h = model.fit(train_ds, epochs=epochs, callbacks=[_stop_on_signal()], shuffle=False, verbose=_verbose(quiet))
    seconds = time.perf_counter() - t0
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "phase"):
        history[key] += [f"refit {name}"] * epochs if key == "phase" else [float(v) for v in h.history.get(key, [math.nan] * epochs)]
    return {"name": name, "epochs_run": epochs, "best_epoch": epochs, "lr": lr, "seconds": round(seconds, 3),
            "seconds_per_epoch": seconds / epochs, "trainable_params": int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))}  # fmt: skip


def refit(build, data: Data, records: list, plan: dict, history: dict, **train_options) -> tuple[Network, dict]:
    """The refit: ``build()`` (seeded again: the selection's start) trained on every training and validation row of ``data`` for the
    epochs the validation loss chose in each phase of ``plan`` (the selection's; a schedule keeps its length), its epochs appended
    to the selection's ``history``; ``train_options`` as ``train_phases``'. Returns (the network, the metrics' ``refit`` section).
    """
    import keras

    chosen = {r["name"]: int(r["best_epoch"]) for r in records}
    every, t0 = data.all_rows(), time.perf_counter()
    keras.utils.set_random_seed(train_options["seed"])
    net = build()
    again, done = train_phases(net, every, {name: (chosen.get(name, 0), lr) for name, (_, lr) in plan.items()}, validate=False,
                               schedule={name: epochs for name, (epochs, _) in plan.items()}, **train_options)  # fmt: skip
    for key, values in again.items():  # the curves run on: selection, then the refit (no validation scores)
        history[key] += values
    return net, {"chosen_epochs": chosen, "n_train": int(len(every.train_y)), "chosen_on": f"{len(data.val_y)} validation rows",
                 "phases": done, "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
