"""The model bundle: a round trip through the file, files that are not our bundles, and bundles whose features this program cannot rebuild."""

from __future__ import annotations

import joblib
import numpy as np
import pytest

from pipeline.classical.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, check_spec, load_bundle, make_bundle, warn_on_version_change, write_bundle
from pipeline.core.errors import PipelineError
from pipeline.backbones.registry import BACKBONE, BACKBONES, LAYER, PREPROCESSING


def spec(**changes) -> dict:
    """The feature spec of a 32-pixel feature file of this program."""
    out = {
        "backbone": BACKBONE,
        "layer": LAYER,
        "input_size": 32,
        "preprocessing": PREPROCESSING,
        "resize": "bilinear",
        "weights": "none",
        "weights_checksum": "none",
        "feature_shape": [1, 1, 512],
    }
    return out | changes


def bundle(**changes) -> dict:
    from sklearn.linear_model import LogisticRegression

    est = LogisticRegression().fit(np.arange(4.0)[:, None] * np.ones(512), [0, 0, 1, 1])  # takes the spec's avg-pooled 512 values
    fields = dict(model="lr", estimator=est, label_names=["a", "b"], feature_spec=spec(), pool="avg", precision="float32",
                  storage_dtype="float16", score="probability", metrics={"accuracy": 1.0, "versions": {}})  # fmt: skip
    return make_bundle(**(fields | changes))


def test_round_trip(tmp_path):
    path = tmp_path / "lr.joblib"
    write_bundle(path, bundle())
    assert [p.name for p in tmp_path.iterdir()] == ["lr.joblib"]  # no temporary file left
    raw = joblib.load(path)  # plain joblib opens it
    assert raw["format"] == BUNDLE_FORMAT and raw["version"] == BUNDLE_VERSION == 1
    got = load_bundle(path)
    assert got["feature_spec"] == spec(pool="avg") and got["label_names"] == ["a", "b"] and got["precision"] == "float32"
    assert got["storage_dtype"] == "float16" and got["score"] == "probability" and got["metrics"]["accuracy"] == 1.0
    assert got["estimator"].predict([np.full(512, 3.0)]).tolist() == [1]
    check_spec(path, got)  # this program rebuilds these features


@pytest.mark.parametrize(
    "content,message",
    [
        (None, r"model\.joblib: model file does not exist"),
        (b"hello, not a pickle", r"model\.joblib: not a readable model bundle \("),
        ({"estimator": 1}, r"model\.joblib: not a transfer-pipeline model bundle"),
        ({"format": "transfer-pipeline-model", "version": 9}, r"model\.joblib: model bundle version 9 is not supported"),
        ({"format": "transfer-pipeline-model", "version": 1, "estimator": 1, "label_names": [], "feature_spec": {}, "precision": "float32"}, r"feature_spec lacks backbone"),
    ],
)
def test_files_that_are_not_our_bundles(content, message, tmp_path):
    path = tmp_path / "model.joblib"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        joblib.dump(content, path)
    with pytest.raises(PipelineError, match=message):
        load_bundle(path)


def test_a_folder_is_not_a_bundle(tmp_path):
    with pytest.raises(PipelineError, match=r"is a folder, not a model file"):
        load_bundle(tmp_path)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"precision": "float64"}, r"m\.joblib: precision 'float64' is not one of float32, bfloat16, float16, int8$"),
        ({"feature_spec": spec(backbone="alexnet")}, r"m\.joblib: the model expects backbone 'alexnet', which this program does not compute \(it computes vgg16, "),
        # a bundle of another backbone whose features are VGG16's is refused, naming the field
        ({"feature_spec": spec(backbone="resnet50")}, r"m\.joblib: the model expects layer 'block5_pool' but backbone resnet50 computes 'conv5_block3_out'$"),
        ({"feature_spec": spec(backbone="inception_v3", layer="mixed10", preprocessing=BACKBONES["inception_v3"].preprocessing)},
         r"m\.joblib: the model expects input_size 32 but backbone inception_v3 needs at least 75$"),
        ({"feature_spec": spec(layer="block4_pool")}, r"the model expects layer 'block4_pool'"),
        ({"feature_spec": spec(preprocessing="torch")}, r"the model expects preprocessing 'torch'"),
        ({"feature_spec": spec(feature_shape=[2, 2, 512])}, r"m\.joblib: feature_shape \[2, 2, 512\] does not match input_size 32 \(\[1, 1, 512\]\)$"),
        # an estimator that does not take what the spec pools: another pooling's, a cut or widened coefficient matrix (sklearn tracebacks)
        ({"pool": "pool"}, r"m\.joblib: the model's pool 'pool' is not one of flatten, avg, max$"),
        ({"feature_spec": spec(input_size=64, feature_shape=[2, 2, 512]), "pool": "flatten"},
         r"m\.joblib: the model's LogisticRegression takes 512 features per image, but its feature_spec gives 2048 \(flatten pooling of \[2, 2, 512\]\); retrain"),
        ({"estimator": "cut"}, r"m\.joblib: the model's LogisticRegression has coefficients for 511 features per image, but its feature_spec gives 512 "),
        ({"estimator": "scaler"}, r"m\.joblib: the model's StandardScaler takes 256 features per image, but its feature_spec gives 512 "),
        # fitted arrays that cannot score (sixteenth pass): NaN coefficients labelled every image one class with score nan, exit 0
        ({"estimator": "nan"}, r"m\.joblib: the model's LogisticRegression\.coef_ holds values that are not finite numbers; retrain"),
        ({"estimator": "intercepts"}, r"m\.joblib: the model's LogisticRegression has 2 intercepts for 1 coefficient rows; retrain"),
    ],
)
def test_a_spec_this_program_cannot_rebuild_is_refused(changes, message, tmp_path):
    if changes.get("estimator") == "cut":
        changes["estimator"] = bundle()["estimator"]
        changes["estimator"].coef_ = changes["estimator"].coef_[:, :-1]
    elif changes.get("estimator") == "nan":
        changes["estimator"] = bundle()["estimator"]
        changes["estimator"].coef_ = changes["estimator"].coef_ * np.nan
    elif changes.get("estimator") == "intercepts":
        changes["estimator"] = bundle()["estimator"]
        changes["estimator"].intercept_ = np.zeros(2)
    elif changes.get("estimator") == "scaler":
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        changes["estimator"] = make_pipeline(StandardScaler().fit(np.ones((2, 256))), bundle()["estimator"])
    with pytest.raises(PipelineError, match=message):
        check_spec(tmp_path / "m.joblib", bundle(**changes))


@pytest.mark.parametrize("metrics,message", [(["x"], r"model bundle's metrics must be a map, got list$"), ({"versions": "1.5"}, r"model bundle's metrics\.versions must be a map, got str$")])
def test_metrics_that_are_not_maps_are_one_line(metrics, message, tmp_path):
    """predict, evaluate and finetune read them as maps: a list or a text was an AttributeError traceback."""
    path = tmp_path / "m.joblib"
    write_bundle(path, bundle(metrics=metrics))
    with pytest.raises(PipelineError, match=message):
        load_bundle(path)


def test_another_scikit_learn_is_a_warning(tmp_path, capsys):
    warn_on_version_change(tmp_path / "m.joblib", bundle(metrics={"versions": {"scikit-learn": "0.0.1"}}))
    assert "was written with scikit-learn 0.0.1" in capsys.readouterr().err
    warn_on_version_change(tmp_path / "m.joblib", bundle())
    assert capsys.readouterr().err == ""


def test_a_feature_file_or_a_pipe_given_as_the_model_is_one_line(tmp_path):
    import os

    import h5py

    h5 = tmp_path / "train.h5"
    with h5py.File(h5, "w") as db:
        db["labels"] = [0, 1]
    with pytest.raises(PipelineError, match=r"train\.h5: is an HDF5 feature file, not a model bundle; pass the \.joblib"):
        load_bundle(h5)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(PipelineError, match=r"pipe: is not a regular file"):
        load_bundle(tmp_path / "pipe")
