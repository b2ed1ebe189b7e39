"""The ground floor's output helpers: file identity however spelled, paths within a folder, an output file's folder made and writable, the output lock (a full disk, a FIFO, stale temporaries)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.outputs import OutputLock, check_output_writable, is_within, same_file


def test_same_file_sees_through_spellings_and_links(tmp_path):
    (tmp_path / "d").mkdir()
    f = tmp_path / "d" / "x.h5"
    f.write_text("x")
    os.symlink(tmp_path / "d", tmp_path / "link")
    assert same_file(f, tmp_path / "d" / ".." / "d" / "x.h5")
    assert same_file(f, "/" + str(f))  # a leading // is the same file
    assert same_file(f, tmp_path / "link" / "x.h5")
    assert not same_file(f, tmp_path / "d" / "y.h5")
    assert same_file(tmp_path / "missing.h5", tmp_path / "link" / ".." / "missing.h5")


def test_is_within(tmp_path):
    assert is_within(tmp_path / "a" / "b.h5", tmp_path / "a")
    assert is_within(tmp_path / "a", tmp_path / "a")
    assert not is_within(tmp_path / "ab" / "x", tmp_path / "a")


def test_check_output_writable(tmp_path):
    check_output_writable(tmp_path / "new" / "deeper" / "x.h5")
    assert (tmp_path / "new" / "deeper").is_dir()
    (tmp_path / "folder.h5").mkdir()
    with pytest.raises(PipelineError, match=r"folder.h5: is a folder; the output must be a file path ending in .h5"):
        check_output_writable(tmp_path / "folder.h5")
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(PipelineError, match=r"blocker: the output's parent is not a folder"):
        check_output_writable(tmp_path / "blocker" / "x.h5")


def test_a_full_disk_in_the_lock_write_is_one_line_and_leaves_no_lock(tmp_path, monkeypatch):
    """Issue #22: a 100% full disk failed in the lock's pwrite with a traceback."""
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(PipelineError, match=r"x\.h5\.lock: no space left \(or file size limit reached\) while writing"):
        with OutputLock(tmp_path / "x.h5"):
            pass
    monkeypatch.undo()
    assert not (tmp_path / "x.h5.lock").exists()
    with OutputLock(tmp_path / "x.h5"):  # and the next run takes it
        pass


def test_a_fifo_as_the_lock_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "x.h5.lock")
    with pytest.raises(PipelineError, match=r"x\.h5\.lock: is a FIFO \(named pipe\), not a regular file"):
        with OutputLock(tmp_path / "x.h5"):
            pass


def test_temporaries_of_dead_processes_are_removed_by_the_next_lock_holder(tmp_path):
    """Issue #22: after kill -9 during assembly, .OUT.h5.tmp-PID was never removed."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".x.h5.tmp-{dead}"
    alive = tmp_path / f".x.h5.tmp-{os.getppid()}"  # a live process's: kept
    other = tmp_path / f".y.h5.tmp-{dead}"  # another output's: not this lock's business
    for p in (stale, alive, other):
        p.write_bytes(b"partial")
    with OutputLock(tmp_path / "x.h5"):
        pass
    assert not stale.exists() and alive.exists() and other.exists()


@pytest.mark.parametrize(
    "manifest",
    [
        {"set": "lr", "lock": "lr.joblib", "install": ["lr.joblib"], "remove": ["{victim}"]},  # an absolute path
        {"set": "lr", "lock": "lr.joblib", "install": ["lr.joblib"], "remove": ["../victim.txt"]},  # out of the folder
        {"set": "lr", "lock": "lr.joblib", "install": ["notes.txt"], "remove": []},  # not a file of the set
        {"set": "lr", "lock": "lr.joblib", "install": ["lr.joblib"], "remove": [None]},
        {"lock": "lr.joblib", "install": ["lr.joblib"], "remove": []},  # no set name
        {"set": "svm", "lock": "svm.joblib", "install": ["svm.joblib"], "remove": []},  # another set's journal
        {"set": "lr", "lock": "lr.joblib", "install": ["lr.joblib"], "remove": [], "folders": ["lr.report.txt"]},  # a folder it does not install
        {"set": "lr", "lock": "lr.joblib", "install": ["lr.joblib"], "remove": [], "folders": [{}]},
        [],
    ],
)
def test_a_hand_edited_publish_journal_is_one_line_and_moves_or_deletes_nothing(manifest, tmp_path):
    """Third adversarial pass (#22): a journal naming /tmp/victim.txt deleted it on the next predict; `[]` or a missing field was a traceback."""
    import json

    from pipeline.core.outputsets import settle_for

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    models = tmp_path / "models"
    (models / ".lr.set").mkdir(parents=True)
    (models / "lr.joblib").write_text("old")
    (models / ".lr.set" / "lr.joblib").write_text("new")
    (models / ".lr.set" / "notes.txt").write_text("x")
    text = json.dumps(manifest).replace("{victim}", str(victim))
    (models / ".lr.set" / "manifest.json").write_text(text)
    with pytest.raises(PipelineError, match=r"\.lr\.set: damaged publish journal \(.*\); the files beside it may mix two runs: remove it and run the stage again$"):
        settle_for(models / "lr.joblib")
    assert victim.read_text() == "precious" and (models / "lr.joblib").read_text() == "old"


@pytest.mark.parametrize("stopped", ["before the old folder moved", "between the two renames"])
def test_a_folder_member_killed_while_moving_in_is_finished_by_the_next_reader(stopped, tmp_path):
    """A set may hold a folder (export's SavedModel): the previous one is moved into the journal, the new one into place; a kill at either
    point leaves a journal that ``settle_for`` finishes: the new folder whole, the old one gone, nothing of it mixed in."""
    import json

    from pipeline.core.outputsets import journal_path, settle_for

    out = tmp_path / "out"
    journal = journal_path(out, "m")
    (journal / "m").mkdir(parents=True)
    (journal / "m" / "new.pb").write_text("new")
    (journal / "m.json").write_text("new meta")
    (journal / "manifest.json").write_text(json.dumps({"set": "m", "lock": "m", "install": ["m", "m.json"], "remove": [], "folders": ["m"]}))
    old = out / "m" if stopped == "before the old folder moved" else journal / "m.replaced"
    old.mkdir()
    (old / "old.pb").write_text("old")
    (out / "m.json").write_text("old meta")
    settle_for(out / "m.json")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["m", "m.json", "m/new.pb"]
    assert (out / "m.json").read_text() == "new meta"


@pytest.mark.parametrize("kind", ["symlink", "hard link", "user file"])
def test_a_lock_file_that_is_not_ours_is_refused_and_left_as_it_was(kind, tmp_path):
    """Fourth pass (#22): a lock path that was a symbolic link to a user's file (or a test image) had its target overwritten with the
    pid, exit 0; a hard link did the same; a user's file named like the lock was overwritten, then deleted."""
    precious = tmp_path / "precious.txt"
    precious.write_text("precious\n")
    lock = tmp_path / "x.h5.lock"
    if kind == "symlink":
        lock.symlink_to(precious)
    elif kind == "hard link":
        os.link(precious, lock)
    else:
        lock.write_text("my notes\n")
    expected = {"symlink": "is a symbolic link; a lock file is never a link", "hard link": "has 2 names \\(a hard link\\)",
                "user file": "holds other content than a process id"}[kind]  # fmt: skip
    with pytest.raises(PipelineError, match=rf"x\.h5\.lock: {expected}"):
        with OutputLock(tmp_path / "x.h5"):
            pass
    assert precious.read_text() == "precious\n" and os.path.lexists(lock)
    assert (lock.read_text() == "my notes\n") if kind == "user file" else True
    (tmp_path / "y.h5.lock").write_text("12345 pipeline-lock\n")  # a lock a killed run left: still taken
    with OutputLock(tmp_path / "y.h5"):
        pass
    (tmp_path / "z.h5.lock").write_text("2024\n")  # a user's file of digits is no lock (fifth pass: it was deleted)
    with pytest.raises(PipelineError, match=r"z\.h5\.lock: holds other content than a process id"):
        with OutputLock(tmp_path / "z.h5"):
            pass
    assert (tmp_path / "z.h5.lock").read_text() == "2024\n"


def test_what_a_killed_folder_swap_left_is_cleared_or_put_back(tmp_path):
    """Fourth pass (#22): evaluate killed during its folder swap left .EV.old-PID (a copy of the previous evaluation) for ever; killed between
    the two renames it left no EV at all. The next swap puts a lone previous folder back and removes the rest."""
    from pipeline.core.outputs import WORK_MARK, atomic_folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    ev = tmp_path / "ev"
    (tmp_path / f".ev.work-{dead}").write_text(WORK_MARK)  # what the killed run marked its folders with
    (tmp_path / f".ev.old-{dead}").mkdir()
    (tmp_path / f".ev.old-{dead}" / "metrics.json").write_text("previous")
    (tmp_path / f".ev.tmp-{dead}").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_folder(ev):
            raise RuntimeError("this run fails too")
    assert (ev / "metrics.json").read_text() == "previous"  # put back, then kept by the failed run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev"]
    (tmp_path / f".ev.work-{dead}").write_text(WORK_MARK)
    (tmp_path / f".ev.old-{dead}").mkdir()  # a leftover beside a folder that is there: removed
    with atomic_folder(ev) as tmp:
        (tmp / "metrics.json").write_text("new")
    assert (ev / "metrics.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["ev"]
    for kind in ("old", "tmp"):  # thirteenth pass: a user's folders of those names (no mark) were deleted
        (tmp_path / f".ev.{kind}-{dead}").mkdir()
        (tmp_path / f".ev.{kind}-{dead}" / "thesis.tex").write_text("mine")
    with atomic_folder(ev) as tmp:
        (tmp / "metrics.json").write_text("newer")
    assert (ev / "metrics.json").read_text() == "newer"
    assert all((tmp_path / f".ev.{kind}-{dead}" / "thesis.tex").read_text() == "mine" for kind in ("old", "tmp"))


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_receipt_or_journal_manifest_that_is_not_a_file_is_one_line_never_a_hang(kind, tmp_path):
    """Fifth pass (#22): a receipt that was a FIFO hung every writer of its set, a journal manifest that was one hung predict, evaluate and
    export; a receipt that was a folder let the set be installed (a user's file replaced) before the run failed."""
    from pipeline.core.outputsets import check_members, journal_path, receipt_path, settle_for

    out = tmp_path / "out"
    out.mkdir()
    (out / "lr.joblib").write_text("a user's file")
    receipt = receipt_path(out, "lr")
    os.mkfifo(receipt) if kind == "fifo" else receipt.mkdir()
    what = "a FIFO \\(named pipe\\)" if kind == "fifo" else "a folder"
    with pytest.raises(PipelineError, match=rf"\.lr\.set\.receipt: the output set's receipt is {what}, not a file this tool wrote; remove it"):
        check_members(out, "lr", ("lr.report.txt", "lr.joblib"))
    assert (out / "lr.joblib").read_text() == "a user's file"
    journal = journal_path(out, "svm")
    journal.mkdir()
    os.mkfifo(journal / "manifest.json") if kind == "fifo" else (journal / "manifest.json").mkdir()
    with pytest.raises(PipelineError, match=rf"manifest\.json: the publish journal's manifest is {what}"):
        settle_for(out / "svm.joblib")


def test_two_sets_of_one_name_keep_each_others_receipt_entries(tmp_path):
    """Fifth pass (#22): export -o FOLDER/finetune (set "finetune": finetune, finetune.json) beside finetune's own set overwrote its
    receipt, and the next finetune refused its own model. A publication keeps the receipt's entries of files it does not publish."""
    from pipeline.core.outputsets import publish

    def write(members, text):
        with publish(tmp_path, "finetune", members, lock=members[0], locked=False) as stage:
            for m in members:
                stage.path(m).write_text(text)

    write(("finetune.keras", "finetune.metrics.json"), "network stage")
    write(("finetune", "finetune.json"), "an export")
    write(("finetune.keras", "finetune.metrics.json"), "network stage, again")  # its files are still its own
    write(("finetune", "finetune.json"), "an export, again")
    assert (tmp_path / "finetune.keras").read_text() == "network stage, again" and (tmp_path / "finetune").read_text() == "an export, again"


def test_a_kept_array_is_reused_only_with_the_bytes_it_was_written_with(tmp_path):
    """Sixth pass (#22): a --prefix-cache file overwritten with other bytes of the same size was trusted (LP-FT scored 0.100 instead of
    0.467, exit 0); a file given as the cache folder was a traceback after the whole training."""
    import numpy as np

    from pipeline.core.digests import key_of, load_or_compute

    fields = {"what": "prefix outputs"}
    calls = []

    def compute():
        calls.append(1)
        return np.arange(12, dtype=np.float32).reshape(3, 4)

    first, reused = load_or_compute(tmp_path / "cache", fields, (3, 4), np.float32, compute)
    again, reused_again = load_or_compute(tmp_path / "cache", fields, (3, 4), np.float32, compute)
    assert not reused and reused_again and len(calls) == 1 and np.array_equal(first, again)
    (tmp_path / "cache" / f"{key_of(fields)}.bin").write_bytes(b"\x7f" * 48)  # same size, other bytes
    fresh, reused = load_or_compute(tmp_path / "cache", fields, (3, 4), np.float32, compute)
    assert not reused and len(calls) == 2 and np.array_equal(fresh, first)
    (tmp_path / "file").write_text("hi")
    with pytest.raises(PipelineError, match=r"file: exists and is not a folder; the cache needs a folder of its own"):
        load_or_compute(tmp_path / "file", fields, (3, 4), np.float32, compute)
    record = tmp_path / "cache" / f"{key_of(fields)}.json"  # tenth pass: a FIFO in place of the record hung compare
    record.unlink()
    os.mkfifo(record)
    import signal

    def hung(*_):
        raise TimeoutError("the cache read a FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        fresh, reused = load_or_compute(tmp_path / "cache", fields, (3, 4), np.float32, compute)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert not reused and len(calls) == 3 and np.array_equal(fresh, first) and record.is_file()


def test_a_blank_file_named_like_a_lock_is_not_taken_for_one(tmp_path):
    """Sixth pass (#22): a user's file of blank lines named P.csv.lock was taken as a lock and deleted; only an empty file (a lock being
    taken this instant) or `PID pipeline-lock` is one."""
    (tmp_path / "p.csv.lock").write_text("\n\n")
    with pytest.raises(PipelineError, match=r"p\.csv\.lock: holds other content than a process id"):
        with OutputLock(tmp_path / "p.csv"):
            pass
    assert (tmp_path / "p.csv.lock").read_text() == "\n\n"
