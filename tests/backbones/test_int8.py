"""Engines: int8 extraction end to end (OpenVINO + NNCF, tiny inputs, random weights), the quantized-model cache (reused, identical features, kept by updates, checked), and the one-line errors."""

from __future__ import annotations

import json
import sys

import h5py
import numpy as np
import pytest

from conftest import assert_recomputed_close, by_path, make_tree, write_image
from pipeline.core.errors import PipelineError
from pipeline.backbones import int8 as engines
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.images.listing import list_images
from pipeline.images.decode import load_image
from pipeline.backbones.weights import resolve_weights


def _cfg(data, out, **kw) -> ExtractConfig:
    return ExtractConfig(data_dir=data, output=out, weights="none", input_size=32, batch_size=4, quiet=True, **kw)


def _cosine(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """One int8 extraction (calibrated here, in a cache of its own) and the float32 extraction of the same images."""
    root = tmp_path_factory.mktemp("int8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_CACHE", str(root / "cache"))
        data = make_tree(root / "data", per_class=4)
        assert extract.run(_cfg(data, root / "int8.h5", precision="int8")) == 0
        assert extract.run(_cfg(data, root / "float32.h5", precision="float32")) == 0
        yield {"root": root, "data": data, "int8": root / "int8.h5", "float32": root / "float32.h5"}


def _key(path) -> str:
    with h5py.File(path, "r") as db:
        return json.loads(db.attrs["fingerprint"])["calibration"]


def test_int8_extraction_records_its_model_and_is_close_to_float32(int8_run):
    with h5py.File(int8_run["int8"], "r") as db:
        attrs = dict(db.attrs)
    record = json.loads(attrs["quantization"])
    key = _key(int8_run["int8"])
    assert attrs["precision"] == "int8" and record["key"] == key
    assert record["calibration_images"] == 8 and len(record["calibration_sha256"]) == 64  # all 8 images: fewer than 128
    assert record["versions"]["openvino"] and record["versions"]["nncf"]
    assert engines.models_dir() == int8_run["root"] / "cache" / "int8" and (engines.models_dir() / key / "model.bin").is_file()
    int8, _ = by_path(int8_run["int8"])
    f32, _ = by_path(int8_run["float32"])
    assert sorted(int8) == sorted(f32)
    a = np.stack([int8[p][1] for p in sorted(int8)]).astype(np.float32)
    b = np.stack([f32[p][1] for p in sorted(f32)]).astype(np.float32)
    assert _cosine(a, b).min() > 0.98
    assert np.abs(a - b).max() > 0, "int8 features identical to float32: the quantized model did not run"


def test_the_cached_model_is_reused_and_gives_identical_features(int8_run, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE", str(int8_run["root"] / "cache"))

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again although the model is cached")

    monkeypatch.setattr(engines, "quantize", no_calibration)
    out = tmp_path / "again.h5"
    assert extract.run(_cfg(int8_run["data"], out, precision="int8")) == 0
    assert _key(out) == _key(int8_run["int8"])
    with h5py.File(out, "r") as a, h5py.File(int8_run["int8"], "r") as b:
        np.testing.assert_array_equal(a["features"][:], b["features"][:])  # same model, same batches: bit for bit


def test_an_update_keeps_the_model_of_the_existing_output(int8_run, tmp_path, monkeypatch, capsys):
    """An added image changes the seeded sample, but the update must compute it like the kept rows."""
    import shutil

    monkeypatch.setenv("PIPELINE_CACHE", str(int8_run["root"] / "cache"))
    data = tmp_path / "data"
    shutil.copytree(int8_run["data"], data)
    out = tmp_path / "f.h5"
    shutil.copy(int8_run["int8"], out)
    key = _key(out)
    write_image(data / "dog" / "new.png", seed=99)
    assert engines.sample_calibration(list_images(data), input_size=32, resize="bilinear", weights_checksum="none").key != key
    assert extract.run(_cfg(data, out, precision="int8")) == 0
    assert _key(out) == key
    rows, _ = by_path(out)
    old, _ = by_path(int8_run["int8"])
    for p, (_, feats) in old.items():
        np.testing.assert_array_equal(rows[p][1], feats)  # kept rows are copied
    net = engines.open_backbone(32, resolve_weights("none"), "int8", batch_size=4, calibration=engines.Calibration.known(key))
    assert_recomputed_close(rows["dog/new.png"][1], net(load_image(data / "dog" / "new.png", 32, "bilinear")[None])[0])
    assert extract.run(_cfg(data, out, precision="int8")) == 0
    assert "up to date" in capsys.readouterr().out


def test_shards_share_one_calibration(int8_run, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE", str(int8_run["root"] / "cache"))
    keys = set()
    for k in range(2):
        out = tmp_path / f"s{k}.h5"
        assert extract.run(_cfg(int8_run["data"], out, precision="int8", shards=2, shard=k)) == 0
        keys.add(_key(out))
    assert keys == {_key(int8_run["int8"])}  # sampled from the whole folder, so the unsharded file's model


def test_a_model_not_in_the_cache_and_without_its_images_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "empty"))
    with pytest.raises(PipelineError, match=r"^int8 model 0{16}\.\.\. is not in .*empty/int8: .*--precision int8"):
        engines.open_backbone(32, resolve_weights("none"), "int8", calibration=engines.Calibration.known("0" * 64))


@pytest.mark.parametrize("name", ["model.bin", "model.xml"])
def test_a_corrupt_cached_model_is_refused(int8_run, tmp_path, monkeypatch, name):
    """Issue #22: a damaged model.xml (only model.bin was checksummed) gave OpenVINO's traceback."""
    import shutil

    key = _key(int8_run["int8"])
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    shutil.copytree(int8_run["root"] / "cache" / "int8" / key, tmp_path / "cache" / "int8" / key)
    with open(tmp_path / "cache" / "int8" / key / name, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(PipelineError, match=rf"{name}: checksum .* differs from its info\.json's; delete .* to calibrate again"):
        engines.open_backbone(32, resolve_weights("none"), "int8", calibration=engines.Calibration.known(key))
    info = tmp_path / "cache" / "int8" / key / "info.json"
    record = json.loads(info.read_text())
    del record["xml_sha256"]  # a model cached by the version that checked model.bin only
    info.write_text(json.dumps(record))
    with pytest.raises(PipelineError, match=r"made by an earlier version of the pipeline \(info\.json has no checksum of model\.xml\); delete"):
        engines.open_backbone(32, resolve_weights("none"), "int8", calibration=engines.Calibration.known(key))


def test_the_missing_extra_is_a_one_line_error(tree, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(PipelineError, match=r"^--precision int8 needs the int8 extra, which is not installed \(.*\): run `make setup`"):
        _cfg(tree, tmp_path / "f.h5", precision="int8").validate()
    assert not (tmp_path / "f.h5").exists()


def test_int8_with_ray_is_refused(tree, tmp_path):
    with pytest.raises(PipelineError, match=r"--precision int8 with --ray: not supported"):
        _cfg(tree, tmp_path / "f.h5", precision="int8", ray=True).validate()


def test_the_sample_is_seeded_and_follows_the_files(tree):
    listing = list_images(tree)
    a = engines.sample_calibration(listing, input_size=32, resize="bilinear", weights_checksum="none", images=3)
    b = engines.sample_calibration(listing, input_size=32, resize="bilinear", weights_checksum="none", images=3)
    assert a == b and len(a.paths) == 3 and set(a.paths) <= set(listing.paths)
    assert engines.sample_calibration(listing, input_size=64, resize="bilinear", weights_checksum="none", images=3).key != a.key
    assert engines.sample_calibration(listing, input_size=32, resize="bilinear", weights_checksum="none", images=3, seed=1).digest != a.digest


def test_the_int8_model_says_which_kernels_its_convolutions_run_on(int8_run, monkeypatch):
    """``bench`` records these names (``brgconv_avx512_I8``, ``jit_avx2_I8``...): the proof of which instructions int8 used."""
    monkeypatch.setenv("PIPELINE_CACHE", str(int8_run["root"] / "cache"))
    net = engines.open_backbone(32, resolve_weights("none"), "int8", calibration=engines.Calibration.known(_key(int8_run["int8"])))
    kernels = net.kernels()
    assert sum(kernels.values()) == 13  # VGG16's 13 convolutions, each on one kernel
    assert all(name.upper().endswith("_I8") for name in kernels), kernels  # quantized: every convolution runs in int8 (AMX CPUs spell it `_i8` on some)


def test_int8_works_for_another_backbone_and_its_key_names_it(int8_run, tmp_path, monkeypatch):
    """ResNet50 with --weights none: its own OpenVINO model (another key than VGG16's for the same images), close to its float32 features."""
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    data = int8_run["data"]
    assert extract.run(_cfg(data, tmp_path / "r8.h5", precision="int8", backbone="resnet50")) == 0
    assert extract.run(_cfg(data, tmp_path / "r32.h5", precision="float32", backbone="resnet50")) == 0
    key = _key(tmp_path / "r8.h5")
    with h5py.File(tmp_path / "r8.h5", "r") as db:
        record = json.loads(db.attrs["quantization"])
        assert db.attrs["backbone"] == "resnet50" and db["features"].shape[1:] == (1, 1, 2048)
    assert record["backbone"] == "resnet50" and record["layer"] == "conv5_block3_out" and record["key"] == key != _key(int8_run["int8"])
    weights = resolve_weights("none", backbone="resnet50")
    sample = engines.sample_calibration(list_images(data), input_size=32, resize="bilinear", weights_checksum="none", backbone="resnet50")
    assert sample.key == key  # the key includes the backbone: VGG16's sample of the same files has another
    assert engines.sample_calibration(list_images(data), input_size=32, resize="bilinear", weights_checksum="none").key == _key(int8_run["int8"])
    a, _ = by_path(tmp_path / "r8.h5")
    b, _ = by_path(tmp_path / "r32.h5")
    x = np.stack([a[p][1] for p in sorted(a)]).astype(np.float32)
    y = np.stack([b[p][1] for p in sorted(b)]).astype(np.float32)
    assert _cosine(x, y).min() > 0.9 and np.abs(x - y).max() > 0
    with pytest.raises(PipelineError, match=r"an int8 model of resnet50, not vgg16"):
        engines.open_backbone(32, resolve_weights("none"), "int8", calibration=engines.Calibration.known(key))
    assert engines.open_backbone(32, weights, "int8", calibration=engines.Calibration.known(key)).backbone == "resnet50"
