"""The second adversarial pass of issue #22: one hostile-input test per rule it added (each failed on the code before), on tiny trees and random-init networks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, make_tree
from pipeline import datasets
from pipeline.classical import train
from pipeline.core.errors import PipelineError
from pipeline.extract import stage as extract
from pipeline.inference import evaluate, export

TINY = dict(input_size=32, weights="none", quiet=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny tree of three classes, its features, a test file without one class, and an lr bundle."""
    root = tmp_path_factory.mktemp("adversarial")
    make_tree(root / "train", classes=("ant", "bee", "cat"), per_class=6)
    make_tree(root / "test", classes=("ant", "bee"), per_class=3, size=(36, 28))
    for split in ("train", "test"):
        extract.run(extract.ExtractConfig(data_dir=root / split, output=root / f"{split}.h5", **TINY))
    train.run(train.TrainConfig(features=root / "train.h5", model="lr", output=root / "models", cv=2, quiet=True))
    return root


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_output_folder_that_holds_an_input_or_is_a_link_is_never_replaced(trained, tmp_path):
    """evaluate -o MODELS --overwrite and export --format savedmodel -o MODELS --overwrite deleted the bundle they read
    (and everything beside it); -o a link replaced the link (evaluate) or was a traceback (export)."""
    models = tmp_path / "models"
    models.mkdir()
    for p in (trained / "models").iterdir():
        (models / p.name).write_bytes(p.read_bytes())
    bundle, before = models / "lr.joblib", _snapshot(models)
    (tmp_path / "link").symlink_to(models)
    for out in (models, tmp_path / "link"):
        with pytest.raises(PipelineError, match=r"(holds the model bundle .*lr\.joblib; replacing the folder would delete it|is a symbolic link; evaluate replaces its folder, never a link)"):
            evaluate.run(evaluate.EvaluateConfig(model=bundle, data=trained / "test.h5", output=out, overwrite=True, quiet=True))
        with pytest.raises(PipelineError, match=r"(holds the model bundle .*lr\.joblib; replacing the folder would delete it|is a symbolic link; export replaces files, never a link)"):
            export.run(export.ExportConfig(model=bundle, output=out, format="savedmodel", overwrite=True))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "test.h5").write_bytes((trained / "test.h5").read_bytes())
    with pytest.raises(PipelineError, match=r"data: holds the test data .*test\.h5; replacing the folder would delete it"):
        evaluate.run(evaluate.EvaluateConfig(model=bundle, data=data_dir / "test.h5", output=data_dir, overwrite=True, quiet=True))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("keep")
    with pytest.raises(PipelineError, match=r"mine: exists and is not a SavedModel folder; export replaces only a SavedModel \(even with --overwrite\)"):
        export.run(export.ExportConfig(model=bundle, output=mine, format="savedmodel", overwrite=True))
    with pytest.raises(PipelineError, match=r"names no file or folder of its own"):
        export.run(export.ExportConfig(model=bundle, output=tmp_path / "..", format="savedmodel", overwrite=True))
    assert _snapshot(models) == before and (mine / "thesis.txt").read_text() == "keep"
    assert (tmp_path / "link").is_symlink() and (data_dir / "test.h5").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "link", "mine", "models"]  # no temporary left


@pytest.mark.parametrize("fails", ["metadata", "commit"])
@pytest.mark.parametrize("fmt", ["savedmodel", "keras"])
def test_an_export_is_replaced_whole_or_not_at_all(fmt, fails, trained, tmp_path, monkeypatch):
    """export --format savedmodel removed the previous folder before moving the new one in (a failure between lost both); fourth pass:
    the metadata was written after the network was replaced, so a failure there left a new network beside the old metadata."""
    bundle, out = trained / "models" / "lr.joblib", tmp_path / ("saved" if fmt == "savedmodel" else "m.keras")
    export.run(export.ExportConfig(model=bundle, output=out, format=fmt))
    meta = out.with_name(out.name + ".json")
    before = (_snapshot(out) if fmt == "savedmodel" else out.read_bytes()), meta.read_bytes()
    if fails == "metadata":
        monkeypatch.setattr(export, "write_json_atomic", lambda path, obj: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    else:
        real_rename = os.rename
        monkeypatch.setattr(os, "rename", lambda src, dst: (_ for _ in ()).throw(OSError(28, "No space left on device")) if ".set-" in str(src) else real_rename(src, dst))
    with pytest.raises(PipelineError, match=r"no space left"):
        export.run(export.ExportConfig(model=bundle, output=out, format=fmt, overwrite=True))
    assert ((_snapshot(out) if fmt == "savedmodel" else out.read_bytes()), meta.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, meta.name, f".{out.name}.set.receipt"])



@pytest.mark.parametrize("fmt", ["savedmodel", "keras"])
def test_export_overwrite_replaces_only_what_export_wrote(fmt, trained, tmp_path):
    """Fourth pass (#22): with --overwrite, a FIFO named like the metadata was replaced without a word. Every file of the exported pair is
    checked before any work, and a re-export replaces a SavedModel whole (files of the previous one do not survive)."""
    bundle, out = trained / "models" / "lr.joblib", tmp_path / ("saved" if fmt == "savedmodel" else "m.keras")
    meta = out.with_name(out.name + ".json")
    os.mkfifo(meta)
    with pytest.raises(PipelineError, match=rf"{meta.name}: is a FIFO \(named pipe\); the new output set would replace it"):
        export.run(export.ExportConfig(model=bundle, output=out, format=fmt, overwrite=True))
    assert meta.is_fifo() and not out.exists()
    meta.unlink()
    export.run(export.ExportConfig(model=bundle, output=out, format=fmt))
    if fmt == "savedmodel":
        (out / "stale.txt").write_text("from an earlier export")
    export.run(export.ExportConfig(model=bundle, output=out, format=fmt, overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, meta.name, f".{out.name}.set.receipt"]) and not (out / "stale.txt").exists()
    import hashlib
    import json

    info = json.loads(meta.read_text())  # the metadata names the network it belongs to: a consumer can tell a pair a kill mixed
    assert info["network_sha256"] == hashlib.sha256((tmp_path / info["network_file"]).read_bytes()).hexdigest()

def test_an_evaluation_on_data_without_some_classes_says_how_macro_f1_counts_them(trained, tmp_path, capsys):
    """evaluate on data lacking one of the model's classes scored it F1 0 in macro-F1, silently (a perfect model would show 0.667 of 3 classes): now averaged over the classes present, and said."""
    m = evaluate.run(evaluate.EvaluateConfig(model=trained / "models" / "lr.joblib", data=trained / "test.h5", output=tmp_path / "ev", quiet=True))
    assert m["per_class"]["cat"]["support"] == 0
    counted = [c for c in ("ant", "bee", "cat") if m["per_class"][c]["support"] or any(row[("ant", "bee", "cat").index(c)] for row in m["confusion"])]
    assert m["macro_f1"] == pytest.approx(sum(m["per_class"][c]["f1"] for c in counted) / len(counted))
    assert (f"warning: 1 of the model's 3 classes have no image in {trained / 'test.h5'} (cat): nothing here measures them; "
            f"macro-F1 averages the {len(counted)} classes with an image or a prediction") in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit, why",
    [
        (lambda m: m["files"]["train"].update({"../../../victim": [1]}), r"files/train names other classes than Fashion-MNIST's"),
        (lambda m: m["files"]["train"].update({"bag": ["x"]}), r"files/train/bag holds something else than image indices 0\.\.59999"),
        (lambda m: m.pop("counts"), r"counts is None"),
        (lambda m: m.update(seed="zero"), r"seed is 'zero'"),
    ],
    ids=["path-out-of-the-folder", "not-an-index", "no-counts", "seed-not-a-number"],
)
def test_a_damaged_manifest_is_not_trusted_with_deletions(tmp_path, edit, why):
    """The data command deleted outside its folder when an edited manifest listed '../../../victim/00001.png', and was a traceback on other edits."""
    out = tmp_path / "deep" / "fm"
    datasets.build_fashion_mnist(out, train_per_class=2, test_per_class=1, progress=False)
    victim = tmp_path / "victim" / "00001.png"
    victim.parent.mkdir()
    victim.write_text("precious")
    manifest = json.loads((out / "MANIFEST.json").read_text())
    edit(manifest)
    (out / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match=rf"MANIFEST.json: damaged manifest \({why}\); nothing in .*fm is known to be this tool's"):
        datasets.build_fashion_mnist(out, train_per_class=3, test_per_class=1, progress=False)
    assert victim.read_text() == "precious" and len(list(out.rglob("*.png"))) == 30


def test_a_listed_folder_replaced_by_a_link_is_never_deleted_through(tmp_path):
    """The data command's rebuild deleted the user's files of the same names in a folder linked in place of a class folder."""
    out = datasets.build_fashion_mnist(tmp_path / "fm", train_per_class=2, test_per_class=1, progress=False)["out_dir"]
    bag = tmp_path / "fm" / "train" / "bag"
    photos = tmp_path / "photos"
    photos.mkdir()
    for png in bag.iterdir():
        (photos / png.name).write_bytes(png.read_bytes())
    for png in bag.iterdir():
        png.unlink()
    bag.rmdir()
    bag.symlink_to(photos)
    kept = sorted(p.name for p in photos.iterdir())
    with pytest.raises(PipelineError, match=r"holds 1 file\(s\) this tool did not write \(e.g. train/bag/: not in its MANIFEST.json, changed since, unreadable, not a regular file, or a link\)"):
        datasets.build_fashion_mnist(out, train_per_class=3, test_per_class=1, progress=False)
    assert sorted(p.name for p in photos.iterdir()) == kept and len(kept) == 2


def test_standard_streams_closed_full_or_gone_are_one_line_or_quiet(trained, tmp_path):
    """A closed standard output lost the results silently (and stderr closed made predict exit 1 unseen); /dev/full and a reader gone
    (`| head`) were tracebacks; a deleted current folder was a traceback."""
    verify = ["verify", *[str(trained / f"{s}.h5") for s in ("train", "test")] * 200]
    closed = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "pipeline", *verify[:2]],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=False, stderr=subprocess.PIPE)  # fmt: skip
    assert closed.returncode == 2 and closed.stderr.decode().strip() == "error: standard output is closed: the command's results would be lost; redirect it instead (>/dev/null discards them)"
    out = tmp_path / "predictions.txt"
    no_stderr = subprocess.run(["sh", "-c", 'exec "$@" 2>&-', "sh", sys.executable, "-m", "pipeline", "predict", str(trained / "models" / "lr.joblib"), str(trained / "test"), "-o", str(out)],
                               env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True)  # fmt: skip
    assert no_stderr.returncode == 0 and len(out.read_text().splitlines()) == 1 + 6
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "pipeline", *verify], env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=full, stderr=subprocess.PIPE)
    assert r.returncode == 2 and r.stderr.decode().strip() == "error: standard output: No space left on device; what was written there is incomplete"
    gone = subprocess.Popen([sys.executable, "-m", "pipeline", *verify], env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    gone.stdout.readline()
    gone.stdout.close()  # the reader exits, as `| head -1` does
    assert gone.wait(timeout=120) == 141 and gone.stderr.read() == b""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run(["sh", "-c", 'cd "$1" && rmdir "$1" && shift && exec "$@"', "sh", str(cwd), sys.executable, "-m", "pipeline", "verify", "x.h5"],
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True)  # fmt: skip
    assert r.returncode == 2 and r.stderr.decode().strip().endswith("error: the current folder no longer exists (deleted after the shell entered it): cd to an existing folder")


def test_an_evaluation_folder_holding_other_files_or_the_shards_of_its_test_file_is_not_replaced(trained, tmp_path):
    """Third adversarial pass (#22): evaluate -o E replaced E though a train set and a note had been written there since (and a
    concurrent train's set vanished the same way); --overwrite -o a folder holding the merged test file's shards deleted them."""
    from pipeline.extract.shardset import merge

    bundle, ev = trained / "models" / "lr.joblib", tmp_path / "E"
    evaluate.run(evaluate.EvaluateConfig(model=bundle, data=trained / "test.h5", output=ev, quiet=True))
    evaluate.run(evaluate.EvaluateConfig(model=bundle, data=trained / "test.h5", output=ev, quiet=True))  # its own folder: replaced
    (ev / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match=r"E: holds 1 file\(s\) evaluate did not write \(e\.g\. notes\.txt\); pass --overwrite"):
        evaluate.run(evaluate.EvaluateConfig(model=bundle, data=trained / "test.h5", output=ev, quiet=True))
    assert (ev / "notes.txt").read_text() == "mine"
    shards = tmp_path / "S"
    for k in range(2):
        extract.run(extract.ExtractConfig(data_dir=trained / "test", output=shards / f"te-{k}.h5", shards=2, shard=k, **TINY))
    merge(tmp_path / "merged.h5", [shards / "te-0.h5", shards / "te-1.h5"])
    with pytest.raises(PipelineError, match=r"S: holds a shard of the test file .*te-0\.h5; replacing the folder would delete it"):
        evaluate.run(evaluate.EvaluateConfig(model=bundle, data=tmp_path / "merged.h5", output=shards, overwrite=True, quiet=True))
    assert sorted(p.name for p in shards.iterdir() if not p.name.startswith(".")) == ["te-0.h5", "te-1.h5"]
