"""The data command (pipeline.datasets): the Fashion-MNIST PNG tree, its manifest, its flags and its errors."""

import gzip
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import datasets, fashion_mnist
from pipeline.cli import main
from pipeline.core.errors import PipelineError

# `make setup` installs the Debian package dataset-fashion-mnist; without it these tests fail, loudly.


@pytest.fixture(scope="module")
def idx():
    return {split: fashion_mnist.load_split(fashion_mnist.DEBIAN_DIR, split) for split in fashion_mnist.IDX_FILES}


@pytest.fixture
def tiny(tmp_path):
    out = tmp_path / "fmnist"
    result = datasets.build_fashion_mnist(out, train_per_class=3, test_per_class=2, progress=False)
    return out, result


def _pngs(out):
    return sorted(p.relative_to(out) for p in out.rglob("*.png"))


def test_tree_counts_and_result(tiny):
    out, result = tiny
    assert result == {"train": 30, "test": 20, "source": f"debian:{fashion_mnist.DEBIAN_DIR}",
                      "built": True, "out_dir": str(out), "why": None}
    for split, n in (("train", 3), ("test", 2)):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(fashion_mnist.FASHION_CLASSES)
        for cls in fashion_mnist.FASHION_CLASSES:
            assert len(list((out / split / cls).glob("*.png"))) == n
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["counts"] == {"train": 30, "test": 20}
    assert sorted(p.name for p in out.iterdir()) == ["MANIFEST.json", "test", "train"]
    assert [p.name for p in out.parent.iterdir()] == ["fmnist"]  # no temp folders left


def test_pngs_match_idx_images_and_labels(tiny, idx):
    out, _result = tiny
    for split in ("train", "test"):
        images, labels = idx[split]
        for cls_no, cls in enumerate(fashion_mnist.FASHION_CLASSES):
            for png in (out / split / cls).glob("*.png"):
                assert len(png.stem) == 5
                index = int(png.stem)
                assert labels[index] == cls_no
                with Image.open(png) as im:
                    assert im.size == (28, 28) and im.mode == "L"
                    np.testing.assert_array_equal(np.asarray(im), images[index])


def test_second_call_does_nothing(tiny, capsys):
    out, _result = tiny
    stamp = {p: p.stat().st_mtime_ns for p in [out / "MANIFEST.json", *out.rglob("*.png")]}
    again = datasets.build_fashion_mnist(out, train_per_class=3, test_per_class=2, progress=True)
    assert again["built"] is False and again["train"] == 30 and again["test"] == 20
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert "nothing to do" in capsys.readouterr().err


def test_changed_parameters_rebuild_cleanly(tiny):
    out, _result = tiny
    before = set(_pngs(out))
    result = datasets.build_fashion_mnist(out, train_per_class=4, test_per_class=2, seed=1,
                                          progress=False)
    assert result["built"] is True and result["train"] == 40 and result["test"] == 20
    after = set(_pngs(out))
    assert len(after) == 60 and after != before
    assert json.loads((out / "MANIFEST.json").read_text())["seed"] == 1
    assert [p.name for p in out.parent.iterdir()] == ["fmnist"]


def test_deleted_file_triggers_rebuild(tiny):
    out, _result = tiny
    gone = sorted(out.rglob("*.png"))[0]
    gone.unlink()
    result = datasets.build_fashion_mnist(out, train_per_class=3, test_per_class=2, progress=False)
    assert result["built"] is True and len(_pngs(out)) == 50
    assert result["why"] == f"1 file(s) listed in MANIFEST.json are missing (e.g. {gone.relative_to(out).as_posix()})"


def test_a_rebuild_never_deletes_what_the_tool_did_not_write(tiny, capsys):
    """Issue #22: a count mismatch rebuilt the root, deleting the user's images, notes and feature file, and said "built"."""
    out, _result = tiny
    mine = {out / "train" / "dress" / "my-own.png": b"user image", out / "notes.txt": b"keep me", out / "features" / "train.h5": b"HDF5"}
    for path, data in mine.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
    ours = sorted(out.rglob("0*.png"))
    # Added files alone: the set is still there, nothing to do and nothing touched.
    again = datasets.build_fashion_mnist(out, train_per_class=3, test_per_class=2, progress=True)
    assert again["built"] is False and "3 file(s) not written by this tool left as they are" in capsys.readouterr().err
    ours[0].unlink()  # now a rebuild is due: it refuses, naming a file it would delete
    with pytest.raises(PipelineError, match=r"holds 3 file\(s\) this tool did not write \(e.g. features/: .* \(1 file\(s\) listed in MANIFEST.json are missing"):
        datasets.build_fashion_mnist(out, train_per_class=3, test_per_class=2, progress=False)
    with pytest.raises(PipelineError, match=r"settings changed: train_per_class 3 -> 4"):
        datasets.build_fashion_mnist(out, train_per_class=4, test_per_class=2, progress=False)
    assert all(path.read_bytes() == data for path, data in mine.items())
    assert sorted(out.rglob("0*.png")) == ours[1:]
    assert main(["data", str(out), "--train-per-class", "3", "--test-per-class", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes.txt" not in err and "did not write" in err


def test_the_command_says_why_it_rebuilt_and_a_manifest_without_a_file_list_still_counts(tiny, capsys):
    out, _result = tiny
    manifest = json.loads((out / "MANIFEST.json").read_text())
    del manifest["files"]  # as the first version wrote it: its files follow from its settings
    (out / "MANIFEST.json").write_text(json.dumps(manifest))
    assert datasets.build_fashion_mnist(out, train_per_class=3, test_per_class=2, progress=False)["built"] is False
    assert main(["data", str(out), "--train-per-class", "2", "--test-per-class", "2", "--quiet"]) == 0
    assert "(rebuilt: settings changed: train_per_class 3 -> 2;" in capsys.readouterr().out
    assert len(_pngs(out)) == 40 and [p.name for p in out.parent.iterdir()] == ["fmnist"]
    (out / "MANIFEST.json").write_text("{not json")
    with pytest.raises(PipelineError, match="MANIFEST.json: unreadable manifest"):
        datasets.build_fashion_mnist(out, train_per_class=2, test_per_class=2, progress=False)


def test_same_seed_same_subset(tiny, tmp_path):
    out, _result = tiny
    other = tmp_path / "again"
    datasets.build_fashion_mnist(other, train_per_class=3, test_per_class=2, progress=False)
    assert _pngs(other) == _pngs(out)


def test_counts_at_or_above_available_mean_all(capsys):
    assert datasets._normalize(6000, "train", "x") is None
    assert datasets._normalize(1000, "test", "x") is None
    assert capsys.readouterr().err == ""
    assert datasets._normalize(1500, "test", "test_per_class") is None  # eleventh pass: taken as all without a word
    assert capsys.readouterr().err == "note: test_per_class 1500: Fashion-MNIST has 1000 test images per class; taking all of them\n"
    assert datasets._normalize(999, "test", "x") == 999
    with pytest.raises(PipelineError, match="positive"):
        datasets._normalize(0, "train", "train_per_class")


def _source_folder(tmp_path, bad_name, content):
    folder = tmp_path / "src"
    folder.mkdir()
    for names in fashion_mnist.IDX_FILES.values():
        for name in names:
            if name != bad_name:
                (folder / name).symlink_to(fashion_mnist.DEBIAN_DIR / name)
    (folder / bad_name).write_bytes(content)
    return folder


@pytest.mark.parametrize("content, why", [
    (gzip.compress(b"\x12\x34\x56\x78" + bytes(100)), "bad magic number 12345678"),
    (gzip.compress(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(10)),
     "images .magic 00000803. were expected"),
    (gzip.compress(b"\x00\x00\x08\x03" + b"\x00\x00\x27\x10\x00\x00\x00\x1c\x00\x00\x00\x1c"
                   + bytes(100)), "header says"),
    (b"this is not gzip", "cannot read idx file"),
], ids=["bad-magic", "labels-not-images", "truncated", "not-gzip"])
def test_corrupt_source_folder(tmp_path, content, why):
    bad = "t10k-images-idx3-ubyte.gz"
    folder = _source_folder(tmp_path, bad, content)
    with pytest.raises(PipelineError, match=why) as err:
        datasets.build_fashion_mnist(tmp_path / "out", train_per_class=1, test_per_class=1,
                                     source=folder, progress=False)
    assert str(folder / bad) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_source_folder_missing_files(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(PipelineError, match="lacks train-images-idx3-ubyte.gz"):
        datasets.build_fashion_mnist(tmp_path / "out", source=tmp_path / "src", progress=False)


def test_refuses_foreign_non_empty_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(PipelineError, match="not empty and was not built by this tool"):
        datasets.build_fashion_mnist(tmp_path, train_per_class=1, test_per_class=1, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_the_data_command_summary_and_error(tmp_path, capsys):
    assert main(["data", str(tmp_path / "d"), "--train-per-class", "2", "--test-per-class", "1",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "20 train + 10 test images" in out and "built" in out
    assert main(["data", str(tmp_path / "e"), "--source", str(tmp_path / "missing"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Fashion-MNIST source folder") and err.count("\n") == 1


def test_the_data_command_defaults_and_all():
    config = datasets.COMMAND.parse(["d"])
    assert (config.out_dir, config.train_per_class, config.test_per_class, config.seed, config.all, config.source) == (
        Path("d"), 100, 50, 0, False, None)
    assert datasets.COMMAND.parse(["d", "--all", "--source", "s"]).all is True


def test_keras_route_when_no_debian_files(tmp_path, monkeypatch, idx):
    import keras

    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    (xtr, ytr), (xte, yte) = idx["train"], idx["test"]
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data",
                        lambda: ((xtr.copy(), ytr.copy()), (xte.copy(), yte.copy())))
    result = datasets.build_fashion_mnist(tmp_path / "out", train_per_class=1, test_per_class=1,
                                          progress=False)
    assert result["source"] == "keras-download" and result["train"] == 10 and result["test"] == 10


def test_no_source_at_all_says_how_to_get_it(tmp_path, monkeypatch):
    import keras

    def offline():
        raise Exception("URL fetch failure on x: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.raises(PipelineError, match="apt-get install dataset-fashion-mnist") as err:
        datasets.build_fashion_mnist(tmp_path / "out", progress=False)
    assert "Name or service not known" in str(err.value)


def test_a_tree_that_cannot_be_written_is_one_line_and_left_as_it_was(tiny, monkeypatch, capsys):
    """Fourth pass (#22): `data` on a read-only tree (as a user without write permission) was a PermissionError traceback and left an
    empty .ROOT.old-* beside the tree. The tests run as root, who may write anywhere, so the refusals are simulated where they happen."""
    import os

    out, _result = tiny
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == out / "train" / "bag" else real_access(p, mode, **k))
    with pytest.raises(PipelineError, match=rf"{out}/train/bag: is not writable; the data command writes the tree beside fmnist and swaps it in"):
        datasets.build_fashion_mnist(out, train_per_class=4, test_per_class=2, progress=False)
    monkeypatch.setattr(os, "access", real_access)
    real_replace = os.replace

    def refuse_tree_move(src, dst):
        if Path(src) == out:  # renaming a folder needs write permission on the folder itself
            raise PermissionError(13, "Permission denied")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_tree_move)
    assert main(["data", str(out), "--train-per-class", "4", "--test-per-class", "2", "--quiet"]) == 2
    assert f"error: {out}: could not be written (Permission denied); the previous tree, if any, is as it was" in capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert [p.name for p in out.parent.iterdir()] == ["fmnist"]  # no .fmnist.old-* nor .fmnist.tmp-* left


def test_one_build_per_tree_at_a_time(tiny):
    """Fifth pass (#22): two `data` runs on one root at once both said "built" with their own counts; the tree held one run's."""
    from pipeline.core.outputs import OutputLock

    out, _result = tiny
    with OutputLock(out):  # another data run building this tree now
        with pytest.raises(PipelineError, match=r"fmnist\.lock: another run is writing this output \(pid \d+\)"):
            datasets.build_fashion_mnist(out, train_per_class=4, test_per_class=2, progress=False)
    assert json.loads((out / "MANIFEST.json").read_text())["train_per_class"] == 3


def test_a_build_killed_while_writing_leaves_nothing_the_next_one_keeps(tiny):
    """Sixth pass (#22): kill -9 during `data` left .ROOT.tmp-* with 7,100 PNGs for ever."""
    out, _result = tiny
    left = out.parent / ".fmnist.tmp-999999999"  # a dead process's
    (left / "train" / "bag").mkdir(parents=True)
    (left / "train" / "bag" / "00001.png").write_bytes(b"png")
    (left / datasets.WORK_MARK).write_text("")
    datasets.build_fashion_mnist(out, train_per_class=3, test_per_class=2, progress=False)
    assert not left.exists()


def test_a_listed_image_the_user_changed_is_never_replaced(tiny, capsys):
    """Eighth pass (#22): a rebuild with new settings replaced a listed image whose bytes the user had changed (MANIFEST.json listed
    files by index only). The manifest now records each file's digest; a changed one is not the tool's, and the rebuild is refused."""
    out, _result = tiny
    mine = sorted((out / "train" / "bag").iterdir())[0]
    with open(mine, "ab") as f:
        f.write(b"MYPHOTO")
    with pytest.raises(PipelineError, match=rf"holds 1 file\(s\) this tool did not write \(e\.g\. train/bag/{mine.name}: not in its MANIFEST\.json, changed since, unreadable, not a regular file, or a link\)"):
        datasets.build_fashion_mnist(out, train_per_class=4, test_per_class=2, progress=False)
    assert mine.read_bytes().endswith(b"MYPHOTO")


def test_a_listed_image_changed_during_a_rebuild_is_kept(tiny, monkeypatch, capsys):
    """Ninth pass (#22): the digests were compared before the build, and the previous tree's listed files were deleted by name after
    it: an image the user changed while the new tree was being written (seconds to minutes) was deleted."""
    out, _result = tiny
    mine = sorted((out / "train" / "bag").iterdir())[0]
    real = datasets.load_fashion_mnist

    def and_a_user_edit(source):  # after the check, before the swap
        mine.write_bytes(b"MYPHOTO")
        return real(source)

    monkeypatch.setattr(datasets, "load_fashion_mnist", and_a_user_edit)
    capsys.readouterr()
    datasets.build_fashion_mnist(out, train_per_class=4, test_per_class=2, progress=False)
    (old,) = out.parent.glob(".fmnist.old-*")
    assert (old / "tree" / "train" / "bag" / mine.name).read_bytes() == b"MYPHOTO"
    assert sorted(str(p.relative_to(old)) for p in old.rglob("*") if p.is_file() and p.name != datasets.WORK_MARK) == [f"tree/train/bag/{mine.name}"]  # its own files gone
    assert f"kept 1 file(s) this tool did not write, or that changed since it wrote them, in {old / 'tree'} (e.g. train/bag/{mine.name})" in capsys.readouterr().err
    datasets.build_fashion_mnist(out, train_per_class=3, test_per_class=2, progress=False)  # the next build leaves it alone
    assert (old / "tree" / "train" / "bag" / mine.name).read_bytes() == b"MYPHOTO"


def test_a_root_given_through_a_link_is_built_where_it_leads(tiny, tmp_path, monkeypatch):
    """Ninth pass (#22): `data LINK` moved the link aside and deleted the tree's files through it (the target was left empty, the link
    became a folder), and `data ROOT` and `data LINK` at once took two locks. `data .` was a traceback (the lock of an empty name)."""
    out, _result = tiny
    link = tmp_path / "link"
    link.symlink_to(out)
    result = datasets.build_fashion_mnist(link, train_per_class=4, test_per_class=2, progress=False)
    assert link.is_symlink() and result["built"] and result["out_dir"] == str(out.resolve())
    assert json.loads((out / "MANIFEST.json").read_text())["train_per_class"] == 4 and len(_pngs(out)) == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fmnist", "link"]
    monkeypatch.chdir(out / "train")
    assert not datasets.build_fashion_mnist("..", train_per_class=4, test_per_class=2, progress=False)["built"]
    monkeypatch.chdir(out)
    assert datasets.build_fashion_mnist(".", train_per_class=3, test_per_class=2, progress=False)["built"]
    assert len(_pngs(out)) == 50 and sorted(p.name for p in tmp_path.iterdir()) == ["fmnist", "link"]


def test_a_listed_image_that_is_a_fifo_or_unreadable_is_refused_not_read(tiny, tmp_path):
    """Ninth pass (#22): a FIFO in place of a listed PNG hung `data` (its digest read the FIFO); an unreadable one was a traceback."""
    import subprocess
    import sys

    out, _result = tiny
    fifo = sorted((out / "train" / "coat").iterdir())[0]
    fifo.unlink()
    os.mkfifo(fifo)
    run = subprocess.run([sys.executable, "-m", "pipeline", "data", str(out), "--train-per-class", "3", "--test-per-class", "2", "--quiet"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2 and f"train/coat/{fifo.name}: not in its MANIFEST.json, changed since, unreadable, not a regular file" in run.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_build_killed_while_removing_the_previous_tree_has_its_own_files_removed_next_time(tiny):
    """Ninth pass (#22): kill -9 while the previous tree was being deleted left .ROOT.old-* (4,004 PNGs) for ever."""
    import shutil

    out, _result = tiny
    left = out.parent / ".fmnist.old-999999999"  # a dead process's
    shutil.copytree(out, left / "tree")
    (left / "tree" / "train" / "bag" / "mine.txt").write_text("mine")
    (left / datasets.WORK_MARK).write_text("")
    datasets.build_fashion_mnist(out, train_per_class=3, test_per_class=2, progress=False)
    assert sorted(str(p.relative_to(left)) for p in left.rglob("*") if p.is_file() and p.name != datasets.WORK_MARK) == ["tree/train/bag/mine.txt"]


def test_only_the_data_command_s_own_work_folders_of_this_tree_are_cleared(tiny, tmp_path):
    """Tenth pass (#22): every `.ROOT.tmp-*` was deleted: a user's `.fmnist.tmp-notes`, the staging of another tree named
    `fmnist.tmp-b` being built at that moment (it said "built" with 23,653 of 30,030 images), and, for a root named with glob
    brackets, another root's staging."""
    import shutil

    out, _result = tiny
    mine = out.parent / ".fmnist.tmp-notes"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    other = out.parent / ".fmnist.tmp-b.tmp-999999999"  # another tree's (fmnist.tmp-b), of a dead process all the same
    other.mkdir()
    (other / datasets.WORK_MARK).write_text("")
    unmarked = out.parent / ".fmnist.tmp-999999998"  # a dead pid's name, but not the data command's folder
    unmarked.mkdir()
    datasets.build_fashion_mnist(out, train_per_class=4, test_per_class=2, progress=False)
    assert (mine / "keep.txt").read_text() == "precious" and other.is_dir() and unmarked.is_dir()
    shutil.copytree(out, tmp_path / "e5")
    staging = tmp_path / ".e5.tmp-999999997"
    staging.mkdir()
    (staging / datasets.WORK_MARK).write_text("")
    datasets.build_fashion_mnist(tmp_path / "e[5]", train_per_class=3, test_per_class=2, progress=False)
    assert staging.is_dir()  # e[5] is not e5


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_manifest_that_is_not_a_regular_file_is_one_line_never_read(tiny, kind):
    """Tenth pass (#22): MANIFEST.json as a FIFO hung `data`; as a link to /dev/zero it was a MemoryError traceback."""
    import subprocess
    import sys

    out, _result = tiny
    (out / "MANIFEST.json").unlink()
    if kind == "fifo":
        os.mkfifo(out / "MANIFEST.json")
    else:
        (out / "MANIFEST.json").symlink_to("/dev/zero")
    run = subprocess.run([sys.executable, "-m", "pipeline", "data", str(out), "--train-per-class", "3", "--test-per-class", "2", "--quiet"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2 and "MANIFEST.json: unreadable manifest (not a regular file)" in run.stderr and run.stderr.count("\n") == 1


def test_a_users_file_where_a_listed_folder_was_is_never_deleted(tiny, tmp_path):
    """Eleventh pass (#22): a user's file named like a listed folder (`train/bag`, `test`) counted as the tool's; the rebuild deleted it."""
    import shutil

    out, _result = tiny
    shutil.move(out / "train" / "bag", tmp_path / "moved")
    (out / "train" / "bag").write_text("precious notes")
    with pytest.raises(PipelineError, match=r"holds 1 file\(s\) this tool did not write \(e\.g\. train/bag: "):
        datasets.build_fashion_mnist(out, train_per_class=3, test_per_class=2, progress=False)
    assert (out / "train" / "bag").read_text() == "precious notes"
    old = tmp_path / "old"
    shutil.copytree(out, old / "tree")
    ours = datasets._manifest_files(json.loads((out / "MANIFEST.json").read_text()))
    datasets._remove_ours(old, ours, None)  # a file where a listed folder was, met at the removal: kept
    assert (old / "tree" / "train" / "bag").read_text() == "precious notes"


def test_a_tree_inside_another_data_tree_is_refused(tiny):
    """Twelfth pass (#22): `data ROOT/train/bag/more` built a tree of all ten classes inside the class folder bag: the next extract
    labelled its 30 images `bag`."""
    out, _result = tiny
    with pytest.raises(PipelineError, match=r"bag/more: is inside the data tree .*fmnist \(its MANIFEST\.json\); choose a folder outside it"):
        datasets.build_fashion_mnist(out / "train" / "bag" / "more", train_per_class=2, test_per_class=1, progress=False)
    assert not (out / "train" / "bag" / "more").exists()
