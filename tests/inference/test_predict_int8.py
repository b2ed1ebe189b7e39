"""Predict with int8 bundles: the bundle names its quantized model, predict uses exactly that model, and features computed another way are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_tree
from pipeline.classical import train
from pipeline.inference import predict
from pipeline.classical.bundle import check_engine, check_spec, load_bundle
from pipeline.rows.pooling import pool_features
from pipeline.inference.predict import PredictConfig
from pipeline.core.errors import PipelineError
from pipeline.backbones import int8 as engines
from pipeline.extract import stage as extract
from pipeline.backbones.network import Backbone
from pipeline.extract.config import ExtractConfig
from pipeline.featurefile.store import open_features
from pipeline.backbones.weights import resolve_weights


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """lr bundles trained on int8 and on float32 features of one tiny tree (random weights, 32 px)."""
    root = tmp_path_factory.mktemp("predict-int8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_CACHE", str(root / "cache"))
        data = make_tree(root / "data", classes=("cat", "dog"), per_class=5)
        out = {"root": root, "data": data}
        for precision in ("int8", "float32"):
            features = root / f"{precision}.h5"
            cfg = ExtractConfig(data_dir=data, output=features, weights="none", input_size=32, batch_size=8, precision=precision, quiet=True)
            assert extract.run(cfg) == 0
            train.run(train.TrainConfig(features=features, model="lr", output=root / precision, C=(1.0,), quiet=True))
            out[precision] = {"features": features, "bundle": root / precision / "lr.joblib"}
        yield out


def test_an_int8_bundle_names_its_model_and_predict_uses_it(bundles):
    path = bundles["int8"]["bundle"]
    bundle = load_bundle(path)
    check_spec(path, bundle)
    with open_features(bundles["int8"]["features"]) as ff:
        key = json.loads(ff.attrs["quantization"])["key"]
        stored = pool_features(ff.db["features"][:].astype(np.float32), bundle["feature_spec"]["pool"])
        paths = tuple(bundles["data"] / p for p in ff.paths)
    assert bundle["precision"] == "int8" and bundle["feature_spec"]["precision"] == "int8" and bundle["feature_spec"]["int8_model"] == key
    results = predict.label_images(PredictConfig(model=path, inputs=paths, quiet=True))
    p = bundle["estimator"].predict_proba(stored)
    names = bundle["label_names"]
    assert [r["label"] for r in results] == [names[int(bundle["estimator"].classes_[j])] for j in p.argmax(1)]
    np.testing.assert_allclose([r["score"] for r in results], p.max(1), rtol=1e-3, atol=1e-3)


def test_a_float32_bundle_refuses_an_int8_network_and_the_other_way_round(bundles):
    weights = resolve_weights("none")
    f32, i8 = load_bundle(bundles["float32"]["bundle"]), load_bundle(bundles["int8"]["bundle"])
    int8_net = engines.open_backbone(32, weights, "int8", calibration=engines.Calibration.known(i8["feature_spec"]["int8_model"]))
    with pytest.raises(PipelineError, match=r"^m\.joblib: trained on float32 features but the network computes int8 features; refusing"):
        check_engine("m.joblib", f32, int8_net)
    with pytest.raises(PipelineError, match=r"trained on float32 features but the network computes int8"):
        predict.predict_images(f32, [bundles["data"] / "cat" / "000.png"], int8_net)
    with pytest.raises(PipelineError, match=r"^m\.joblib: trained on int8 features but the network computes float32 features"):
        check_engine("m.joblib", i8, Backbone(32, weights, "float32"))
    other = dict(i8, feature_spec={**i8["feature_spec"], "int8_model": "f" * 64})
    with pytest.raises(PipelineError, match=r"trained on features of int8 model f{16}\.\.\. but the network is int8 model"):
        check_engine("m.joblib", other, int8_net)


def test_predict_without_the_cached_model_says_how_to_get_it(bundles, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "elsewhere"))
    path = bundles["int8"]["bundle"]
    with pytest.raises(PipelineError, match=r"lr\.joblib: int8 model [0-9a-f]{16}\.\.\. is not in .*elsewhere/int8: .*extract the same images again with --precision int8"):
        predict.label_images(PredictConfig(model=path, inputs=(bundles["data"],), quiet=True))


def test_an_int8_bundle_without_its_model_key_is_refused(bundles):
    bundle = load_bundle(bundles["int8"]["bundle"])
    bundle["feature_spec"] = {k: v for k, v in bundle["feature_spec"].items() if k != "int8_model"}
    with pytest.raises(PipelineError, match=r"^m\.joblib: trained on int8 features but names no int8 model"):
        check_spec("m.joblib", bundle)
