"""Predict stage: bundles from a real extract + train, exact feature reproduction, text/CSV/JSON output, bad images as data, and refused bundles."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import joblib
import numpy as np
import pytest

from conftest import make_tree, spell, write_image
from pipeline.classical import train
from pipeline.inference import predict
from pipeline.classical.bundle import load_bundle
from pipeline.rows.pooling import pool_features
from pipeline.inference.predict import PredictConfig
from pipeline.inference.predictions import TEXT_MARKER
from pipeline.core.errors import PipelineError
from pipeline.extract.config import ExtractConfig
from pipeline.featurefile.store import open_features


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny tree extracted with random weights at 32 px, and lr + svm trained on it."""
    from pipeline.extract import stage as extract

    root = tmp_path_factory.mktemp("predict")
    data = make_tree(root / "data", classes=("cat", "dog"), per_class=6)
    features = root / "features.h5"
    assert extract.run(ExtractConfig(data_dir=data, output=features, weights="none", input_size=32, batch_size=8, quiet=True)) == 0
    models = root / "models"
    train.run(train.TrainConfig(features=features, model="lr", output=models, C=(1.0,), quiet=True))
    train.run(train.TrainConfig(features=features, model="svm", output=models, C=(0.01,), quiet=True))
    return {"data": data, "features": features, "lr": models / "lr.joblib", "svm": models / "svm.joblib", "root": root}


@pytest.fixture
def images(trained, tmp_path) -> Path:
    """Four images in nested folders, an empty file posing as a PNG, a non-image file the folder walk skips."""
    folder = tmp_path / "new"
    for i, name in enumerate(["a.png", "sub/b.png", "sub/deeper/c.jpg", "d.png"]):
        write_image(folder / name, size=(40, 30), seed=100 + i)
    (folder / "sub" / "broken.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    return folder


def cli(*argv: str) -> int:
    """What ``python -m pipeline predict ARGV`` does: parse, ``run`` (the exit status)."""
    return predict.run(predict.COMMAND.parse(list(argv)))


def test_json_output_with_a_broken_image(trained, images, tmp_path, capsys):
    out = tmp_path / "pred.json"
    assert cli(trained["lr"], images, "--format", "json", "-o", out, "--quiet") == 0
    rows = json.loads(out.read_text())
    assert [Path(r["path"]).relative_to(images).as_posix() for r in rows] == ["a.png", "d.png", "sub/b.png", "sub/broken.png", "sub/deeper/c.jpg"]
    broken = rows[3]
    assert broken["label"] is None and broken["score"] is None and broken["error"] == "empty file (0 bytes)"
    for r in rows[:3] + rows[4:]:
        assert set(r) == {"path", "label", "score", "error"} and r["error"] is None
        assert r["label"] in ("cat", "dog") and 0.5 <= r["score"] <= 1.0  # the top probability of two classes
    assert "1 of 5 images could not be read" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_csv_and_text_output(trained, images, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    assert cli(trained["svm"], images / "sub", "--format", "csv", "-o", out, "--quiet") == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0]) == ["path", "label", "score", "error"] and len(rows) == 3
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["broken.png"]["label"] == "" and by_name["broken.png"]["error"] == "empty file (0 bytes)"
    assert by_name["b.png"]["label"] in ("cat", "dog") and by_name["b.png"]["error"] == ""
    float(by_name["b.png"]["score"])  # svm: a margin, any sign

    capsys.readouterr()
    assert cli(trained["lr"], images / "a.png", images / "sub" / "broken.png") == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == TEXT_MARKER and len(lines) == 3
    assert lines[1].split()[1] in ("cat", "dog") and "ERROR" in lines[2] and "empty file" in lines[2]
    assert "predicted 1 image with" in captured.err and "probabilities" in captured.err


def test_predictions_reproduce_the_training_features(trained):
    """Same images, same spec: the scores equal the bundle's estimator on the stored features."""
    bundle = load_bundle(trained["lr"])
    with open_features(trained["features"]) as ff:
        paths = ff.paths
        x = pool_features(ff.db["features"][:], bundle["feature_spec"]["pool"])
    expected = bundle["estimator"].predict_proba(x).max(axis=1)
    results = predict.label_images(PredictConfig(model=trained["lr"], inputs=(trained["data"],), format="json", output=trained["root"] / "all.json", quiet=True))
    assert [Path(r["path"]).relative_to(trained["data"]).as_posix() for r in results] == paths
    np.testing.assert_allclose([r["score"] for r in results], expected, rtol=1e-5)


def test_only_broken_images_exit_1(trained, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("no")
    assert cli(trained["lr"], bad, "--quiet") == 1
    assert "none of the 1 images could be read" in capsys.readouterr().err


def test_weights_with_another_checksum_are_refused(trained, tmp_path):
    bundle = joblib.load(trained["lr"])
    bundle["feature_spec"]["weights_checksum"] = "0" * 64
    other = tmp_path / "other.joblib"
    joblib.dump(bundle, other)
    with pytest.raises(PipelineError, match=r"other\.joblib: trained with weights 'none' \(checksum 0000000000000000\.\.\.\) but the resolved weights none have checksum none"):
        predict.run(PredictConfig(model=other, inputs=(trained["data"],), quiet=True))


def test_missing_input_and_empty_folder(trained, tmp_path):
    with pytest.raises(PipelineError, match=r"nowhere\.png: no such file or folder"):
        predict.run(PredictConfig(model=trained["lr"], inputs=(tmp_path / "nowhere.png",), quiet=True))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match=r"no images \(.*\) found in .*empty"):
        predict.collect_images([tmp_path / "empty"])


def test_bad_settings(trained, tmp_path):
    with pytest.raises(PipelineError, match="--format xml"):
        predict.run(PredictConfig(model=trained["lr"], inputs=(tmp_path,), format="xml"))
    with pytest.raises(PipelineError, match="--batch-size 0"):
        predict.run(PredictConfig(model=trained["lr"], inputs=(tmp_path,), batch_size=0))


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--batch-size", "0"], "--batch-size 0: must be a whole number in [1, 4294967295]"),
        (["--batch-size", "4294967296"], "--batch-size 4294967296: must be a whole number in [1, 4294967295]"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(flags, message, tmp_path, capsys):
    from pipeline.cli import main

    assert main(["predict", str(tmp_path / "never-read.joblib"), str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"


def test_output_that_is_a_folder_is_refused(tmp_path):
    with pytest.raises(PipelineError, match=r"is a folder; -o takes a file"):
        PredictConfig(model=tmp_path / "m.joblib", inputs=(tmp_path,), output=tmp_path).validate()
    with pytest.raises(PipelineError, match=r"no images given"):
        PredictConfig(model=tmp_path / "m.joblib", inputs=()).validate()


# ---------------------------------------------------------------------------
# The output: never an input, never a foreign file without --overwrite, every name kept


@pytest.mark.parametrize("how", ["plain", "double-slash", "symlink", "dotdot"])
@pytest.mark.parametrize("target", ["bundle", "image"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_is_an_input_is_refused(target, how, overwrite, trained, images, tmp_path):
    """``-o model.joblib`` or ``-o`` one of the images: refused (even with --overwrite), however spelled, and the file kept."""
    model = tmp_path / "own" / "lr.joblib"  # a copy: the shared bundle must survive a failing run
    model.parent.mkdir()
    model.write_bytes(trained["lr"].read_bytes())
    victim = model if target == "bundle" else images / "sub" / "b.png"
    before = victim.read_bytes()
    flags = ["--overwrite"] if overwrite else []
    what = "the model bundle" if target == "bundle" else "the image"
    with pytest.raises(PipelineError, match=rf"{victim.name}: is {what} .*{victim.name} \(the same file\); .*choose another -o file"):
        cli(model, images, "-o", spell(victim, how, tmp_path), "--quiet", *flags)
    assert victim.read_bytes() == before


def test_a_foreign_file_is_replaced_only_with_overwrite_and_earlier_predictions_always(trained, images, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("my notes\n")
    for fmt in ("text", "csv", "json"):
        with pytest.raises(PipelineError, match=r"notes\.txt: exists and is not a predictions file written by predict; pass --overwrite to replace it"):
            cli(trained["lr"], images / "a.png", "--format", fmt, "-o", out, "--quiet")
        assert out.read_text() == "my notes\n"
    assert cli(trained["lr"], images / "a.png", "-o", out, "--quiet", "--overwrite") == 0
    assert out.read_text().startswith(TEXT_MARKER + "\n")
    # An earlier predictions file, in any format, is replaced without asking.
    for fmt in ("csv", "json", "text"):  # each replaces the previous one
        assert cli(trained["lr"], images / "a.png", "--format", fmt, "-o", out, "--quiet") == 0
        assert predict.is_predictions_file(out)
    assert out.read_text().startswith(TEXT_MARKER + "\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "notes.txt"]  # no temporary file left


#: File names that are not valid UTF-8 (Latin-1 and a stray continuation byte).
RAW_NAMES = (b"caf\xe9.png", b"x\x80y.png")


def test_names_that_are_not_utf8_are_kept_in_every_format(trained, tmp_path, capsysbinary):
    folder = tmp_path / "raw"
    for i, raw in enumerate(RAW_NAMES):
        write_image(folder / os.fsdecode(raw), seed=200 + i)
    (folder / os.fsdecode(b"broken\xff.png")).write_bytes(b"")
    raw_paths = [os.fsencode(folder) + b"/" + n for n in (b"broken\xff.png", *RAW_NAMES)]
    for fmt in ("text", "csv", "json"):
        out = tmp_path / f"pred.{fmt}"
        assert cli(trained["lr"], folder, "--format", fmt, "-o", out, "--quiet") == 0
        data = out.read_bytes()
        if fmt == "json":
            rows = json.loads(data)
            assert sorted(os.fsencode(r["path"]) for r in rows) == sorted(raw_paths)
        else:
            assert all(p in data for p in raw_paths)
            if fmt == "csv":
                rows = list(csv.DictReader(io.StringIO(data.decode("utf-8", "surrogateescape"))))
                assert sorted(os.fsencode(r["path"]) for r in rows) == sorted(raw_paths)
        if fmt == "text":
            lines = data.splitlines()
            assert lines[0] == TEXT_MARKER.encode() and len(lines) == 4 and sum(b"  ERROR  empty file" in line for line in lines) == 1
        else:
            assert sum(r["error"] not in (None, "") for r in rows) == 1
    capsysbinary.readouterr()
    assert cli(trained["lr"], folder, "--quiet") == 0
    printed = capsysbinary.readouterr().out
    assert printed.startswith(TEXT_MARKER.encode() + b"\n") and all(p in printed for p in raw_paths)


def test_encode_keeps_name_bytes_and_never_fails():
    from pipeline.inference.predictions import encode

    assert encode(os.fsdecode(b"a\xe9\xff.png") + " \u00e9") == b"a\xe9\xff.png \xc3\xa9"
    assert encode("lone \ud800") == b"lone \\ud800"  # a surrogate no file name decodes to


def test_predictions_survive_an_output_that_fails_after_the_work(trained, images, tmp_path, monkeypatch, capsys):
    """The output folder vanishes while the images are labelled: the write fails, the predictions go to standard output, the error says so."""
    import shutil

    out = tmp_path / "gone" / "pred.csv"
    labelled = predict.predict_images

    def label_then_remove_the_folder(*args, **kwargs):
        results = labelled(*args, **kwargs)
        shutil.rmtree(out.parent)
        return results

    monkeypatch.setattr(predict, "predict_images", label_then_remove_the_folder)
    with pytest.raises(PipelineError, match=r"pred\.csv: write failed: .*; the 5 predictions were written to standard output instead"):
        cli(trained["lr"], images, "--format", "csv", "-o", out, "--quiet")
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 5 and sum(r["label"] in ("cat", "dog") for r in rows) == 4


def test_top_k_and_probabilities(trained, images, tmp_path, capsys):
    """--top-k 3 of two classes: both, best first, the first being the label; --probabilities: every class, summing to 1."""
    out = tmp_path / "top.json"
    assert cli(trained["lr"], images, "--format", "json", "-o", out, "--quiet", "--top-k", "3", "--probabilities") == 0
    rows = [r for r in json.loads(out.read_text()) if r["error"] is None]
    assert len(rows) == 4
    for r in rows:
        assert [t["label"] for t in r["top"]][:1] == [r["label"]] and sorted(t["label"] for t in r["top"]) == ["cat", "dog"]
        assert r["top"][0]["score"] == r["score"] >= r["top"][1]["score"]
        assert set(r["probabilities"]) == {"cat", "dog"} and abs(sum(r["probabilities"].values()) - 1) < 1e-6
        assert r["probabilities"][r["label"]] == r["score"]
    assert cli(trained["lr"], images / "sub", "--format", "csv", "-o", tmp_path / "top.csv", "--quiet", "--top-k", "2", "--probabilities") == 0
    table = list(csv.DictReader(io.StringIO((tmp_path / "top.csv").read_text())))
    assert list(table[0]) == ["path", "label", "score", "label_2", "score_2", "p:cat", "p:dog", "error"]
    good = next(r for r in table if not r["error"])
    assert {good["label"], good["label_2"]} == {"cat", "dog"} and float(good["score"]) >= float(good["score_2"])
    assert cli(trained["lr"], images / "sub", "--format", "csv", "-o", tmp_path / "top.csv", "--quiet", "--top-k", "2") == 0  # replaces its own file
    capsys.readouterr()
    assert cli(trained["lr"], images / "sub", "--format", "csv", "-o", tmp_path / "top5.csv", "--quiet", "--top-k", "5") == 0
    assert list(csv.DictReader(io.StringIO((tmp_path / "top5.csv").read_text())))[0].keys() == {"path", "label", "score", "label_2", "score_2", "error"}
    assert "note: --top-k 5 is more than the model's 2 classes; writing the 2 best" in capsys.readouterr().err  # were empty columns 3 to 5


def test_probabilities_of_a_margin_model_are_refused(trained, images):
    with pytest.raises(PipelineError, match=r"svm\.joblib: a svm model gives decision margins, not probabilities; --probabilities needs an lr or rf model"):
        cli(trained["svm"], images, "--probabilities")


def test_the_text_format_keeps_one_line_per_image_whatever_the_names_hold():
    """Second adversarial pass (#22): a newline in a file name split its text row in two, a bogus row for a reader of the output."""
    from pipeline.inference.predictions import format_results

    names = ["new\nline.png", "car\rriage.png", "tab\there.png", "esc\x1b[31m.png", "del\x7f.png", "bytes\udcff.png", "nel\x85.png", "ls\u2028.png"]
    results = [{"path": n, "label": "a\nb", "score": 0.5, "error": None, "top": [{"label": "a\nb", "score": 0.5}]} for n in names]
    results.append({"path": "x\ny.png", "label": None, "score": None, "error": "cannot\nread", "top": []})
    lines = format_results(results, "text").splitlines()
    assert len(lines) == len(results) + 1  # the marker, then one line per image
    assert lines[1].startswith("new\\nline.png") and "a\\nb" in lines[1]
    assert lines[4].startswith("esc\\x1b[31m.png") and lines[6].startswith("bytes\udcff.png")
    assert lines[-1].split() == ["x\\ny.png", "ERROR", "cannot\\nread"]


def test_a_users_json_list_of_records_is_not_taken_for_predictions(tmp_path):
    """Sixth pass (#22): a user's labels.json beginning like predict's JSON ('[\\n  {\\n    "path": ') was replaced without --overwrite."""
    import json

    from pipeline.inference.predictions import format_results, is_predictions_file

    mine = tmp_path / "labels.json"
    mine.write_text(json.dumps([{"path": "/data/a.jpg", "bbox": [1, 2, 3, 4], "annotator": "me"}] * 3, indent=2))
    ours = tmp_path / "p.json"
    ours.write_text(format_results([{"path": "a.png", "label": "cat", "score": 0.9, "error": None, "top": []}], "json"))
    assert not is_predictions_file(mine) and is_predictions_file(ours)


@pytest.mark.parametrize("kind", ["link", "fifo", "device"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_link_fifo_or_device_is_never_replaced_by_predictions(trained, images, tmp_path, kind, overwrite):
    """Eleventh pass (#22): predict replaced a user's link without --overwrite (its target not updated), and with --overwrite a FIFO,
    a device node or /dev/stdout itself became a regular file."""
    import os
    import stat

    out = tmp_path / "out"
    if kind == "link":
        (tmp_path / "p1.txt").write_text("earlier\n")
        out.symlink_to("p1.txt")
    elif kind == "fifo":
        os.mkfifo(out)
    else:
        out.symlink_to("/dev/null")
    what = {"link": "a symbolic link", "fifo": r"a FIFO \(named pipe\)", "device": "a symbolic link"}[kind]
    with pytest.raises(PipelineError, match=rf"out: is {what}; predict writes a file in its place, never over a link, a folder or a device"):
        cli(trained["lr"], images / "a.png", "-o", out, "--quiet", *(["--overwrite"] if overwrite else []))
    assert out.is_symlink() if kind != "fifo" else stat.S_ISFIFO(os.lstat(out).st_mode)


@pytest.mark.parametrize("edit, message", [
    (lambda b: b.update(label_names=list(range(len(b["label_names"])))), r"label_names must be two or more distinct class names"),
    (lambda b: b.update(label_names=["cat"] * len(b["label_names"])), r"label_names must be two or more distinct class names"),
    (lambda b: b.update(score="probability"), r"score 'probability' is not what its svm gives"),
])  # fmt: skip
def test_a_bundle_whose_classes_or_scores_would_mislabel_is_refused(trained, images, tmp_path, edit, message):
    """Thirteenth pass (#22): label names that were numbers were a traceback; one name repeated labelled every image with it (exit 0);
    an svm bundle's score edited to probability printed margins as probabilities."""
    import joblib

    bundle = joblib.load(trained["svm"])
    edit(bundle)
    joblib.dump(bundle, tmp_path / "edited.joblib")
    with pytest.raises(PipelineError, match=message):
        cli(tmp_path / "edited.joblib", images / "a.png", "--quiet")


def test_a_bundle_without_its_score_takes_its_models(trained, images, tmp_path):
    import joblib

    from pipeline.classical.bundle import load_bundle

    bundle = joblib.load(trained["svm"])
    del bundle["score"]  # an earlier version's: an svm's scores are decision values, never probabilities
    joblib.dump(bundle, tmp_path / "old.joblib")
    assert load_bundle(tmp_path / "old.joblib")["score"] == "decision"
