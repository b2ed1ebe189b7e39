"""export: one Keras network from a train bundle predicts what ``predict`` predicts, loads with plain Keras without this package, and refuses what it cannot rebuild."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from PIL import Image

from pipeline.classical import train
from pipeline.classical.bundle import load_bundle
from pipeline.inference import predict
from pipeline.core.errors import PipelineError
from pipeline.extract import stage as extract
from pipeline.images.listing import list_images
from pipeline.images.decode import load_image
from pipeline.inference import export

CLASSES = ("ant", "bee", "cat")
#: Loads the exported file with `import pipeline` made impossible: proof it needs only Keras.
PLAIN_KERAS = """
import sys
sys.modules["pipeline"] = None
import numpy as np, keras
model = keras.saving.load_model(sys.argv[1])
np.save(sys.argv[3], model.predict(np.load(sys.argv[2]), verbose=0))
"""


_TRAINED: dict = {}


def trained(backbone, tmp_path_factory, models=("lr",)):
    """A tiny tree, its float16-stored features at 32 px (random-init ``backbone``) and bundles of ``models``, made once per backbone."""
    if backbone in _TRAINED:
        return _TRAINED[backbone]
    root = tmp_path_factory.mktemp(f"export-{backbone}")
    data = _colour_tree(root / "data")
    h5 = root / "train.h5"
    extract.run(extract.ExtractConfig(data_dir=data, output=h5, input_size=32, weights="none", precision="float32", backbone=backbone, quiet=True))
    for model in models:
        C = (1.0,) if model != "rf" else None  # confident linear models: few near-ties to compare
        train.run(train.TrainConfig(features=h5, model=model, output=root / "models", cv=2, C=C, quiet=True))
        if model != "rf":  # the streaming engine's model (what train writes out of core or above 2,048 rows)
            train.run(train.TrainConfig(features=h5, model=model, output=root / "streamed", cv=2, C=C, memory_budget_mb=0.001, quiet=True))
    _TRAINED[backbone] = root, data
    return root, data


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    return trained("vgg16", tmp_path_factory, ("lr", "svm", "rf"))


def _colour_tree(root, per_class=5):
    """Each class a colour plus noise: separable even by a random-init backbone."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            base = np.zeros((36, 40, 3)) + 60
            base[..., c] = 200
            pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def _plain_keras(path, pixels, tmp_path):
    np.save(tmp_path / "x.npy", pixels)
    proc = subprocess.run([sys.executable, "-c", PLAIN_KERAS, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(tmp_path / "y.npy")


# vgg16: caffe preprocessing (RGB->BGR, minus the means); resnet50v2: tf (x / 127.5 - 1).
@pytest.mark.parametrize(
    "backbone, model, folder",
    [("vgg16", "lr", "models"), ("vgg16", "svm", "models"), ("vgg16", "lr", "streamed"), ("vgg16", "svm", "streamed"), ("resnet50v2", "lr", "models")],
)
def test_the_exported_network_predicts_what_predict_predicts(vgg, backbone, model, folder, tmp_path, tmp_path_factory):
    root, data = trained(backbone, tmp_path_factory)
    bundle = root / folder / f"{model}.joblib"
    if folder == "streamed":
        assert type(load_bundle(bundle)["estimator"][-1]).__name__ == "SGDClassifier"  # the engine's model, not sklearn's exact one
    out = export.run(export.ExportConfig(model=bundle, output=tmp_path / f"{model}.keras"))
    meta = json.loads((tmp_path / f"{model}.keras.json").read_text())
    assert meta["label_names"] == list(CLASSES) and meta["input_size"] == 32 and meta["resize"] == "bilinear"
    listing = list_images(data)
    paths = [listing.root / p for p in listing.paths]
    reader = {}
    exec(meta["reader"], reader)  # the metadata's own decoding (Pillow only), as a deployment without this package uses it
    pixels = np.stack([reader["load_pixels"](p, meta["input_size"], meta["resize"]) for p in paths])
    np.testing.assert_array_equal(pixels, np.stack([load_image(p, meta["input_size"], meta["resize"]) for p in paths]).astype(np.float32))
    scores = _plain_keras(out, pixels, tmp_path)
    assert scores.shape == (len(paths), len(CLASSES))
    if model == "lr":
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)  # probabilities
    expected = predict.label_images(predict.PredictConfig(model=bundle, inputs=tuple(paths), quiet=True, output=tmp_path / "p.csv", format="csv"))
    top = np.sort(scores, axis=1)
    clear = top[:, -1] - top[:, -2] > 1e-3  # a near-tie may flip under recomputed floats
    assert clear.sum() >= len(paths) - 1
    got = [CLASSES[i] for i in scores.argmax(axis=1)]
    assert [g for g, c in zip(got, clear) if c] == [e["label"] for e, c in zip(expected, clear) if c]
    np.testing.assert_allclose(scores.max(axis=1), [e["score"] for e in expected], rtol=2e-3, atol=2e-3)


def test_what_cannot_be_rebuilt_or_would_be_destroyed_is_refused(vgg, tmp_path):
    root, _ = vgg
    with pytest.raises(PipelineError, match=r"rf\.joblib: a rf model cannot be exported as layers; export takes lr or svm bundles"):
        export.run(export.ExportConfig(model=root / "models" / "rf.joblib", output=tmp_path / "rf.keras"))
    lr = root / "models" / "lr.joblib"
    with pytest.raises(PipelineError, match=r"model\.h5: a Keras file must end in \.keras"):
        export.run(export.ExportConfig(model=lr, output=tmp_path / "model.h5"))
    with pytest.raises(PipelineError, match=r"is the model bundle .*lr\.joblib \(the same file\)"):
        export.run(export.ExportConfig(model=lr, output=lr, format="savedmodel"))
    (tmp_path / "taken.keras").write_text("mine")
    with pytest.raises(PipelineError, match=r"taken\.keras: exists; pass --overwrite"):
        export.run(export.ExportConfig(model=lr, output=tmp_path / "taken.keras"))
    assert (tmp_path / "taken.keras").read_text() == "mine"


def test_a_savedmodel_export_serves_the_same_scores(vgg, tmp_path):
    """--format savedmodel: a TensorFlow SavedModel folder whose serving function gives the .keras file's scores."""
    import tensorflow as tf

    root, data = vgg
    bundle = root / "models" / "lr.joblib"
    folder = export.run(export.ExportConfig(model=bundle, output=tmp_path / "lr-saved", format="savedmodel"))
    keras_file = export.run(export.ExportConfig(model=bundle, output=tmp_path / "lr.keras"))
    meta = json.loads((tmp_path / "lr-saved.json").read_text())
    listing = list_images(data)
    pixels = np.stack([load_image(listing.root / p, meta["input_size"], meta["resize"]) for p in listing.paths]).astype(np.float32)
    loaded = tf.saved_model.load(str(folder))  # kept: its variables live as long as it does
    served = loaded.serve(tf.constant(pixels)).numpy()
    np.testing.assert_allclose(served, _plain_keras(keras_file, pixels, tmp_path), rtol=1e-4, atol=1e-5)
