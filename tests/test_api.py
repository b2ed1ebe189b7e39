"""The Python API: extract_features and load_model give what the command line gives, with its defaults, broken images listed."""

from __future__ import annotations

import numpy as np
import pytest

import pipeline
from conftest import assert_recomputed_close, by_path, make_tree
from pipeline.classical import train
from pipeline.inference import predict
from pipeline.core.errors import PipelineError
from pipeline.extract import stage as extract

TINY = dict(input_size=32, weights="none")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    data = make_tree(root / "data", classes=("ant", "bee"), per_class=4)
    (data / "bee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    h5 = root / "train.h5"
    extract.run(extract.ExtractConfig(data_dir=data, output=h5, quiet=True, **TINY))
    train.run(train.TrainConfig(features=h5, model="lr", output=root / "models", cv=2, quiet=True))
    train.run(train.TrainConfig(features=h5, model="svm", output=root / "models", cv=2, quiet=True))
    return root, data, h5


def test_extract_features_of_a_folder_equals_the_extract_command(tree):
    root, data, h5 = tree
    got = pipeline.extract_features(data, **TINY)  # precision auto and float16 storage, as the command line
    rows, rejected = by_path(h5)
    assert got.label_names == ("ant", "bee") and got.features.dtype == np.float16
    assert sorted(got.paths) == sorted(rows) and len(got.paths) == 8
    assert [p for p, _ in got.rejected] == rejected == ["bee/broken.png"]
    assert got.rejected[0][1]  # with its reason
    for i, p in enumerate(got.paths):
        assert ("ant", "bee")[got.labels[i]] == rows[p][0]
        assert_recomputed_close(got.features[i], rows[p][1], err_msg=p)


def test_extract_features_of_paths_is_unlabelled(tree):
    _, data, _ = tree
    paths = [data / "ant" / "000.png", data / "bee" / "broken.png"]
    got = pipeline.extract_features(paths, precision="float32", storage="float32", **TINY)
    assert got.features.shape == (1, 1, 1, 512) and got.features.dtype == np.float32
    assert got.labels.tolist() == [-1] and got.label_names == () and got.paths == (str(paths[0]),)
    assert [p for p, _ in got.rejected] == [str(paths[1])]
    with pytest.raises(PipelineError, match=r"precision='fast': choose one of"):
        pipeline.extract_features(paths, precision="fast", **TINY)
    with pytest.raises(PipelineError, match=r"nowhere\.png: no such file or folder"):
        pipeline.extract_features([data / "nowhere.png"], **TINY)


def test_load_model_predicts_what_predict_predicts(tree):
    root, data, _ = tree
    model = pipeline.load_model(root / "models" / "lr.joblib")
    labels = model.predict(data)
    proba = model.predict_proba(data)
    expected = predict.label_images(predict.PredictConfig(model=root / "models" / "lr.joblib", inputs=(data,), quiet=True, output=root / "p.json", format="json"))
    assert model.label_names == ("ant", "bee") and len(labels) == len(expected) == 9
    assert labels.tolist() == [e["label"] for e in expected]  # None for the broken image
    assert [p for p, _ in model.rejected] == [e["path"] for e in expected if e["error"]]
    readable = ~np.isnan(proba).any(axis=1)
    assert readable.sum() == 8
    np.testing.assert_allclose(proba[readable].sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(proba[readable].max(axis=1), [e["score"] for e in expected if e["error"] is None], rtol=1e-5)
    svm = pipeline.load_model(root / "models" / "svm.joblib")
    with pytest.raises(PipelineError, match=r"svm\.joblib: a svm model gives decision margins, not probabilities"):
        svm.predict_proba(data)
    assert svm.predict([data / "ant" / "000.png"]).tolist()[0] in ("ant", "bee")


@pytest.mark.parametrize(
    "call, flag",
    [
        (lambda data, models: pipeline.extract_features(data, batch_size=0, **TINY), r"batch_size=0"),
        (lambda data, models: pipeline.extract_features(data, batch_size=-1, **TINY), r"batch_size=-1"),
        (lambda data, models: pipeline.extract_features(data, input_size=0, weights="none"), r"input_size=0"),
        (lambda data, models: pipeline.extract_features(data, input_size=32.5, weights="none"), r"input_size=32\.5"),
        (lambda data, models: pipeline.extract_features(data, batch_size="8", **TINY), r"batch_size='8'"),
        (lambda data, models: pipeline.load_model(models / "lr.joblib", batch_size=0).predict(data), r"batch_size=0"),
    ],
    ids=["batch-0", "batch-negative", "size-0", "size-fraction", "batch-text", "model-batch-0"],
)
def test_a_setting_out_of_its_range_is_refused_not_taken_silently(tree, call, flag):
    """Second adversarial pass (#22): batch_size=0 returned no rows (every image dropped, none in rejected) and a model labelled
    every image None; input_size=0 meant 224 and 32.5 meant 32, silently."""
    root, data, _ = tree
    with pytest.raises(PipelineError, match=rf"^{flag}: must be a whole number in \[1, 4294967295\]$"):
        call(data, root / "models")


def test_one_row_per_path_given_and_a_clear_error_for_what_is_not_a_path(tree):
    """Fourth pass (#22): predict([a, a, b]) returned 2 labels, so zip(inputs, labels) gave the second a the label of b; an array of
    pixels or bytes paths were bare TypeErrors from deep inside."""
    root, data, _ = tree
    model = pipeline.load_model(root / "models" / "lr.joblib")
    a, b = data / "ant" / "000.png", data / "bee" / "001.png"
    single = {p: model.predict([p]).tolist()[0] for p in (a, b)}
    labels = model.predict([a, a, b, str(a).replace("/ant/", "/ant/./")])
    assert labels.tolist() == [single[a], single[a], single[b], single[a]] and len(model.paths) == 4
    assert model.predict(str(a).encode()).tolist() == [single[a]]  # a bytes path
    for bad in (np.zeros((2, 32, 32, 3)), 3):
        with pytest.raises(TypeError, match=r"predict: takes image paths \(str, bytes or os\.PathLike\) or an iterable of them, not (numpy\.ndarray|builtins\.int)"):
            model.predict(bad)
        with pytest.raises(TypeError, match=r"extract_features: takes image paths"):
            pipeline.extract_features(bad, **TINY)
