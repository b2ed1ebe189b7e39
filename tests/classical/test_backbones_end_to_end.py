"""Other backbones end to end: extract -> train -> predict with ``--backbone resnet50`` and ``inception_v3`` (random weights, tiny inputs), the backbone recorded everywhere, and files or bundles of one backbone refused where another is expected."""

from __future__ import annotations

import json

import h5py
import joblib
import numpy as np
import pytest

from conftest import make_tree
from pipeline.classical import train
from pipeline.inference import predict
from pipeline.classical.bundle import load_bundle
from pipeline.rows.pooling import pool_features
from pipeline.inference.predict import PredictConfig
from pipeline.core.errors import PipelineError
from pipeline.extract import stage as extract
from pipeline.backbones.registry import BACKBONES
from pipeline.extract.config import ExtractConfig
from pipeline.featurefile.store import open_features
from pipeline.featurefile.checks import verify

#: Each backbone of the issue's end-to-end test at a small input it accepts (InceptionV3 needs 75).
RUNS = {"resnet50": 32, "inception_v3": 75}


def _extract(data, out, **kw) -> int:
    return extract.run(ExtractConfig(data_dir=data, output=out, weights="none", batch_size=8, quiet=True, **kw))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    data = make_tree(root / "data", classes=("cat", "dog"), per_class=6)
    out = {"data": data, "root": root}
    for name, size in RUNS.items():
        features = root / f"{name}.h5"
        assert _extract(data, features, backbone=name, input_size=size) == 0
        train.run(train.TrainConfig(features=features, model="lr", output=root / name, C=(1.0,), pool="avg", quiet=True))
        out[name] = {"features": features, "bundle": root / name / "lr.joblib", "size": size}
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_extract_train_predict(runs, name):
    run, spec = runs[name], BACKBONES[name]
    with h5py.File(run["features"], "r") as db:
        attrs = dict(db.attrs)
        assert db["features"].shape == (12, *spec.feature_shape(run["size"]))
        fp = json.loads(attrs["fingerprint"])
    assert (attrs["backbone"], attrs["layer"], attrs["preprocessing"], attrs["input_size"]) == (name, spec.layer, spec.preprocessing, run["size"])
    assert list(attrs["feature_shape"]) == [*spec.feature_shape(run["size"])] and attrs["feature_shape"][-1] == 2048
    assert (fp["backbone"], fp["layer"], fp["preprocessing"], fp["input_size"]) == (name, spec.layer, spec.preprocessing, run["size"])
    assert verify(run["features"]) == []
    bundle = load_bundle(run["bundle"])
    assert {k: bundle["feature_spec"][k] for k in ("backbone", "layer", "preprocessing", "input_size")} == {
        "backbone": name, "layer": spec.layer, "preprocessing": spec.preprocessing, "input_size": run["size"]
    }  # fmt: skip
    # predict follows the bundle's backbone: the same images give the scores of the stored features
    with open_features(run["features"]) as ff:
        paths = ff.paths
        expected = bundle["estimator"].predict_proba(pool_features(ff.db["features"][:], "avg")).max(axis=1)
    results = predict.label_images(PredictConfig(model=run["bundle"], inputs=(runs["data"],), format="json", output=runs["root"] / f"{name}.json", quiet=True))
    assert [r["path"].split("/data/", 1)[1] for r in results] == paths
    assert all(r["label"] in ("cat", "dog") for r in results)
    np.testing.assert_allclose([r["score"] for r in results], expected, rtol=1e-3)


def test_a_test_file_of_another_backbone_is_refused(runs, tmp_path):
    with pytest.raises(PipelineError, match=r"inception_v3\.h5: backbone is 'inception_v3' but .*resnet50\.h5 has 'resnet50'$"):
        train.run(train.TrainConfig(features=runs["resnet50"]["features"], test=runs["inception_v3"]["features"], model="lr", output=tmp_path / "m", quiet=True))


def test_an_output_of_another_backbone_is_not_overwritten(runs, tmp_path):
    """A feature file of resnet50 where inception_v3 is asked for: the settings differ, refused without --overwrite."""
    target = tmp_path / "x.h5"
    target.write_bytes(runs["resnet50"]["features"].read_bytes())
    with pytest.raises(PipelineError, match=r"backbone 'resnet50' -> 'inception_v3'"):
        _extract(runs["data"], target, backbone="inception_v3", input_size=75)
    with h5py.File(target, "r") as db:
        assert db.attrs["backbone"] == "resnet50"


def test_predict_refuses_a_bundle_whose_layer_is_not_its_backbones(runs, tmp_path):
    bundle = joblib.load(runs["resnet50"]["bundle"])
    bundle["feature_spec"]["backbone"] = "resnet50v2"  # resnet50v2's features are post_relu, not conv5_block3_out
    other = tmp_path / "other.joblib"
    joblib.dump(bundle, other)
    with pytest.raises(PipelineError, match=r"other\.joblib: the model expects layer 'conv5_block3_out' but backbone resnet50v2 computes 'post_relu'$"):
        predict.run(PredictConfig(model=other, inputs=(runs["data"],), quiet=True))


def test_backbone_flag_and_default_input_size(tmp_path):
    """``--backbone`` is a flag; the input side defaults to the backbone's own (299 for InceptionV3); below its minimum is refused."""
    config = extract.COMMAND.parse([str(tmp_path), "-o", str(tmp_path / "x.h5"), "--backbone", "inception_v3"])
    assert (config.backbone, config.input_size) == ("inception_v3", 299)
    assert ExtractConfig(data_dir=tmp_path, output=tmp_path / "x.h5").input_size == 224
    with pytest.raises(PipelineError, match=r"^--input-size 64: inception_v3 needs at least 75 pixels$"):
        ExtractConfig(data_dir=tmp_path, output=tmp_path / "x.h5", backbone="inception_v3", input_size=64).validate()
    with pytest.raises(PipelineError, match=r"^--backbone alexnet: "):
        ExtractConfig(data_dir=tmp_path, output=tmp_path / "x.h5", backbone="alexnet").validate()
