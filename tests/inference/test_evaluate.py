"""evaluate: a model scored on a labelled feature file or image folder, with its interval, report, confusion plot and misclassified images, as one output set."""

from __future__ import annotations

import csv
import io
import json

import pytest

from conftest import make_tree
from pipeline.classical import train
from pipeline.inference import evaluate
from pipeline.core.errors import PipelineError
from pipeline.extract import stage as extract

TINY = dict(input_size=32, weights="none", quiet=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    make_tree(root / "train", classes=("cat", "dog"), per_class=6)
    test = make_tree(root / "test", classes=("cat", "dog"), per_class=4, size=(36, 28))
    (test / "dog" / "broken.png").write_bytes(b"")
    for split in ("train", "test"):
        extract.run(extract.ExtractConfig(data_dir=root / split, output=root / f"{split}.h5", **TINY))
    metrics = train.run(train.TrainConfig(features=root / "train.h5", test=root / "test.h5", model="lr", output=root / "models", cv=2, quiet=True))
    return root, metrics


def rows(path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_a_feature_file_scores_as_train_scored_it(setup, tmp_path, capsys):
    root, trained = setup
    m = evaluate.run(evaluate.EvaluateConfig(model=root / "models" / "lr.joblib", data=root / "test.h5", output=tmp_path / "ev", quiet=True))
    assert m["accuracy"] == trained["accuracy"] and m["n_scored"] == 8 == trained["n_test"]
    lo, hi = m["accuracy_ci95"]
    assert 0 <= lo <= m["accuracy"] <= hi <= 1 and hi - lo > 0.2  # 8 images: a wide interval
    wrong = rows(tmp_path / "ev" / "misclassified.csv")
    assert len(wrong) == round(8 * (1 - m["accuracy"])) and all(r["true"] != r["predicted"] for r in wrong)
    assert all(0 <= float(r["probability"]) <= 1 for r in wrong)
    assert [r["path"] for r in rows(tmp_path / "ev" / "rejected.csv")] == ["dog/broken.png"]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["accuracy"] == m["accuracy"]
    assert (tmp_path / "ev" / "confusion.png").stat().st_size > 0 and "macro avg" in (tmp_path / "ev" / "report.txt").read_text()
    err = capsys.readouterr().err
    assert "95% CI" in err and "8 images" in err and "warning: only 8 test images: the accuracy is rough" in err


def test_an_image_folder_scores_like_its_feature_file(setup, tmp_path):
    root, _ = setup
    by_file = evaluate.run(evaluate.EvaluateConfig(model=root / "models" / "lr.joblib", data=root / "test.h5", output=tmp_path / "a", quiet=True))
    by_folder = evaluate.run(evaluate.EvaluateConfig(model=root / "models" / "lr.joblib", data=root / "test", output=tmp_path / "b", quiet=True))
    assert by_folder["n_scored"] == 8 and by_folder["n_rejected"] == 1
    assert abs(by_folder["accuracy"] - by_file["accuracy"]) <= 1 / 8  # recomputed features: at most one near-tie may flip
    assert [r["path"] for r in rows(tmp_path / "b" / "rejected.csv")] == ["dog/broken.png"]


def test_a_new_evaluation_replaces_the_old_set_and_foreign_folders_are_kept(setup, tmp_path):
    root, _ = setup
    cfg = evaluate.EvaluateConfig(model=root / "models" / "lr.joblib", data=root / "test.h5", output=tmp_path / "ev", quiet=True)
    evaluate.run(cfg)
    evaluate.run(cfg)  # a folder of its own files only: replaced
    (tmp_path / "ev" / "stale.txt").write_text("from before")  # a file evaluate did not write: kept unless --overwrite
    with pytest.raises(PipelineError, match=r"ev: holds 1 file\(s\) evaluate did not write \(e\.g\. stale\.txt\); pass --overwrite"):
        evaluate.run(cfg)
    assert (tmp_path / "ev" / "stale.txt").read_text() == "from before"
    evaluate.run(evaluate.EvaluateConfig(model=cfg.model, data=cfg.data, output=cfg.output, overwrite=True, quiet=True))
    assert not (tmp_path / "ev" / "stale.txt").exists() and (tmp_path / "ev" / "metrics.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev"]  # no temporary or previous folder left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for overwrite in (False, True):  # eleventh pass: with --overwrite (the advice given) a user's folder was replaced whole
        with pytest.raises(PipelineError, match=r"mine: exists and is not an evaluation folder written by evaluate; evaluate replaces only its own"):
            evaluate.run(evaluate.EvaluateConfig(model=root / "models" / "lr.joblib", data=root / "test.h5", output=tmp_path / "mine", quiet=True, overwrite=overwrite))
        assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(PipelineError, match=r"is inside the test data folder"):
        evaluate.run(evaluate.EvaluateConfig(model=root / "models" / "lr.joblib", data=root / "test", output=root / "test" / "cat" / "ev", quiet=True))


def test_other_features_or_classes_are_refused(setup, tmp_path):
    root, _ = setup
    extract.run(extract.ExtractConfig(data_dir=root / "test", output=tmp_path / "t64.h5", **{**TINY, "input_size": 64}))
    with pytest.raises(PipelineError, match=r"t64\.h5: input_size is 64 but the model .*lr\.joblib was trained on 32"):
        evaluate.run(evaluate.EvaluateConfig(model=root / "models" / "lr.joblib", data=tmp_path / "t64.h5", output=tmp_path / "ev", quiet=True))
    make_tree(tmp_path / "zoo", classes=("cat", "emu"), per_class=2)
    with pytest.raises(PipelineError, match=r"zoo: class 'emu' is not one of the model's classes \(cat, dog\)"):
        evaluate.run(evaluate.EvaluateConfig(model=root / "models" / "lr.joblib", data=tmp_path / "zoo", output=tmp_path / "ev", quiet=True))
    assert not (tmp_path / "ev").exists()


def test_data_holding_images_the_model_was_fitted_on_is_refused(setup, tmp_path, capsys):
    """Fourth pass (#22): evaluate on the model's own training file, its training tree or a copy of it said "accuracy 1.000" with no
    warning (train --test refuses the same overlap). The bundle records the images it was fitted on; evaluate checks against them."""
    import shutil

    root, _ = setup
    model = root / "models" / "lr.joblib"
    shutil.copytree(root / "train", tmp_path / "copy")
    for data, n in ((root / "train.h5", 12), (root / "train", 12), (tmp_path / "copy", 12)):
        with pytest.raises(PipelineError, match=rf"{data.name}: 12 of its {n} images are also training images of the model .*lr\.joblib \(first: "):
            evaluate.run(evaluate.EvaluateConfig(model=model, data=data, output=tmp_path / "ev", quiet=True))
        assert not (tmp_path / "ev").exists()
    m = evaluate.run(evaluate.EvaluateConfig(model=model, data=root / "train.h5", output=tmp_path / "ev", quiet=True, allow_overlap=True))
    assert m["n_scored"] == 12
    import joblib

    old = joblib.load(model)
    del old["training_images"]  # a bundle of an earlier version: said, not pretended
    joblib.dump(old, tmp_path / "old.joblib")
    evaluate.run(evaluate.EvaluateConfig(model=tmp_path / "old.joblib", data=root / "test.h5", output=tmp_path / "ev2", quiet=True))
    assert "old.joblib does not record the images it was fitted on (an earlier version's bundle, or an edited one): not checked" in capsys.readouterr().err
    # an emptied record (fourteenth pass): no image checked, its training rows scored 1.000 unsaid; an empty record is no record
    old["training_images"] = {**joblib.load(model)["training_images"], "files": [], "sizes": []}
    joblib.dump(old, tmp_path / "emptied.joblib")
    m = evaluate.run(evaluate.EvaluateConfig(model=tmp_path / "emptied.joblib", data=root / "train.h5", output=tmp_path / "ev3", quiet=True))
    assert m["n_scored"] == 12 and "emptied.joblib does not record the images it was fitted on (an earlier version's bundle, or an edited one)" in capsys.readouterr().err


def test_evaluate_replaces_only_an_evaluation_it_wrote_unchanged(setup, tmp_path):
    """Sixth pass (#22): any metrics.json made a folder "an evaluation" (a user's folder was replaced without --overwrite), and a
    hand-edited report or misclassified list was replaced too. The folder now keeps a receipt of what evaluate wrote."""
    root, _ = setup
    model = root / "models" / "lr.joblib"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text('{"my_experiment": 42}')
    with pytest.raises(PipelineError, match=r"mine: \.evaluate\.receipt is not as evaluate wrote it \(no receipt"):
        evaluate.run(evaluate.EvaluateConfig(model=model, data=root / "test.h5", output=mine, quiet=True))
    assert (mine / "metrics.json").read_text() == '{"my_experiment": 42}'
    ev = tmp_path / "ev"
    evaluate.run(evaluate.EvaluateConfig(model=model, data=root / "test.h5", output=ev, quiet=True))
    evaluate.run(evaluate.EvaluateConfig(model=model, data=root / "test.h5", output=ev, quiet=True))  # its own, unchanged: replaced
    with open(ev / "report.txt", "a") as f:
        f.write("my note\n")
    with pytest.raises(PipelineError, match=r"ev: report\.txt is not as evaluate wrote it"):
        evaluate.run(evaluate.EvaluateConfig(model=model, data=root / "test.h5", output=ev, quiet=True))
    assert (ev / "report.txt").read_text().endswith("my note\n")
    evaluate.run(evaluate.EvaluateConfig(model=model, data=root / "test.h5", output=ev, quiet=True, overwrite=True))
    assert "my note" not in (ev / "report.txt").read_text()
    with pytest.raises(PipelineError, match=r"is inside the model's training images"):
        evaluate.run(evaluate.EvaluateConfig(model=model, data=root / "test.h5", output=root / "train" / "cat" / "ev", quiet=True))


def test_an_evaluation_inside_the_images_of_its_test_file_is_refused(setup, tmp_path):
    """Eighth pass (#22): evaluate MODEL TEST.h5 -o TEST_IMAGES/bag/E wrote its confusion.png there; the next extract made it a bag image."""
    root, _ = setup
    with pytest.raises(PipelineError, match=r"is inside the images of the test file"):
        evaluate.run(evaluate.EvaluateConfig(model=root / "models" / "lr.joblib", data=root / "test.h5", output=root / "test" / "dog" / "E", quiet=True))
    assert not (root / "test" / "dog" / "E").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_put_in_the_evaluation_folder_during_the_run_is_not_deleted(setup, tmp_path, monkeypatch, overwrite):
    """Ninth pass (#22): the folder was checked at start-up only; a note written into it while evaluate ran went with the old folder.
    Twelfth pass: with --overwrite too (it consents to what was there at the start; a model set trained into it meanwhile was lost)."""
    from pipeline.report import plots

    root, _ = setup
    config = evaluate.EvaluateConfig(model=root / "models" / "lr.joblib", data=root / "test.h5", output=tmp_path / "ev", quiet=True, overwrite=overwrite)
    evaluate.run(config)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ev").iterdir()}
    real = plots.confusion_matrix

    def and_a_note(*args, **kwargs):  # while the new set is being written
        (tmp_path / "ev" / "note.txt").write_text("mine")
        return real(*args, **kwargs)

    monkeypatch.setattr(plots, "confusion_matrix", and_a_note)
    message = r"ev: changed during the run \(e\.g\. note\.txt\); it was not replaced" if overwrite else r"ev: holds 1 file\(s\) evaluate did not write \(e\.g\. note\.txt\)"
    with pytest.raises(PipelineError, match=message):
        evaluate.run(config)
    assert (tmp_path / "ev" / "note.txt").read_text() == "mine"
    assert {p.name: p.read_bytes() for p in (tmp_path / "ev").iterdir() if p.name != "note.txt"} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev"]


def test_a_test_file_whose_images_changed_since_extraction_is_said_not_compared(setup, tmp_path, capsys):
    """Ninth pass (#22): evaluate scored such a file with no word (train --test said it): a row's image replaced by a training
    image's bytes since extraction, or the reverse, cannot be told by today's bytes."""
    import shutil

    root, _ = setup
    shutil.copytree(root / "test", tmp_path / "t")
    extract.run(extract.ExtractConfig(data_dir=tmp_path / "t", output=tmp_path / "t.h5", **TINY))
    shutil.copy(root / "train" / "cat" / sorted(p.name for p in (root / "train" / "cat").iterdir())[0], tmp_path / "t" / "cat" / "000.png")
    capsys.readouterr()
    evaluate.run(evaluate.EvaluateConfig(model=root / "models" / "lr.joblib", data=tmp_path / "t.h5", output=tmp_path / "ev", quiet=True))
    assert "note: 1 images of" in capsys.readouterr().err


def test_an_evaluation_never_replaces_a_folder_holding_the_images_and_never_scores_its_own_model(setup, tmp_path):
    """Eleventh pass (#22): `evaluate MODEL TEST.h5 -o DATA_ROOT --overwrite` replaced the data root (the model's training images and
    the test file's images) with the evaluation, exit 0; and a model saved inside the test tree had its confusion plot scored as an image."""
    import shutil

    root, _ = setup
    model, test = shutil.copy(root / "models" / "lr.joblib", tmp_path / "lr.joblib"), shutil.copy(root / "test.h5", tmp_path / "te.h5")
    with pytest.raises(PipelineError, match=r"holds the model's training images .*; replacing the folder would delete it"):
        evaluate.run(evaluate.EvaluateConfig(model=model, data=test, output=root, quiet=True, overwrite=True))
    assert (root / "train" / "cat").is_dir() and (root / "test" / "cat").is_dir()
    tree = tmp_path / "t"
    shutil.copytree(root / "test", tree)
    shutil.copytree(root / "models", tree / "cat" / "m")
    with pytest.raises(PipelineError, match=r"the model is inside the test data folder .* \(its files would be read as images\)"):
        evaluate.run(evaluate.EvaluateConfig(model=tree / "cat" / "m" / "lr.joblib", data=tree, output=tmp_path / "ev", quiet=True))


def test_an_evaluation_a_kill_left_between_its_renames_is_put_back_before_the_run(setup, tmp_path):
    """Fourteenth pass (#22): the previous folder was put back only at the swap, after the run had noted the folder as missing: the
    run refused "changed during the run" once."""
    import subprocess
    import sys

    from pipeline.core.outputs import WORK_MARK

    root, _ = setup
    config = evaluate.EvaluateConfig(model=root / "models" / "lr.joblib", data=root / "test.h5", output=tmp_path / "ev", quiet=True)
    evaluate.run(config)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "ev").rename(tmp_path / f".ev.old-{dead}")  # killed between the two renames
    (tmp_path / f".ev.work-{dead}").write_text(WORK_MARK)
    assert evaluate.run(config)["n_scored"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev"]
