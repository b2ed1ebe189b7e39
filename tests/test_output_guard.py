"""One output guard for every stage that reads images or features: no output inside an image folder it reads, one run per output at a time, and train refuses a class without rows."""

from __future__ import annotations

import pytest

from conftest import make_tree
from feature_data import FAST_GRID, make_features
from pipeline.classical import train
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import OutputLock
from pipeline.extract import stage as extract
from pipeline.extract.config import ExtractConfig
from pipeline.nets import finetune, scratch

TINY_NET = dict(input_size=32, epochs=1, batch_size=8, quiet=True)


def test_train_refuses_an_output_inside_the_image_folder_of_its_features(tmp_path):
    data = make_tree(tmp_path / "data", classes=("cat", "dog"), per_class=4)
    extract.run(ExtractConfig(data_dir=data, output=tmp_path / "f.h5", input_size=32, weights="none", quiet=True))
    with pytest.raises(PipelineError, match=r"models: is inside the image folder of .*data \(its files would be read as images there next time\)"):
        train.run(train.TrainConfig(features=tmp_path / "f.h5", output=data / "cat" / "models", cv=2, quiet=True))
    assert not (data / "cat" / "models").exists()


@pytest.mark.parametrize("stage", ["finetune", "scratch"])
def test_networks_refuse_an_output_inside_their_images_and_a_second_run_on_one_output(stage, tmp_path):
    data = make_tree(tmp_path / "data", classes=("cat", "dog"), per_class=4)
    make = (lambda out: finetune.FinetuneConfig(data, out_dir=out, weights="none", **TINY_NET)) if stage == "finetune" else (
        lambda out: scratch.ScratchConfig(data, out_dir=out, filters=(4, 4, 4), dense=4, **TINY_NET))
    module = finetune if stage == "finetune" else scratch
    with pytest.raises(PipelineError, match=r"is inside the training images .*data"):
        module.run(make(data / "dog" / "out"))
    assert not (data / "dog" / "out").exists()
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out / f"{stage}.keras"):  # another run holds this output
        with pytest.raises(PipelineError, match=rf"{stage}\.keras\.lock: another run is writing this output"):
            module.run(make(out))
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written beside the other run's files


def test_train_refuses_a_class_without_training_rows(tmp_path):
    feats = make_features(tmp_path / "f.h5", per_class=[20, 20, 0])  # every image of "cat" rejected at extraction, say
    with pytest.raises(PipelineError, match=r"f\.h5: class 'cat' has no training rows \(every image of it was rejected, or is byte-identical to an image of another class"):
        train.run(train.TrainConfig(features=feats, output=tmp_path / "m", quiet=True, **FAST_GRID["lr"]))


@pytest.mark.parametrize("argv", [["compare", "--data", "{data}", "--weights", "none", "--input-size", "32", "--strategies", "lr", "--quiet"],
                                  ["bench", "--data", "{data}", "--quiet"]])  # fmt: skip
def test_compare_and_bench_hold_their_output_for_the_whole_run(argv, tmp_path, capsys):
    """#22: compare and bench took a lock only to publish their tables: two runs on one -o raced on the rows."""
    from pipeline.cli import main

    root = tmp_path / "data"
    make_tree(root / "train", classes=("a", "b"), per_class=4, size=(24, 24))
    make_tree(root / "test", classes=("a", "b"), per_class=2, size=(24, 24))
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out / argv[0]):  # another run of the same command on this -o
        assert main([a.format(data=root) for a in argv] + ["-o", str(out)]) == 2
    assert f"{out}/{argv[0]}.lock: another run is writing this output" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written beside the other run's files


@pytest.mark.parametrize("inside", [".", "train", "train/a"])
def test_compare_refuses_an_output_inside_its_data_folder_before_any_work(inside, tmp_path, capsys):
    """Third adversarial pass (#22): compare -o DATA/train left an empty DATA/train/models (a class folder with no image) before extract refused."""
    from pipeline.cli import main

    root = tmp_path / "data"
    make_tree(root / "train", classes=("a", "b"), per_class=4, size=(24, 24))
    make_tree(root / "test", classes=("a", "b"), per_class=2, size=(24, 24))
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    out = root / inside
    assert main(["compare", "--data", str(root), "-o", str(out), "--weights", "none", "--input-size", "32", "--strategies", "lr", "--quiet"]) == 2
    assert f"is inside the data folder {root} (its files would be read as images there next time); choose another -o folder" in capsys.readouterr().err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def _plant(path, kind):
    """Put something at ``path`` that no output set may replace: a FIFO, a folder, a symbolic link to a user's file, a read-only file."""
    import os

    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
        (path / "note.txt").write_text("mine")
    elif kind == "link":
        (path.parent.parent / "precious.txt").write_text("mine")
        path.symlink_to(path.parent.parent / "precious.txt")
    else:
        path.write_text("mine")
        path.chmod(0o444)


def _snapshot(folder):
    import os

    return sorted((p.name, os.lstat(p).st_mode, p.read_text() if p.is_file() and not p.is_symlink() else None)
                  for p in folder.iterdir() if p.is_symlink() or not p.is_fifo())  # fmt: skip


@pytest.mark.parametrize("kind", ["fifo", "folder", "link", "read-only"])
def test_an_output_set_never_replaces_what_it_did_not_write(kind, tmp_path):
    """Fourth pass (#22): a FIFO named scratch.keras in scratch's -o was replaced by the model without a word; a folder named like a member
    failed the publication half-way. Every member of a set is checked before the set is staged (``core.outputsets.check_members``)."""
    from pipeline.core.outputsets import publish

    out = tmp_path / "out"
    out.mkdir()
    (out / "lr.joblib").write_text("old model")
    _plant(out / "lr.report.txt", kind)
    before = _snapshot(out)
    with pytest.raises(PipelineError, match=r"out/lr\.report\.txt: is (a FIFO \(named pipe\)|a folder|a symbolic link|read-only); the new output set would "
                                            r"replace it: remove it, or choose another output folder$"):  # fmt: skip
        with publish(out, "lr", ("lr.report.txt", "lr.joblib"), lock="lr.joblib", locked=False) as stage:
            stage.path("lr.joblib").write_text("new model")
            stage.path("lr.report.txt").write_text("new report")
    assert _snapshot(out) == before and (tmp_path / "precious.txt").read_text() == "mine" if kind == "link" else _snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".lr.set")]


@pytest.mark.parametrize("argv, member", [
    (["train", "{features}", "--model", "lr", "--cv", "2", "--C", "1", "--quiet"], "lr.confusion.png"),
    (["scratch", "{data}/train", "--dense", "4", "--input-size", "32", "--epochs", "1", "--quiet"], "scratch.keras"),
    (["finetune", "{data}/train", "--weights", "none", "--input-size", "32", "--epochs", "1", "--quiet"], "finetune.probe.joblib"),
    (["compare", "--data", "{data}", "--weights", "none", "--input-size", "32", "--strategies", "lr", "--quiet"], "compare.md"),
    (["compare", "--data", "{data}", "--weights", "none", "--input-size", "32", "--strategies", "lr", "--sizes", "3", "--quiet"], "sizes.json"),
    (["bench", "--data-path", "--quiet"], "data_path.md"),
])  # fmt: skip
@pytest.mark.parametrize("kind", ["fifo", "user file"])
def test_every_stage_refuses_a_set_member_it_cannot_replace_before_any_work(kind, argv, member, tmp_path, capsys):
    """The rule for every stage that publishes a set: a FIFO, or a user's file, named like one of its files is one line before any
    training or measurement, and is left as it was (fourth pass, #22: a FIFO named scratch.keras and a user's compare.md, sizes.csv,
    lr.report.txt, scratch.keras or finetune.probe.joblib were replaced or deleted, exit 0)."""
    import os

    from pipeline.cli import main

    root = tmp_path / "data"
    make_tree(root / "train", classes=("a", "b"), per_class=4, size=(24, 24))
    make_tree(root / "test", classes=("a", "b"), per_class=2, size=(24, 24))
    feats = make_features(tmp_path / "f.h5", per_class=[10, 10, 10])
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / member) if kind == "fifo" else (out / member).write_text("precious")
    assert main([a.format(data=root, features=feats) for a in argv] + ["-o", str(out)]) == 2
    why = "is a FIFO (named pipe)" if kind == "fifo" else "is not a file this tool wrote here (no usable receipt"
    assert f"{out / member}: {why}" in capsys.readouterr().err
    assert (out / member).is_fifo() if kind == "fifo" else (out / member).read_text() == "precious"
    left = sorted(p.name for p in out.iterdir())
    assert left == [member] or set(left) <= {member, "compare.lock", "bench.lock"} and "models" not in left, left


def test_a_set_replaces_only_files_its_receipt_names(tmp_path):
    """Fourth pass (#22): a user's note named compare.md (or sizes.csv, train_bench.md, lr.report.txt, finetune.probe.joblib, scratch.keras)
    was replaced or deleted, exit 0. A set now replaces a file only if its bytes are in the set's receipt (what the tool wrote there)."""
    from pipeline.core.outputsets import publish, receipt_path

    out = tmp_path / "out"
    out.mkdir()

    def write(report="r", bundle="b"):
        with publish(out, "lr", ("lr.report.txt", "lr.joblib"), lock="lr.joblib", locked=False) as stage:
            stage.path("lr.joblib").write_text(bundle)
            if report is not None:
                stage.path("lr.report.txt").write_text(report)

    (out / "lr.report.txt").write_text("my notes")  # a user's file, no set here yet
    with pytest.raises(PipelineError, match=r"out/lr\.report\.txt: is not a file this tool wrote here \(no usable receipt \.lr\.set\.receipt: .*\); the new output set would replace it"):
        write()
    assert (out / "lr.report.txt").read_text() == "my notes" and not (out / "lr.joblib").exists()
    (out / "lr.report.txt").unlink()
    write()
    write(report="r2", bundle="b2")  # its own files: replaced
    assert (out / "lr.report.txt").read_text() == "r2" and receipt_path(out, "lr").is_file()
    (out / "lr.report.txt").write_text("r2, annotated by hand")  # changed since: refused, kept
    with pytest.raises(PipelineError, match=r"lr\.report\.txt: is not a file this tool wrote here \(or it was changed since, or another output of that name wrote it\)"):
        write(report=None)  # a publication that would remove it
    assert (out / "lr.report.txt").read_text() == "r2, annotated by hand"
    (out / "lr.report.txt").write_text("r2")
    write(report=None)  # its own file, not written this time: removed
    assert sorted(p.name for p in out.iterdir()) == [".lr.set.receipt", "lr.joblib"]
    receipt_path(out, "lr").unlink()  # without a receipt nothing is known to be the tool's: refused, saying so
    with pytest.raises(PipelineError, match=r"lr\.joblib: is not a file this tool wrote here \(no usable receipt \.lr\.set\.receipt: written by hand, or by a version before receipts\)"):
        write()
    assert (out / "lr.joblib").read_text() == "b"


def test_finetune_refuses_a_probe_that_is_its_own_output(tmp_path, capsys):
    """Fourth pass (#22): finetune --probe OUT/finetune.probe.joblib deleted that probe (the run fitted none, so the set removed it)."""
    from pipeline.cli import main

    root = tmp_path / "data"
    make_tree(root / "train", classes=("a", "b"), per_class=4, size=(24, 24))
    out = tmp_path / "out"
    out.mkdir()
    (out / "finetune.probe.joblib").write_text("a probe")
    assert main(["finetune", str(root / "train"), "--weights", "none", "--input-size", "32", "--epochs", "1", "--quiet", "-o", str(out),
                 "--probe", str(out / "finetune.probe.joblib")]) == 2  # fmt: skip
    assert "finetune.probe.joblib: is the --probe bundle" in capsys.readouterr().err
    assert (out / "finetune.probe.joblib").read_text() == "a probe"


def test_predict_holds_its_output_for_the_whole_run(tmp_path, capsys):
    """Fourth pass (#22): export and predict on one -o at once both exited 0, export saying it wrote a network where predict's text was."""
    from pipeline.cli import main

    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=4, size=(24, 24))
    extract.run(ExtractConfig(data_dir=data, output=tmp_path / "f.h5", input_size=32, weights="none", quiet=True))
    assert main(["train", str(tmp_path / "f.h5"), "--model", "lr", "--cv", "2", "--C", "1", "--quiet", "-o", str(tmp_path / "m")]) == 0
    images = make_tree(tmp_path / "new", classes=("x",), per_class=2, size=(24, 24))
    out = tmp_path / "shared.keras"
    with OutputLock(out):  # an export writing this path now
        assert main(["predict", str(tmp_path / "m" / "lr.joblib"), str(images), "-o", str(out), "--quiet"]) == 2
    assert f"{out}.lock: another run is writing this output" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("mode", ["train", "data-path", "main"])
def test_bench_refuses_an_output_inside_the_images_it_reads(mode, tmp_path, capsys):
    """Fourth pass (#22): bench --train -o DATA/train/bag wrote train_bench.png there; the next extract counted it as a bag image."""
    from pipeline.cli import main

    root = tmp_path / "data"
    make_tree(root / "train", classes=("a", "b"), per_class=4, size=(24, 24))
    make_tree(root / "test", classes=("a", "b"), per_class=2, size=(24, 24))
    extract.run(ExtractConfig(data_dir=root / "train", output=tmp_path / "tr.h5", input_size=32, weights="none", quiet=True))
    out = root / "train" / "a" / "bench"
    argv = {"train": ["--train", "--replay", str(tmp_path / "tr.h5"), "--test-features", str(tmp_path / "tr.h5"), "--train-sizes", "8"],
            "data-path": ["--data-path", "--replay", str(tmp_path / "tr.h5")], "main": ["--data", str(root), "--quick"]}[mode]  # fmt: skip
    assert main(["bench", *argv, "-o", str(out), "--quiet"]) == 2
    assert f"{out}: is inside the " in capsys.readouterr().err
    assert not out.exists()


def test_sigterm_stops_every_command_with_its_message_and_no_lock(tmp_path):
    """Fifth pass (#22): SIGTERM to finetune, scratch or evaluate exited 143 without "interrupted" and left its lock file; every command
    now runs inside ``sigterm_as_interrupt`` (cli.main), as extract and train did."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=4, size=(24, 24))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "pipeline", "scratch", str(data), "--dense", "4", "--input-size", "32", "--epochs", "100000", "--patience",
            "100000", "--quiet", "-o", str(out)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    try:
        lock, deadline = out / "scratch.keras.lock", time.monotonic() + 120
        while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and lock.exists(), "the run never took its lock"
        time.sleep(2)  # into the training
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and err.splitlines()[-1] == "error: interrupted", err
    assert not lock.exists() and not any(p.name.startswith(".scratch.set-") for p in out.iterdir())


@pytest.mark.parametrize("where", ["file", "test class"])
def test_finetune_checks_its_prefix_cache_before_any_training(where, tmp_path, capsys):
    """Sixth pass (#22): --prefix-cache FILE was a traceback after the training; inside a test class folder its files became images."""
    from pipeline.cli import main

    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=4, size=(24, 24))
    test = make_tree(tmp_path / "test", classes=("a", "b"), per_class=2, size=(24, 24))
    cache = tmp_path / "pc" if where == "file" else test / "a" / "pc"
    if where == "file":
        cache.write_text("hi")
    assert main(["finetune", str(data), "--test", str(test), "--weights", "none", "--input-size", "32", "--epochs", "1", "--quiet",
                 "-o", str(tmp_path / "out"), "--prefix-cache", str(cache)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert ("exists and is not a folder" if where == "file" else "is inside the test images") in err
    assert not (tmp_path / "out").exists()


def test_an_export_named_like_a_stage_is_not_taken_for_its_set(tmp_path, capsys):
    """Seventh pass (#22): `export -o O/compare --format savedmodel` then `compare -o O`: compare replaced the export's metadata
    compare.json without a word (both sets are named "compare" and shared a receipt). A file is the set's only if that kind of set wrote it."""
    from pipeline.core.outputsets import publish

    out = tmp_path / "O"
    out.mkdir()
    with publish(out, "compare", ("compare", "compare.json"), lock="compare", locked=False) as stage:  # export's pair
        stage.path("compare").write_text("network")
        stage.path("compare.json").write_text("export metadata")
    with pytest.raises(PipelineError, match=r"compare\.json: is not a file this tool wrote here \(or it was changed since, or another output of that name wrote it\)"):
        with publish(out, "compare", ("compare.png", "compare.csv", "compare.md", "compare.json"), lock="compare.md", locked=False) as stage:
            for m in ("compare.png", "compare.csv", "compare.md", "compare.json"):
                stage.path(m).write_text("table")
    assert (out / "compare.json").read_text() == "export metadata"
    with publish(out, "compare", ("compare", "compare.json"), lock="compare", locked=False) as stage:  # the export again: its own files
        stage.path("compare").write_text("network 2")
        stage.path("compare.json").write_text("export metadata 2")
    assert (out / "compare.json").read_text() == "export metadata 2"


def test_finishing_a_killed_publication_keeps_a_file_edited_since_and_a_users_staging_named_folder(tmp_path, monkeypatch, capsys):
    """Twelfth pass (#22): a set whose publication was killed after its commit was finished by the next reader, replacing a report the
    user had edited since (no word); and a user's folder named like a dead process's staging folder (`.lr.set-4000000`) was deleted."""
    from pipeline.core import outputsets
    from pipeline.core.outputsets import publish, settle

    out = tmp_path / "out"
    out.mkdir()

    def write(report, bundle):
        with publish(out, "lr", ("lr.report.txt", "lr.joblib"), lock="lr.joblib", locked=False) as stage:
            stage.path("lr.joblib").write_text(bundle)
            stage.path("lr.report.txt").write_text(report)

    write("r1", "b1")
    mine = out / ".lr.set-999999999"
    mine.mkdir()
    (mine / "keep.txt").write_text("user data")
    real = outputsets._roll_forward

    def killed(*_):
        raise KeyboardInterrupt  # killed right after the commit, before any file moved

    monkeypatch.setattr(outputsets, "_roll_forward", killed)
    with pytest.raises(KeyboardInterrupt):
        write("r2", "b2")
    assert (mine / "keep.txt").read_text() == "user data"  # not the tool's staging: kept
    monkeypatch.setattr(outputsets, "_roll_forward", real)
    (out / "lr.report.txt").write_text("r1, annotated by hand")  # edited while the set waits to be finished
    capsys.readouterr()
    settle(out, "lr")  # what the next reader or writer does
    assert (out / "lr.report.txt").read_text() == "r2" and (out / "lr.joblib").read_text() == "b2"
    (edited,) = out.glob("lr.report.txt.edited-*")
    assert edited.read_text() == "r1, annotated by hand" and "the edited file is kept as lr.report.txt.edited-" in capsys.readouterr().err


def test_an_output_inside_a_split_beside_the_training_images_is_refused(tmp_path):
    """Twelfth pass (#22): `train DATA_train.h5 -o DATA/test/bag` was accepted (only DATA/train was guarded); the next extract of
    DATA/test took lr.confusion.png for a test image of bag."""
    data = tmp_path / "d"
    make_tree(data / "train", classes=("cat", "dog"), per_class=4)
    make_tree(data / "test", classes=("cat", "dog"), per_class=2)
    extract.run(ExtractConfig(data_dir=data / "train", output=tmp_path / "f.h5", input_size=32, weights="none", quiet=True))
    with pytest.raises(PipelineError, match=r"d/test/cat/m: is inside .*d/test, a split beside the image folder of .*d/train"):
        train.run(train.TrainConfig(features=tmp_path / "f.h5", output=data / "test" / "cat" / "m", quiet=True, **FAST_GRID["lr"]))
    assert not (data / "test" / "cat" / "m").exists()


@pytest.mark.parametrize("stage", ["export", "compare"])
def test_a_set_a_kill_left_half_moved_is_finished_before_its_members_are_checked(stage, tmp_path, monkeypatch, capsys):
    """Fourteenth pass (#22): export and compare checked their set's members before finishing the publication a kill had cut short:
    the half-moved new file was "not a file this tool wrote", every re-run refused, and the folder kept a mix of two runs."""
    from pipeline.cli import main
    from pipeline.core import outputsets

    make_tree(tmp_path / "d" / "train", per_class=4)
    make_tree(tmp_path / "d" / "test", per_class=2)
    extract.run(ExtractConfig(data_dir=tmp_path / "d" / "train", output=tmp_path / "f.h5", input_size=32, weights="none", quiet=True))
    train.run(train.TrainConfig(features=tmp_path / "f.h5", output=tmp_path / "m", cv=2, quiet=True, **FAST_GRID["lr"]))
    argv = (["export", str(tmp_path / "m" / "lr.joblib"), "-o", str(tmp_path / "x" / "net.keras"), "--weights", "none"] if stage == "export"
            else ["compare", "--data", str(tmp_path / "d"), "-o", str(tmp_path / "x"), "--weights", "none", "--input-size", "32", "--strategies", "lr", "--quiet"])  # fmt: skip
    assert main(argv) == 0
    real = outputsets._roll_forward

    def one_file_then_killed(journal, manifest):  # the first file moved in, then the process is gone
        first = manifest["install"][0]
        os.replace(journal / first, journal.parent / first)
        raise KeyboardInterrupt

    import os

    monkeypatch.setattr(outputsets, "_roll_forward", one_file_then_killed)
    assert main([*argv, "--overwrite"] if stage == "export" else argv) == 130
    monkeypatch.setattr(outputsets, "_roll_forward", real)
    capsys.readouterr()
    assert main([*argv, "--overwrite"] if stage == "export" else argv) == 0, capsys.readouterr().err
    assert not list((tmp_path / "x").glob(".*.set"))


@pytest.mark.parametrize("sig, delay", [("SIGINT", 0.4), ("SIGINT", 0.8), ("SIGTERM", 0.4), ("SIGTERM", 0.8)])
def test_a_signal_while_the_modules_load_is_one_line_and_130(sig, delay, tmp_path):
    """Fifteenth pass: Ctrl-C in the second the modules load (before cli.main's handling) was a traceback through the imports, and SIGTERM
    there a silent 143; ``python -m pipeline`` takes both from its first line (inside the command, its own message says more)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=4, size=(24, 24))
    argv = [sys.executable, "-m", "pipeline", "scratch", str(data), "--dense", "4", "--input-size", "32", "--epochs", "100000", "--patience",
            "100000", "--quiet", "-o", str(tmp_path / "out")]  # fmt: skip
    # Ctrl-C as a terminal sends it: to a child whose SIGINT is not ignored (this process's may be, after a library set it; the
    # child would inherit that, and ignore it as a background job does)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        time.sleep(delay)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: interrupted"), (proc.returncode, err[-3000:])
