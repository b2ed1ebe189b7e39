"""The LP-FT probe: a network built from a train bundle predicts what the bundle predicts, mismatched bundles are refused, and early stopping can return the probe unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import make_tree
from pipeline.classical import train
from pipeline.classical.bundle import load_bundle, write_bundle
from pipeline.rows.pooling import pool_features
from pipeline.core.errors import PipelineError
from pipeline.extract import stage as extract
from pipeline.featurefile.store import open_features
from pipeline.nets import finetune as ft
from pipeline.nets.images import decode
from pipeline.nets.networks import find_layer
from pipeline.images.listing import list_images

CLASSES = ("ant", "bee", "cat")
FAST = dict(input_size=32, weights="none", precision="float32", batch_size=8, patience=1, epochs=1, cache_copies=2, quiet=True)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """A tiny tree and its float32 feature file (random-init VGG16 at 32 px, the base a seed-0 fine-tuning builds)."""
    root = tmp_path_factory.mktemp("probe")
    data = make_tree(root / "data", classes=CLASSES, per_class=6)
    h5 = root / "train.h5"
    extract.run(extract.ExtractConfig(data_dir=data, output=h5, input_size=32, weights="none", precision="float32", storage="float32", quiet=True))
    return root, data, h5


def bundle_for(features, pool="flatten", scaling="l2", name="lr"):
    root, _, h5 = features
    out = root / f"models-{pool}-{scaling}"
    train.run(train.TrainConfig(features=h5, model="lr", output=out, pool=pool, scaling=scaling, quiet=True))
    path = out / f"{name}.joblib"
    if name != "lr":
        (out / "lr.joblib").rename(path)
    return path


def pixels_and_features(features, pool):
    """The tree's decoded pixels and the bundle's view of the same images: pooled rows of the feature file, row for row."""
    _, data, h5 = features
    listing = list_images(data)
    x, _, _ = decode(listing, input_size=32, resize="bilinear", quiet=True, desc="")
    with open_features(h5) as ff:
        assert list(ff.paths) == list(listing.paths)  # same images, same order
        return x, pool_features(ff.db["features"][:], pool)


@pytest.mark.parametrize("pool, scaling", [("flatten", "l2"), ("avg", "standard"), ("max", "l2")])
def test_network_from_a_probe_bundle_predicts_what_the_bundle_predicts(features, pool, scaling):
    path = bundle_for(features, pool, scaling)
    bundle = load_bundle(path)
    config = ft.FinetuneConfig(features[1], out_dir=features[0] / "unused", pool=pool, probe=path, **FAST)
    net = ft.build_network(config, len(CLASSES), "float32", probe=bundle["estimator"])
    x, rows = pixels_and_features(features, pool)
    expected = bundle["estimator"].predict_proba(rows)
    got = net.full.predict(x, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert np.array_equal(got.argmax(axis=1), bundle["estimator"].predict(rows))
    assert find_layer(net.full, "probe_logistic").get_weights()[0].shape == (rows.shape[1], len(CLASSES))


def test_a_probe_from_the_streaming_engine_is_a_softmax_probe(features, tmp_path):
    """Above 2,048 rows or out of core, train's lr is the engine's softmax SGDClassifier: LP-FT takes it as it takes LogisticRegression."""
    root, data, h5 = features
    train.run(train.TrainConfig(features=h5, model="lr", output=tmp_path, C=(1.0,), memory_budget_mb=0.001, quiet=True))
    bundle = load_bundle(tmp_path / "lr.joblib")
    assert type(bundle["estimator"][-1]).__name__ == "SGDClassifier"
    config = ft.FinetuneConfig(data, out_dir=tmp_path / "unused", probe=tmp_path / "lr.joblib", **FAST)
    net = ft.build_network(config, len(CLASSES), "float32", probe=bundle["estimator"])
    x, rows = pixels_and_features(features, "flatten")
    np.testing.assert_allclose(net.full.predict(x, verbose=0), bundle["estimator"].predict_proba(rows), rtol=1e-4, atol=1e-5)
    with pytest.raises(PipelineError, match=r"of its \d+ images are also training images of the --probe bundle .*lr\.joblib"):
        ft.run(ft.FinetuneConfig(data, out_dir=tmp_path / "out", probe=tmp_path / "lr.joblib", **FAST))  # it was fitted on every image
    ft.run(ft.FinetuneConfig(data, out_dir=tmp_path / "out", probe=tmp_path / "lr.joblib", allow_overlap=True, **FAST))
    assert (tmp_path / "out" / "finetune.keras").is_file()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("input_size", 64, r"its input_size is 64 but this fine-tuning computes 32 \(--input-size 32\)"),
        ("resize", "nearest", r"its resize is 'nearest' but this fine-tuning computes 'bilinear' \(--resize bilinear\)"),
        ("weights_checksum", "0" * 64, r"its weights_checksum is '0{64}' but this fine-tuning computes 'none' \(--weights none\)"),
        ("pool", "avg", r"its pool is 'avg' but this fine-tuning computes 'flatten' \(--pool flatten\)"),
    ],
)
def test_a_bundle_with_another_feature_specification_is_refused(features, tmp_path, field, value, message):
    bundle = load_bundle(bundle_for(features))
    bundle["feature_spec"] = {**bundle["feature_spec"], field: value}
    if field == "input_size":
        bundle["feature_spec"]["feature_shape"] = [2, 2, 512]
    path = tmp_path / "other.joblib"
    write_bundle(path, bundle)
    with pytest.raises(PipelineError, match=rf"^--probe {tmp_path}/other.joblib: " + message):
        ft.run(ft.FinetuneConfig(features[1], out_dir=tmp_path / "out", probe=path, **FAST))
    assert not (tmp_path / "out" / "finetune.keras").exists()


def test_a_bundle_of_another_model_or_other_classes_is_refused(features, tmp_path):
    root, data, h5 = features
    train.run(train.TrainConfig(features=h5, model="svm", output=tmp_path / "svm", quiet=True))
    with pytest.raises(PipelineError, match=r"its estimator is LinearSVC, not a logistic regression; fit the probe with `train --model lr`"):
        ft.run(ft.FinetuneConfig(data, out_dir=tmp_path / "out", probe=tmp_path / "svm" / "svm.joblib", **FAST))
    bundle = load_bundle(bundle_for(features))
    bundle["label_names"] = ["ant", "bee", "dog"]
    write_bundle(tmp_path / "dog.joblib", bundle)
    with pytest.raises(PipelineError, match=r"its classes \['ant', 'bee', 'dog'\] differ from the training tree's \['ant', 'bee', 'cat'\]"):
        ft.run(ft.FinetuneConfig(data, out_dir=tmp_path / "out", probe=tmp_path / "dog.joblib", **FAST))
    with pytest.raises(PipelineError, match=r"--probe .*: needs --head probe"):
        ft.run(ft.FinetuneConfig(data, out_dir=tmp_path / "out", probe=tmp_path / "dog.joblib", head="dense", **FAST))
    bundle = load_bundle(bundle_for(features))  # a cut coefficient matrix: a Keras shape traceback before (fourteenth pass)
    bundle["estimator"][-1].coef_ = bundle["estimator"][-1].coef_[:, :-1]
    write_bundle(tmp_path / "cut.joblib", bundle)
    with pytest.raises(PipelineError, match=r"^--probe .*cut\.joblib: the model's LogisticRegression has coefficients for 511 features per image, but its feature_spec gives 512 "):
        ft.run(ft.FinetuneConfig(data, out_dir=tmp_path / "out", probe=tmp_path / "cut.joblib", **FAST))


def test_early_stopping_can_return_the_probe_unchanged(features, tmp_path):
    """A learning rate that can only make things worse: the probe (epoch 0) stays the best candidate, bit for bit."""
    path = bundle_for(features)
    bundle = load_bundle(path)
    config = ft.FinetuneConfig(features[1], out_dir=tmp_path / "out", probe=path, allow_overlap=True, **dict(FAST, lr=1e3, augment=False))  # the probe saw every image
    start = ft.build_network(config, len(CLASSES), "float32", probe=bundle["estimator"]).full
    result = ft.fit(config)
    (phase,) = result.metrics["phases"]
    assert phase["name"] == "finetune" and phase["epochs_run"] == 1 and phase["best_epoch"] == 0
    assert result.metrics["history"]["phase"] == ["probe", "finetune"] and result.metrics["epochs_run"] == 1
    for name in ("block5_conv1", "block5_conv3", "probe_logistic"):
        for a, b in zip(find_layer(start, name).get_weights(), find_layer(result.net.full, name).get_weights(), strict=True):
            assert np.array_equal(a, b), name
    x, rows = pixels_and_features(features, "flatten")
    np.testing.assert_allclose(result.net.full.predict(x, verbose=0), bundle["estimator"].predict_proba(rows), rtol=1e-4, atol=1e-5)
    assert result.metrics["probe"]["file"] == str(path) and result.metrics["head"] == "probe"
    assert not (Path(config.out_dir) / "finetune.probe.joblib").exists()  # a given probe is not copied


def test_a_fitted_probe_records_its_images_and_evaluate_refuses_them(features, tmp_path):
    """Fifth pass (#22): `evaluate OUT/finetune.probe.joblib DATA` scored 1.000 on the probe's own training images: the probe bundle
    recorded no images ("an earlier version's bundle"). It records every image but the held-out test ones."""
    from pipeline.inference import evaluate

    root, data, h5 = features
    ft.run(ft.FinetuneConfig(data, out_dir=tmp_path / "out", **FAST))
    probe = tmp_path / "out" / "finetune.probe.joblib"
    import json
    import os

    record = load_bundle(probe)["training_images"]
    held_out = json.loads((tmp_path / "out" / "finetune.metrics.json").read_text())["test_predictions"]["paths"]
    assert held_out and str(data) == record["data_dir"] and len(record["files"]) == 18 - len(held_out)
    assert not {os.path.realpath(data / p) for p in held_out} & set(record["files"])  # the held-out test images are not in the record
    with pytest.raises(PipelineError, match=r"of its 18 images are also training images of the model .*finetune\.probe\.joblib"):
        evaluate.run(evaluate.EvaluateConfig(model=probe, data=data, output=tmp_path / "ev", quiet=True))
