"""Training: batches from memory, the cached-prefix plan and its reasons for plain mode, phases that are skipped or run and keep their best weights, their start included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.nets import training
from pipeline.nets.images import Data
from pipeline.nets.finetune import FinetuneConfig, build_network
from pipeline.nets.networks import build_scratch_network
from pipeline.nets.training import batches, build_cache, cache_plan, train_phases


def fake_data(n_train=6, n_val=2, size=32, seed=0):
    rng = np.random.default_rng(seed)
    x = lambda n: rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)  # noqa: E731
    y = lambda n: (np.arange(n) % 2).astype(np.int32)  # noqa: E731
    return Data(("a", "b"), x(n_train), y(n_train), x(n_val), y(n_val), x(2), y(2), "fake")


def test_batches_cover_every_row_once_per_epoch():
    x = np.arange(7, dtype=np.float32).reshape(7, 1)
    ds = batches(x, np.arange(7, dtype=np.int32), 4, np.random.default_rng(0))
    sizes = [len(b[1]) for b in ds]
    assert sizes == [4, 3]
    seen = np.concatenate([b[1].numpy() for b in ds])
    assert sorted(seen.tolist()) == list(range(7))


def test_cached_batches_draw_one_copy_of_each_row_and_every_copy_once_in_k_epochs():
    n, k = 5, 3
    x = np.stack([np.arange(n) + 100 * c for c in range(k)]).astype(np.float32).reshape(k, n, 1)
    ds = batches(x, np.arange(n, dtype=np.int32), 2, np.random.default_rng(1), copies=True)
    seen = {i: [] for i in range(n)}
    for _ in range(2 * k):  # two rounds of k epochs
        for xb, yb in ds:
            for v, i in zip(xb.numpy().ravel().tolist(), yb.numpy().tolist()):
                assert int(v) % 100 == i  # the row's own copy
                seen[i].append(int(v) // 100)
    for copies in seen.values():
        assert sorted(copies[:k]) == sorted(copies[k:]) == list(range(k))
    assert len({tuple(c) for c in seen.values()}) > 1  # each row walks its copies in its own order


def finetune_net(unfreeze_from: str, pool: str = "flatten"):
    """The finetune stage's network with a small dense head, seeded random weights."""
    config = FinetuneConfig(Path("d"), input_size=32, unfreeze_from=unfreeze_from, head="dense", pool=pool, dense=4, dropout=0.0, weights="none")
    return build_network(config, 2, "float32")


@pytest.fixture(scope="module")
def net():
    return finetune_net("block5_conv1")


def test_cache_plan_sizes_and_reasons(net, monkeypatch):
    data = fake_data()
    plan = dict(cache=True, cache_copies=3, augment=True, pixel_bytes=0)
    copies, dtype, need, why = cache_plan(net, data, **plan)
    # the prefix ends at block4_pool: 2x2x512 float32 per image, 3 copies of 6 training + 2 validation images
    assert (copies, dtype, why) == (3, np.float32, "") and need == (3 * 6 + 2) * 2 * 2 * 512 * 4
    assert cache_plan(net, data, **dict(plan, augment=False))[0] == 1
    assert cache_plan(net, data, **dict(plan, cache=False)) == (0, None, 0, "--no-cache")
    monkeypatch.setattr(training, "memory_budget", lambda: need - 1)
    copies, _, _, why = cache_plan(net, data, **plan)
    assert copies == 0 and "exceeds the memory budget" in why


def test_plain_mode_when_nothing_is_frozen():
    everything = finetune_net("all", pool="avg")
    copies, _, _, why = cache_plan(everything, fake_data(), cache=True, cache_copies=2, augment=True, pixel_bytes=0)
    assert copies == 0 and "no backbone layer" in why


def test_clean_cache_equals_the_prefix(net):
    data = fake_data()
    train, val = build_cache(net, data, 1, np.float32, augment=False, seed=0, batch_size=4, quiet=True)
    assert train.shape == (1, 6, 2, 2, 512) and val.shape == (2, 2, 2, 512)
    np.testing.assert_allclose(val, net.prefix.predict(data.val_x.astype(np.float32), verbose=0), rtol=1e-5, atol=1e-4)


def test_phases_with_zero_epochs_are_skipped():
    cnn = build_scratch_network(2, input_size=32, filters=(4,), dense=4, dropout=0.0, precision="float32", seed=0)
    opts = dict(precision="float32", batch_size=4, patience=1, augment=True, seed=0, quiet=True)
    history, records = train_phases(cnn, fake_data(), {"train": (0, 1e-3)}, **opts)
    assert records == [] and history["loss"] == []
    history, records = train_phases(cnn, fake_data(), {"train": (2, 1e-3)}, **opts)
    assert [r["name"] for r in records] == ["train"] and history["phase"] == ["train"] * records[0]["epochs_run"]
    assert len(records[0]["epoch_seconds"]) == records[0]["epochs_run"] and records[0]["lr"] == 1e-3


@pytest.mark.parametrize("lr, improves", [(1e-4, True), (1e3, False)])
def test_each_phase_keeps_its_best_weights_its_start_included(lr, improves):
    """Validation rows = training rows and full batches: a small step lowers the validation loss and is kept;
    a huge one raises it, and the phase returns exactly the weights it started from (epoch 0)."""
    data = fake_data(n_train=8)
    data.val_x, data.val_y = data.train_x, data.train_y
    net = finetune_net("none")
    start = [w.copy() for w in net.top.get_weights()]
    history, (record,) = train_phases(net, data, {"head": (2, lr)}, precision="float32", batch_size=8, patience=1, augment=False, seed=0, quiet=True)
    unchanged = all(np.array_equal(a, b) for a, b in zip(start, net.top.get_weights(), strict=True))
    assert (record["best_epoch"] >= 1, unchanged) == (improves, not improves)
    assert (record["best_val_loss"] < record["start_val_loss"]) == improves
    assert history["phase"] == ["head"] * record["epochs_run"]  # a random head's start is not an epoch of the history
