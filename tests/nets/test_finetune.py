"""The finetune stage: which weights train in each mode and head, the probe fitted on the training rows only, the saved model, the metrics contract, flags and early errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from PIL import Image

from conftest import make_tree
from pipeline.classical.bundle import load_bundle
from pipeline.cli import main
from pipeline.core.errors import PipelineError
from pipeline.core.splits import split_indices
from pipeline.backbones.network import resolve_precision
from pipeline.nets import finetune as ft
from pipeline.nets.networks import VGG16_LAYERS, base_features, build_base, find_layer
from pipeline.nets.probe import feature_spec, fit_probe
from pipeline.nets.results import METRICS_KEYS

CLASSES = ("ant", "bee", "cat")
FAST = dict(input_size=32, weights="none", dense=8, head_epochs=1, epochs=1, batch_size=8, patience=2, cache_copies=2, refit=False, quiet=True)
FROZEN = [n for n in VGG16_LAYERS if n.startswith(("block1", "block2", "block3", "block4")) and "conv" in n]
BLOCK5 = ["block5_conv1", "block5_conv2", "block5_conv3"]
HEAD = {"probe": ["probe_logistic"], "dense": ["head_dense", "predictions"]}


def colour_tree(root: Path, per_class: int, seed: int = 0) -> Path:
    """One flat colour per class plus faint noise: easy to learn, so a training step lowers the validation loss
    (augmentation barely changes a flat image), and every training phase keeps trained weights."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        colour = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]][k])
        for i in range(per_class):
            pixels = np.clip(colour + rng.integers(-8, 9, size=(30, 40, 3)), 0, 255).astype(np.uint8)
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, "RGB").save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    data = colour_tree(root / "data", per_class=6)
    (data / "bee" / "broken.png").write_bytes(b"")  # undecodable: counted, never fatal
    test = colour_tree(root / "test", per_class=2, seed=1)
    return root, data, test


def weights_of(model, name):
    return [np.asarray(w) for w in find_layer(model, name).get_weights()]


def same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def start_of(config):
    """The untrained network the run started from (the build is seeded, weights 'none'; the probe is the one the run wrote)."""
    probe = load_bundle(Path(config.out_dir) / "finetune.probe.joblib")["estimator"] if config.head == "probe" else None
    return ft.build_network(config, len(CLASSES), resolve_precision(config.precision), probe=probe).full


@pytest.fixture(scope="module")
def runs(trees):
    """One run per mode and head (cached LP-FT, plain dense head), shared by the tests below (each costs a few seconds)."""
    root, data, test = trees
    configs = {
        "cached": ft.FinetuneConfig(data, out_dir=root / "cached", precision="bfloat16", **FAST),
        "plain": ft.FinetuneConfig(data, test_dir=test, out_dir=root / "plain", precision="float32", cache=False, head="dense", **FAST),
    }
    return {k: (c, ft.fit(c)) for k, c in configs.items()}


@pytest.mark.parametrize("mode", ["cached", "plain"])
def test_block5_trains_and_blocks_1_to_4_stay_bit_identical(runs, mode):
    config, result = runs[mode]
    assert result.metrics["mode"] == {"cached": "cached-prefix", "plain": "plain"}[mode]
    before, after = start_of(config), result.net.full
    for name in FROZEN:
        assert same(weights_of(before, name), weights_of(after, name)), name
    assert result.metrics["phases"][-1]["best_epoch"] >= 1  # the data is easy: fine-tuning lowered the validation loss
    for name in BLOCK5 + HEAD[config.head]:
        assert not np.array_equal(weights_of(before, name)[0], weights_of(after, name)[0]), f"{name} did not train"
    assert [p["name"] for p in result.metrics["phases"]] == {"probe": ["finetune"], "dense": ["head", "finetune"]}[config.head]


def test_the_probe_is_fitted_on_the_training_rows_only(runs):
    """Refitting the probe on the run's training rows alone gives the bundle it wrote: no validation or test row leaked in."""
    config, result = runs["cached"]
    bundle = load_bundle(Path(config.out_dir) / "finetune.probe.joblib")
    m = result.metrics
    assert m["probe"]["n_train"] == m["n_train"] == len(result.data.train_y) and m["probe"]["file"].endswith("finetune.probe.joblib")
    base = build_base(input_size=32, unfreeze_from="block5_conv1", precision="bfloat16", seed=0)
    spec = feature_spec(input_size=32, resize="bilinear", weights=type("W", (), {"name": "none", "checksum": "none"})(), pool="flatten")
    again = fit_probe(base_features(base, result.data.train_x, 8), result.data.train_y, class_names=CLASSES, spec=spec,
                      precision="bfloat16", seed=0, quiet=True, where="data")  # fmt: skip
    assert again.info["best_params"] == m["probe"]["best_params"]
    np.testing.assert_allclose(again.estimator[-1].coef_, bundle["estimator"][-1].coef_, rtol=1e-4, atol=1e-6)
    assert bundle["feature_spec"]["pool"] == "flatten" and bundle["feature_spec"]["input_size"] == 32 and bundle["label_names"] == list(CLASSES)


@pytest.mark.parametrize("mode", ["cached", "plain"])
def test_saved_model_loads_without_custom_objects_and_predicts_the_same(runs, mode):
    import keras

    config, result = runs[mode]
    path = Path(config.out_dir) / "finetune.keras"
    loaded = keras.saving.load_model(path)
    x = result.data.test_x
    assert x.dtype == np.uint8
    np.testing.assert_allclose(loaded.predict(x, verbose=0), result.net.full.predict(x, verbose=0), rtol=0, atol=1e-6)
    assert result.metrics["model_bytes"] == path.stat().st_size
    # the file holds the model, not the optimizer state (that would double its size)
    n_params = sum(int(np.prod(w.shape)) for w in loaded.weights)
    assert path.stat().st_size < 1.2 * 4 * n_params


def test_metrics_contract_and_files(runs, trees):
    root, data, test = trees
    for mode, (config, result) in runs.items():
        out = Path(config.out_dir)
        on_disk = json.loads((out / "finetune.metrics.json").read_text())
        assert set(METRICS_KEYS) <= set(on_disk), set(METRICS_KEYS) - set(on_disk)
        assert on_disk["strategy"] == {"probe": "LP-FT (from block5_conv1)", "dense": "finetune, dense head from random (from block5_conv1)"}[config.head]
        assert on_disk["unfreeze_from"] == "block5_conv1" and on_disk["input_size"] == 32 and on_disk["seed"] == 0
        assert on_disk["rejected"] == 1 and on_disk["rejected_files"][0][0].endswith("bee/broken.png")
        assert set(on_disk["per_class"]) == set(CLASSES)
        assert 0 <= on_disk["accuracy"] <= 1 and 0 <= on_disk["macro_f1"] <= 1
        assert on_disk["images_per_second"] > 0 and on_disk["seconds_per_epoch"] > 0 and on_disk["train_seconds"] > 0
        # LP-FT: 1 fine-tuning epoch after the probe (epoch 0 of the history); dense: 1 head + 1 fine-tuning epoch
        assert on_disk["epochs_run"] == {"probe": 1, "dense": 2}[config.head] and len(on_disk["history"]["val_loss"]) == 2
        assert on_disk["history"]["phase"][0] == {"probe": "probe", "dense": "head"}[config.head]
        assert (out / "finetune.curves.png").read_bytes()[:4] == b"\x89PNG"
        assert not list(out.glob(".*tmp*"))
    cached = runs["cached"][1].metrics
    assert cached["precision"] == "bfloat16" and cached["cache_layer"] == "block4_pool" and cached["cache_copies"] == 2
    # 18 decodable images (the broken 7th bee is skipped): 20% held out with the shared split, then 20% of the rest for validation
    train_pool, test_rows = split_indices(np.repeat([0, 1, 2], 6), 0.2, 0)
    assert (cached["n_test"], cached["n_train"] + cached["n_val"]) == (len(test_rows), len(train_pool))
    assert cached["test_source"].startswith("split of")
    # ... and they are the same rows a feature file of the folder has: decodable images in listing order
    from pipeline.images.listing import list_images
    from pipeline.images.decode import load_image, RejectedImage

    listing = list_images(data)
    decodable = []
    for p in listing.paths:
        try:
            decodable.append(load_image(data / p, 32, "bilinear"))
        except RejectedImage:
            pass
    assert np.array_equal(runs["cached"][1].data.test_x, np.stack(decodable)[test_rows])
    plain = runs["plain"][1].metrics
    assert plain["n_test"] == 6 and "test folder" in plain["test_source"] and plain["n_train"] + plain["n_val"] == 18


def test_unfreeze_none_keeps_the_whole_base(trees):
    root, data, _ = trees
    config = ft.FinetuneConfig(data, out_dir=root / "none", unfreeze_from="none", head="dense", precision="float32", **FAST)
    result = ft.fit(config)
    before, after = start_of(config), result.net.full
    for name in FROZEN + BLOCK5:
        assert same(weights_of(before, name), weights_of(after, name)), name
    assert not np.array_equal(weights_of(before, "head_dense")[0], weights_of(after, "head_dense")[0])
    m = result.metrics
    assert m["strategy"] == "frozen base + dense head" and m["mode"] == "cached-prefix" and m["cache_layer"] == "block5_pool"
    assert [p["name"] for p in m["phases"]] == ["head"] and m["epochs_run"] == 1


def test_unfreeze_all_trains_block1(trees):
    root, data, _ = trees
    config = ft.FinetuneConfig(data, out_dir=root / "all", unfreeze_from="all", precision="float32", **dict(FAST, augment=False))
    result = ft.fit(config)
    before, after = start_of(config), result.net.full
    assert not np.array_equal(weights_of(before, "block1_conv1")[0], weights_of(after, "block1_conv1")[0])
    assert same(weights_of(before, "rgb_to_bgr"), weights_of(after, "rgb_to_bgr"))  # preprocessing is fixed
    assert result.metrics["mode"] == "plain" and "no backbone layer" in result.metrics["plain_reason"]
    assert result.metrics["strategy"] == "LP-FT (all layers)" and result.metrics["phases"][0]["best_epoch"] == 1


def parse(*argv):
    """The flags of ``python -m pipeline ARGV`` (argv starts with ``finetune``), as argparse leaves them."""
    parser = argparse.ArgumentParser()
    ft.COMMAND.add_to(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_flags_build_the_config(monkeypatch, tmp_path):
    argv = ["finetune", str(tmp_path), "--test", "t", "-o", "m", "--unfreeze-from", "none", "--head", "dense", "--pool", "avg",
            "--no-augment", "--no-cache", "--cache-copies", "3", "--lr", "2e-5", "--seed", "7"]  # fmt: skip
    c = ft.COMMAND.config(parse(*argv), argv)
    assert (c.test_dir, c.out_dir, c.unfreeze_from, c.head, c.pool, c.augment, c.cache, c.cache_copies, c.lr, c.seed) == (
        Path("t"), Path("m"), "none", "dense", "avg", False, False, 3, 2e-5, 7)
    assert c.input_size == 224 and c.weights == "imagenet" and c.probe is None and "finetune" in c.command_line
    assert ft.COMMAND.parse(["d", "--probe", "lr.joblib"]).probe == Path("lr.joblib")
    # the dispatcher hands the same config to the stage's run
    seen = {}
    monkeypatch.setattr(ft.COMMAND, "run", lambda config: seen.setdefault("c", config))
    assert main(argv) == 0
    assert seen["c"] == c


def test_flag_defaults_are_the_config_defaults():
    args = parse("finetune", "d")
    config = ft.FinetuneConfig(Path("d"))
    assert ft.COMMAND.config(args, ["finetune", "d"]) == dataclasses.replace(config, command_line="python -m pipeline finetune d")
    resolved = {"input_size": 224, "unfreeze_from": "block5_conv1"}  # none on the command line: the backbone's own
    for f in dataclasses.fields(ft.FinetuneConfig):
        if f.name != "command_line":
            assert (resolved[f.name] if f.name in resolved and getattr(args, f.name) is None else getattr(args, f.name)) == getattr(config, f.name), f.name


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "-1"], r"--epochs -1: must be a whole number in \[0, 4294967295\]"),
        (["--dropout", "1.0"], r"--dropout 1.0: must be in \[0, 1\)"),
        (["--seed", "4294967296"], r"--seed 4294967296: must be a whole number in \[0, 4294967295\]"),
        (["--lr", "nan"], r"--lr nan: must be a finite number in \(0, inf\)"),
        (["--head-lr", "0"], r"--head-lr 0.0: must be a finite number in \(0, inf\)"),
        (["--batch-size", "0"], r"--batch-size 0: must be a whole number in \[1, 4294967295\]"),
        (["--cache-copies", "0"], r"--cache-copies 0: must be at least 1"),
        (["--unfreeze-from", "block9_conv1"], r"--unfreeze-from block9_conv1: not a VGG16 layer"),
        (["--probe", "missing.joblib"], r"--probe missing.joblib: no such file; write one with `train --model lr`"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert main(["finetune", str(tmp_path / "data"), "-o", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(unfreeze_from="block9_conv1"), r"--unfreeze-from block9_conv1: not a VGG16 layer; choose none, all or one of block1_conv1, .*block5_pool"),
        (dict(dropout=1.5), r"--dropout 1.5: must be in \[0, 1\)"),
        (dict(val_split=0.0), r"--val-split 0.0: must be between 0 and 1"),
        (dict(input_size=16), r"--input-size 16: every backbone needs at least 32 pixels"),
        (dict(cache_copies=0), r"--cache-copies 0: must be at least 1"),
        (dict(unfreeze_from="none", head="dense", head_epochs=0), r"nothing would be trained"),
        (dict(unfreeze_from="none"), r"--unfreeze-from none with --head probe: nothing would be fine-tuned"),
        (dict(epochs=0), r"--epochs 0 with --head probe: nothing would be fine-tuned"),
        (dict(head="dense", probe=Path("lr.joblib")), r"--probe lr.joblib: needs --head probe"),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, change, message):
    config = ft.FinetuneConfig(tmp_path / "missing", out_dir=tmp_path / "out", **dict(FAST, **change))
    with pytest.raises(PipelineError, match=message):
        ft.run(config)
    assert not (tmp_path / "out").exists()


def test_bad_folders_fail_before_any_work(trees, tmp_path):
    root, data, _ = trees
    with pytest.raises(PipelineError, match="data folder does not exist"):
        ft.run(ft.FinetuneConfig(tmp_path / "missing", out_dir=tmp_path / "out", **FAST))
    other = make_tree(tmp_path / "other", classes=("ant", "dog"), per_class=1)
    with pytest.raises(PipelineError, match=r"--test .*other: its classes \['ant', 'dog'\] differ from \['ant', 'bee', 'cat'\]"):
        ft.run(ft.FinetuneConfig(data, test_dir=other, out_dir=tmp_path / "out", **FAST))
    assert not (tmp_path / "out").exists()


def test_refit_trains_every_row_for_the_epochs_validation_chose_and_shares_the_test_prefix(trees):
    root, data, test = trees
    fast = dict(FAST, refit=True, epochs=2, head_epochs=2)
    config = ft.FinetuneConfig(data, test_dir=test, out_dir=root / "refit", precision="float32", head="dense", prefix_cache=root / "prefix", **fast)
    result = ft.fit(config)
    m = result.metrics
    chosen = {p["name"]: p["best_epoch"] for p in m["phases"]}  # the selection: trained on the training rows, validated on the rest
    assert set(chosen) == {"head", "finetune"} and m["refit"]["chosen_epochs"] == chosen
    assert [(p["name"], p["epochs_run"]) for p in m["refit"]["phases"]] == [(k, n) for k, n in chosen.items() if n > 0]
    # the final model saw every training and validation image: 18 decodable (the broken bee is skipped)
    assert m["n_train"] == m["refit"]["n_train"] == 18 == len(result.data.train_y) + len(result.data.val_y) and m["n_val"] == len(result.data.val_y) > 0
    assert m["refit"]["chosen_on"] == f"{m['n_val']} validation rows"
    # one prediction per test image, scored through the prefix outputs, as the full model predicts
    tp = m["test_predictions"]
    assert len(tp["paths"]) == 6 and tp["paths"][0] == "ant/000.png" and tp["y_true"] == result.data.test_y.tolist()
    assert m["accuracy"] == pytest.approx(np.mean(np.array(tp["y_pred"]) == np.array(tp["y_true"])))
    assert tp["y_pred"] == result.net.full.predict(result.data.test_x, verbose=0).argmax(axis=1).tolist()
    assert m["test_prefix"] == {"folder": str(root / "prefix"), "reused": False, "cut_layer": "block4_pool"}
    assert m["data_digest"]["test"] and m["data_digest"]["train"] != m["data_digest"]["test"]
    # LP-FT on the same prefix reuses the test images' prefix outputs; its probe is fitted on every row
    lpft = ft.fit(dataclasses.replace(config, out_dir=root / "refit-lpft", head="probe")).metrics
    assert lpft["test_prefix"]["reused"] is True and lpft["probe"]["n_train"] == lpft["n_train"] == 18
    assert load_bundle(Path(lpft["probe"]["file"]))["metrics"]["n_train"] == 18
