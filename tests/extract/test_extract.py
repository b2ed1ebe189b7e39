"""Extract stage: file layout, rejects, up-to-date and changed reruns (also files replaced with the same size and time, rejections of a changed limit, older files), clear errors, the lock, resume after kill -9 and after images changed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import ROOT, assert_recomputed_close, make_tree, write_image
from pipeline.cli import main
from pipeline.featurefile.store import open_features
from pipeline.featurefile.checks import verify
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import OutputLock

FAST = ["--weights", "none", "--input-size", "32", "--batch-size", "4", "--quiet"]


def extract(data, out, *extra):
    return main(["extract", str(data), "-o", str(out), *FAST, *extra])


def test_layout_of_the_feature_file(tmp_path, capsys):
    data = make_tree(tmp_path / "data", classes=("cat", "dog"), per_class=3)
    (data / "dog" / "broken.png").write_bytes(b"")
    (data / "dog" / "readme.txt").write_text("not an image")
    out = tmp_path / "features" / "x.h5"
    assert extract(data, out, "--precision", "float32") == 0
    summary = capsys.readouterr().out
    assert "extracted 6 images, rejected 2" in summary
    with h5py.File(out, "r") as db:
        assert db["features"].shape == (6, 1, 1, 512)
        assert db["features"].dtype == np.float16
        assert db["features"].chunks[0] >= 1 and db["features"].compression == "gzip"
        assert db["labels"][:].tolist() == [0, 0, 0, 1, 1, 1]
        assert [x.decode() for x in db["label_names"][:]] == ["cat", "dog"]
        assert [x.decode() for x in db["paths"][:]] == [f"{c}/{i:03d}.png" for c in ("cat", "dog") for i in range(3)]
        rejected = dict(zip([p.decode() for p in db["rejected/paths"][:]], [r.decode() for r in db["rejected/reasons"][:]]))
        assert rejected == {"dog/broken.png": "empty file (0 bytes)", "dog/readme.txt": "unsupported file type '.txt'"}
        a = db.attrs
        assert bool(a["complete"]) and a["backbone"] == "vgg16" and a["layer"] == "block5_pool"
        assert a["input_size"] == 32 and a["resize"] == "bilinear" and a["precision"] == "float32"
        assert a["weights"] == "none" and a["weights_checksum"] and a["storage_dtype"] == "float16"
        assert "tensorflow" in a["versions"] and "extract" in a["command_line"] and a["created"]
        assert np.isfinite(db["features"][:]).all() and np.abs(db["features"][:]).sum() > 0
    assert verify(out) == []
    assert not out.with_name("x.h5.partial").exists() and not out.with_name("x.h5.lock").exists()


def test_features_match_a_direct_model_call(tmp_path):
    """The stored rows are the network's output for the right file, in the listed order."""
    from pipeline.backbones.network import Backbone
    from pipeline.images.decode import load_image
    from pipeline.backbones.weights import resolve_weights

    data = make_tree(tmp_path / "data", per_class=4)
    out = tmp_path / "x.h5"
    assert extract(data, out, "--precision", "float32", "--storage", "float32") == 0
    net = Backbone(32, resolve_weights("none"), "float32", batch_size=4)
    with open_features(out) as ff:
        pixels = np.stack([load_image(data / p, 32, "bilinear") for p in ff.paths])
        np.testing.assert_allclose(ff.db["features"][:], net(pixels), rtol=1e-5, atol=1e-5)


def test_rerun_is_up_to_date_and_setting_changes_are_refused(tmp_path, capsys):
    data = make_tree(tmp_path / "data")
    out = tmp_path / "x.h5"
    assert extract(data, out) == 0
    before = out.stat().st_mtime_ns
    assert extract(data, out) == 0
    assert "up to date" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == before

    assert extract(data, out, "--storage", "float32") == 2
    err = capsys.readouterr().err
    assert "storage 'float16' -> 'float32'" in err and "--overwrite" in err and str(out) in err
    assert out.stat().st_mtime_ns == before

    assert extract(data, out, "--storage", "float32", "--overwrite") == 0
    with h5py.File(out, "r") as db:
        assert db["features"].dtype == np.float32


def _rows_by_path(out):
    with open_features(out) as ff:
        feats = ff.db["features"][:]
        return {p: (lab, feats[k]) for k, (p, lab) in enumerate(zip(ff.paths, ff.labels.tolist()))}


def test_changed_folder_is_updated_incrementally(tmp_path, capsys):
    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=6)
    (data / "a" / "bad.png").write_bytes(b"")
    out = tmp_path / "x.h5"
    assert extract(data, out) == 0
    old = _rows_by_path(out)
    capsys.readouterr()
    with open_features(out) as ff:
        first = {k: ff.attrs[k] for k in ("images_processed_last_run", "extract_seconds", "rate_images", "rate_seconds")}
    assert (first["rate_images"], first["rate_seconds"]) == (first["images_processed_last_run"], first["extract_seconds"]) and first["rate_images"] == 13

    (data / "b" / "002.png").unlink()  # removed
    write_image(data / "a" / "new.png", seed=77)  # added
    write_image(data / "b" / "004.png", seed=78)  # modified in place
    os.utime(data / "b" / "004.png", ns=(1, 1))
    (data / "c").mkdir()  # a new class
    write_image(data / "c" / "000.png", seed=79)
    loud = [a for a in FAST if a != "--quiet"]
    assert main(["extract", str(data), "-o", str(out), *loud]) == 0  # not quiet: says what it does
    captured = capsys.readouterr()
    assert "keeping 10 rows, dropping 2, 3 new or changed files to extract" in captured.err
    assert "3 processed this run" in captured.out

    fresh = tmp_path / "fresh.h5"
    assert extract(data, fresh) == 0
    new, ref = _rows_by_path(out), _rows_by_path(fresh)
    assert set(new) == set(ref) and len(new) == 13
    for p, (lab, f) in ref.items():
        assert new[p][0] == lab, p
        assert_recomputed_close(new[p][1], f, err_msg=p)  # recomputed (other batches), not copied
    for p in set(old) - {"b/004.png", "b/002.png"}:  # kept rows were copied, not recomputed
        np.testing.assert_array_equal(new[p][1], old[p][1])
    with open_features(out) as ff:
        assert ff.paths[-3:] == ["a/new.png", "b/004.png", "c/000.png"]  # new rows appended, in listing order
        assert ff.label_names == ["a", "b", "c"]
        assert [p.decode() for p in ff.db["rejected/paths"][:]] == ["a/bad.png"]
    assert verify(out) == []
    assert extract(data, out) == 0 and "up to date" in capsys.readouterr().out
    # the rate keeps the run that timed the most images: compare's images/s after an update was 3 images' start-up (fifteenth pass)
    from pipeline.compare.rows import extract_rate

    with open_features(out) as ff:
        assert ff.attrs["images_processed_last_run"] == 3
        assert (ff.attrs["rate_images"], ff.attrs["rate_seconds"]) == (first["rate_images"], first["rate_seconds"])  # copied, not recomputed
    assert extract_rate(out)[1] == first["rate_images"] / first["rate_seconds"]


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda t: None, [], r"data folder does not exist"),
        (lambda t: (t / "data").mkdir(), [], r"no class sub-folders"),
        (lambda t: make_tree(t / "data", classes=("one",)), [], r"only one class folder"),
        (lambda t: (make_tree(t / "data"), (t / "data" / "zz").mkdir()), [], r"zz: class folder has no image files"),
        (lambda t: (make_tree(t / "data"), (t / "blocker").write_text("x")), ["-o", "{t}/blocker/x.h5"], r"blocker: the output's parent is not a folder"),
        (lambda t: make_tree(t / "data"), ["-o", "{t}/x.txt"], r"must be an HDF5 file"),
        (lambda t: make_tree(t / "data"), ["--input-size", "16"], r"--input-size 16: every backbone needs at least 32"),
        (lambda t: make_tree(t / "data"), ["--weights", "{t}/nope.h5"], r"nope.h5"),
        (lambda t: make_tree(t / "data"), ["--image-timeout", "nan"], r"^error: --image-timeout nan: must be a finite number in \(0, inf\)$"),
        (lambda t: make_tree(t / "data"), ["--image-timeout", "inf"], r"^error: --image-timeout inf: must be a finite number in \(0, inf\)$"),
    ],
    ids=["missing", "no-classes", "one-class", "empty-class", "unwritable-output", "not-h5", "tiny-input", "missing-weights", "timeout-nan", "timeout-inf"],
)
def test_clear_one_line_errors_before_any_work(tmp_path, capsys, make, args, message):
    import re

    make(tmp_path)
    argv = ["extract", str(tmp_path / "data"), "-o", str(tmp_path / "out.h5"), *FAST]
    argv += [a.format(t=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err, re.M), err
    assert not (tmp_path / "out.h5").exists()


def test_strict_exits_nonzero_on_any_reject(tmp_path, capsys):
    data = make_tree(tmp_path / "data")
    (data / "cat" / "bad.jpg").write_text("nope")
    assert extract(data, tmp_path / "x.h5", "--strict") == 1
    assert "--strict: 1 files were rejected" in capsys.readouterr().err
    assert verify(tmp_path / "x.h5") == []  # the file is still written, with the reject listed


def test_second_run_on_a_locked_output_refuses(tmp_path, capsys):
    data = make_tree(tmp_path / "data")
    out = tmp_path / "x.h5"
    with OutputLock(out):
        assert extract(data, out) == 2
    assert "another run is writing this output" in capsys.readouterr().err
    assert not out.exists()
    assert extract(data, out) == 0  # the lock is gone with its holder


def _spawn(data, out, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "pipeline", "extract", str(data), "-o", str(out), *FAST, "--workers", "1", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_parts(out: Path, n: int, proc, timeout=120.0) -> None:
    work = out.with_name(out.name + ".partial")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(list(work.glob("part-*.part"))) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"extract ended before it could be interrupted: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("no progress")


def _read(out: Path):
    with open_features(out) as ff:
        return ff.paths, ff.labels, ff.db["features"][:], [p.decode() for p in ff.db["rejected/paths"][:]]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_resume_after_kill_gives_the_uninterrupted_file(tmp_path, sig):
    # 299 images in batches of 4: a run takes long enough after the 12th part for the signal to land.
    data = make_tree(tmp_path / "data", classes=("a", "b", "c"), per_class=100, size=(12, 12))
    (data / "b" / "009.png").write_bytes(b"\x89PNG broken")
    reference = tmp_path / "ref.h5"
    assert extract(data, reference) == 0

    out = tmp_path / "x.h5"
    for kill_after in (3, 12):
        proc = _spawn(data, out)
        _wait_for_parts(out, kill_after, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert not out.exists(), "the output must appear only when complete"
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:
            assert proc.returncode == 130 and "run the same command again to resume" in err
    proc = _spawn(data, out)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "resuming" not in err  # --quiet
    ref_paths, ref_labels, ref_feats, ref_rej = _read(reference)
    paths, labels, feats, rej = _read(out)
    assert paths == ref_paths and len(set(paths)) == len(paths) == 299
    assert labels.tolist() == ref_labels.tolist()
    assert rej == ref_rej == ["b/009.png"]
    assert_recomputed_close(feats, ref_feats)  # resumed batches start elsewhere: recomputed, not copied
    assert verify(out) == []


def test_images_are_decoded_by_content_not_by_name(tmp_path):
    """A PNG named .jpg, a JPEG named .png and a GIF named .png are rows whose features equal
    (within tolerance) the same images correctly named; HTML and text named like images are rejected."""
    from PIL import Image

    named, renamed = tmp_path / "named", tmp_path / "renamed"
    for root in (named, renamed):
        make_tree(root, classes=("a", "b"), per_class=2, seed=0)  # the other rows, identical in both trees
    cases = [("png_as_jpg", "PNG", ".png", ".jpg"), ("jpeg_as_png", "JPEG", ".jpg", ".png"), ("gif_as_png", "GIF", ".gif", ".png")]
    for k, (stem, fmt, right, wrong) in enumerate(cases):
        rng = np.random.default_rng(100 + k)
        img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
        if fmt == "GIF":
            img = img.convert("P")
        img.save(named / "a" / f"{stem}{right}", format=fmt)
        img.save(renamed / "a" / f"{stem}{wrong}", format=fmt)
    (renamed / "b" / "page.png").write_text("<!DOCTYPE html><html><body>404 not found</body></html>\n")
    (renamed / "b" / "notes.jpg").write_text("these are not pixels\n" * 10)

    assert extract(named, tmp_path / "named.h5", "--precision", "float32") == 0
    assert extract(renamed, tmp_path / "renamed.h5", "--precision", "float32") == 0
    ref, _ = _by_stem(tmp_path / "named.h5")
    got, rejected = _by_stem(tmp_path / "renamed.h5")
    assert set(got) == set(ref) and len(got) == 7
    for stem, (label, feats) in ref.items():
        assert got[stem][0] == label, stem
        assert_recomputed_close(got[stem][1], feats, err_msg=stem)
    assert set(rejected) == {"b/page.png", "b/notes.jpg"}
    assert all(reason.startswith("not an image") for reason in rejected.values()), rejected


def _by_stem(path):
    with open_features(path) as ff:
        feats = ff.db["features"][:]
        rows = {str(Path(p).with_suffix("")): (lab, feats[i]) for i, (p, lab) in enumerate(zip(ff.paths, ff.labels.tolist()))}
        rejected = dict(zip((p.decode() for p in ff.db["rejected/paths"][:]), (r.decode() for r in ff.db["rejected/reasons"][:])))
    return rows, rejected


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"image_timeout": float("nan")}, r"^--image-timeout nan: must be a finite number in \(0, inf\)$"),
        ({"image_timeout": float("inf")}, r"^--image-timeout inf: must be a finite number in \(0, inf\)$"),
        ({"image_timeout": 0.0}, r"^--image-timeout 0.0: must be a finite number in \(0, inf\)$"),
        ({"batch_size": 0}, r"^--batch-size 0: must be a whole number in \[1, 4294967295\]$"),
        ({"workers": -1}, r"^--workers -1: must be a whole number in \[0, 4294967295\]$"),
        ({"input_size": 16}, r"^--input-size 16: every backbone needs at least 32 pixels"),
        ({"precision": "float8"}, r"^--precision float8: must be one of auto, float32, bfloat16, float16, int8$"),
        ({"shards": 0}, r"^--shards 0: must be a whole number in \[1, 4294967295\]$"),
        ({"shards": 2, "shard": 2}, r"^--shard 2 of --shards 2: need 0 <= shard < shards$"),
        ({"ray_retries": 1}, r"^--address, --ray-workers and --ray-retries only apply with --ray$"),
        ({"ray": True, "ray_retries": -1}, r"^--ray-retries -1: must be a whole number in \[0, 4294967295\]$"),
    ],
)
def test_config_validation_names_the_flag_and_the_rule(tmp_path, flags, message):
    from pipeline.core.errors import PipelineError
    from pipeline.extract.config import ExtractConfig

    with pytest.raises(PipelineError, match=message):
        ExtractConfig(data_dir=tmp_path, output=tmp_path / "x.h5", **flags).validate()


def test_flags_build_the_config_with_its_defaults(tmp_path):
    from pipeline.extract import config as settings
    from pipeline.extract import stage

    config = stage.COMMAND.parse([str(tmp_path), "-o", "x.h5", "--ray", "--ray-workers", "2"])
    assert config == settings.ExtractConfig(data_dir=tmp_path, output=Path("x.h5"), ray=True, ray_workers=2, command_line=config.command_line)
    assert config.command_line == f"python -m pipeline extract {tmp_path} -o x.h5 --ray --ray-workers 2"
    assert config.input_size == 224 and config.ray_retries == settings.RAY_RETRIES == 3 and config.validate() is config


def test_one_decision_for_an_existing_output(tmp_path):
    from pipeline.core.errors import PipelineError
    from pipeline.extract.plan import REPLACE, UP_TO_DATE, UPDATE, decide

    out = tmp_path / "x.h5"
    fp = {"storage": "float16", "listing_sha256": "new", "n_files": 3, "class_names": ["a", "b"]}
    assert decide(out, None, fp, False, unusable="-") == REPLACE  # no output yet
    out.write_bytes(b"")
    assert decide(out, fp, fp, False, unusable="-") == UP_TO_DATE
    assert decide(out, fp, fp, True, unusable="-") == UP_TO_DATE  # --overwrite does not redo what is up to date
    assert decide(out, fp, fp, False, current=False, unusable="-") == UPDATE  # e.g. a merged file whose shards changed
    other_images = dict(fp, listing_sha256="old", n_files=2)
    assert decide(out, other_images, fp, False, unusable="-") == UPDATE
    assert decide(out, other_images, fp, True, unusable="-") == REPLACE
    with pytest.raises(PipelineError, match=r"x.h5: exists and differs: storage 'float32' -> 'float16'; pass --overwrite to replace it$"):
        decide(out, dict(fp, storage="float32"), fp, False, unusable="-")
    assert decide(out, dict(fp, storage="float32"), fp, True, unusable="-") == REPLACE
    with pytest.raises(PipelineError, match=r"x.h5: exists and it is not ours; pass --overwrite to replace it$"):
        decide(out, None, fp, False, unusable="it is not ours")
    with pytest.raises(PipelineError, match=r"x.h5: exists and it is not ours; pass --overwrite"):
        decide(out, fp, None, False, unusable="it is not ours")  # nothing to compare with


def _slow_decoding(monkeypatch, seconds):
    """Every image takes ``seconds`` to decode (a slow disk or decoder)."""
    from pipeline.images import decode

    real = decode.load_image

    def slow(path, size, interpolation):
        time.sleep(seconds)
        return real(path, size, interpolation)

    monkeypatch.setattr(decode, "load_image", slow)


def test_rejections_caused_by_a_limit_are_retried_when_it_changes_or_when_asked(tmp_path, capsys, monkeypatch):
    data = make_tree(tmp_path / "data", per_class=2, size=(12, 12))
    out = tmp_path / "x.h5"
    with monkeypatch.context() as m:
        _slow_decoding(m, 0.3)
        assert extract(data, out, "--image-timeout", "0.05") == 0
    assert "extracted 0 images, rejected 4 " in capsys.readouterr().out
    assert extract(data, out, "--image-timeout", "0.05") == 0  # the same limit: the rejections stand
    assert "up to date" in capsys.readouterr().out
    with h5py.File(out, "r") as db:
        limits = {x.decode() for x in db["rejected/limits"][:]} if "limits" in db["rejected"] else None
    assert extract(data, out, "--image-timeout", "600") == 0  # another limit: decoded again
    assert "extracted 4 images, rejected 0; 4 processed this run" in capsys.readouterr().out
    assert limits == {"image_timeout=0.05"}
    assert verify(out) == []

    (data / "dog" / "empty.png").write_bytes(b"")  # rejected for its content: kept while unchanged, whatever the limit
    assert extract(data, out, "--image-timeout", "600") == 0
    summary = capsys.readouterr().out
    assert "extracted 4 images, rejected 1 " in summary and "; 1 processed this run" in summary
    assert extract(data, out, "--image-timeout", "30") == 0
    assert "up to date" in capsys.readouterr().out
    assert extract(data, out, "--retry-rejected") == 0  # asked for: decoded again (and rejected again)
    summary = capsys.readouterr().out
    assert "extracted 4 images, rejected 1 " in summary and "; 1 processed this run" in summary


def _replace_keeping_size_and_time(path: Path, seed: int, in_place: bool) -> None:
    """What ``cp -p`` (in place) or ``rsync -a``/``tar`` (a new file renamed over it) do: other content, same size and mtime."""
    import shutil

    st = path.stat()
    new = write_image(path.with_name(f".new-{seed}.bmp"), seed=seed)
    if in_place:
        shutil.copyfile(new, path)
        new.unlink()
    else:
        os.replace(new, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert (path.stat().st_ino == st.st_ino) == in_place


def test_files_replaced_with_the_same_size_and_time_are_extracted_again(tmp_path, capsys):
    data = make_tree(tmp_path / "data", per_class=3, ext=".bmp")  # uncompressed: same dimensions, same size
    out = tmp_path / "x.h5"
    assert extract(data, out) == 0
    old = _rows_by_path(out)
    _replace_keeping_size_and_time(data / "cat" / "000.bmp", seed=90, in_place=True)  # cp -p
    _replace_keeping_size_and_time(data / "dog" / "001.bmp", seed=91, in_place=False)  # rsync -a, tar
    capsys.readouterr()
    assert extract(data, out) == 0
    assert "2 processed this run" in capsys.readouterr().out
    assert extract(data, tmp_path / "fresh.h5") == 0
    new, ref = _rows_by_path(out), _rows_by_path(tmp_path / "fresh.h5")
    for p in ("cat/000.bmp", "dog/001.bmp"):
        assert_recomputed_close(new[p][1], ref[p][1], err_msg=p)
        assert not np.allclose(new[p][1], old[p][1], rtol=2e-3, atol=2e-3), p
    for p in set(old) - {"cat/000.bmp", "dog/001.bmp"}:
        np.testing.assert_array_equal(new[p][1], old[p][1])
    with h5py.File(out, "r") as db:
        assert (db["file_inodes"][:] > 0).all() and (db["file_ctimes_ns"][:] > 0).all()
    assert verify(out) == []


def test_a_feature_file_of_an_earlier_format_is_refused_in_one_line(tmp_path, capsys):
    """A file written before inodes and change times were recorded (format 1): every command
    that reads it names it and says to extract it again; ``--overwrite`` does."""
    data = make_tree(tmp_path / "data")
    out = tmp_path / "x.h5"
    assert extract(data, out) == 0
    with h5py.File(out, "r+") as db:
        for name in ("file_inodes", "file_ctimes_ns", "rejected/file_inodes", "rejected/file_ctimes_ns", "rejected/limits"):
            del db[name]
        db.attrs["format_version"] = 1
    why = "written by another version of the pipeline (format_version 1, this version reads 2)"
    assert f"{out}: {why}; extract it again" in verify(out)
    with pytest.raises(PipelineError, match=re.escape(f"{out}: {why}; extract it again")):
        open_features(out)
    capsys.readouterr()
    assert extract(data, out) == 2
    assert capsys.readouterr().err == f"error: {out}: exists and it was {why}; pass --overwrite to replace it\n"
    assert extract(data, out, "--overwrite") == 0 and verify(out) == []
    with h5py.File(out, "r") as db:
        assert db.attrs["format_version"] == 2 and "file_inodes" in db and "limits" in db["rejected"]


def test_resume_after_an_image_changed_keeps_the_finished_parts_of_unchanged_images(tmp_path, capsys, monkeypatch):
    from conftest import assert_same_rows, stopping_batches
    from pipeline.extract import loop as runner

    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=8, size=(12, 12))
    out = tmp_path / "x.h5"

    with monkeypatch.context() as m:
        m.setattr(runner, "iter_batches", stopping_batches(2))
        assert extract(data, out, "--workers", "1") == 130
    parts = sorted(out.with_name("x.h5.partial").glob("part-*.part"))
    assert len(parts) == 2 and not out.exists()  # a/000..a/007 done, in two parts of 4
    write_image(data / "a" / "001.png", seed=99)  # in a finished part: changed since
    (data / "a" / "002.png").unlink()  # in a finished part: deleted since
    write_image(data / "a" / "000-new.png", seed=98)  # a new file sorting inside the finished ones
    capsys.readouterr()
    loud = [a for a in FAST if a != "--quiet"]
    assert main(["extract", str(data), "-o", str(out), *loud]) == 0
    captured = capsys.readouterr()
    assert f"resuming {out}: 6 of 16 files already done" in captured.err
    assert "10 processed this run" in captured.out and not out.with_name("x.h5.partial").exists()
    assert extract(data, tmp_path / "fresh.h5") == 0
    assert_same_rows(out, tmp_path / "fresh.h5")
    assert verify(out) == []


def test_the_summary_names_the_classes_with_their_counts_and_warns_of_a_small_class(tmp_path, capsys):
    """Issue #23: the summary named no classes and no counts."""
    data = make_tree(tmp_path / "data", classes=("cat", "dog"), per_class=20, size=(8, 8))
    write_image(data / "owl" / "only.png", size=(8, 8))
    out = tmp_path / "x.h5"
    assert extract(data, out) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1 and captured.out.rstrip().endswith(f"-> {out} (3 classes: cat 20, dog 20, owl 1)")
    assert "warning: class 'owl' has 1 of the 41 images (2.4%)" in captured.err
    assert extract(data, out) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{out}: up to date (41 images, nothing changed; 3 classes: cat 20, dog 20, owl 1)\n"
    assert "warning: class 'owl'" in captured.err


def test_a_folder_of_splits_is_refused_in_one_line_before_any_work(tmp_path, capsys):
    """Issue #23: `extract mydata` where mydata/ holds train/ and test/ succeeded with two classes, test and train."""
    for split in ("train", "test"):
        make_tree(tmp_path / "mydata" / split, per_class=1, size=(8, 8))
    assert extract(tmp_path / "mydata", tmp_path / "x.h5") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"point at {tmp_path / 'mydata' / 'train'} for the training split and at {tmp_path / 'mydata' / 'test'}" in err
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.partial").exists()


def test_a_run_that_processed_no_image_leaves_nothing_that_blocks_the_corrected_command(tmp_path, capsys, monkeypatch):
    """Issue #22: a run failing before its first image left a work area that made the corrected command refuse ("re-run with its settings")."""
    from pipeline.backbones import int8 as engines

    data = make_tree(tmp_path / "data", per_class=2, size=(8, 8))
    out = tmp_path / "x.h5"

    def broken(*args, **kwargs):
        raise PipelineError("the network could not be built")

    with monkeypatch.context() as mp:
        mp.setattr(engines, "open_backbone", broken)
        assert extract(data, out, "--storage", "float32") == 2
    assert out.with_name("x.h5.partial").exists()  # its manifest, and no part
    stale = tmp_path / ".x.h5.tmp-4194303"  # beyond Linux's pid_max: a process that is gone (kill -9 during assembly)
    stale.write_bytes(b"partial")
    capsys.readouterr()
    assert extract(data, out) == 0, capsys.readouterr().err  # the corrected command: other settings
    assert verify(out) == [] and not stale.exists() and not out.with_name("x.h5.partial").exists()


def test_changing_only_the_sharding_is_named_as_such(tmp_path, capsys):
    """Issue #22: changing only --shards was reported as "the images changed"."""
    data = make_tree(tmp_path / "data", per_class=4, size=(8, 8))
    out = tmp_path / "x.h5"
    assert extract(data, out) == 0
    assert extract(data, out, "--shards", "2", "--shard", "0") == 2
    err = capsys.readouterr().err
    assert "exists and differs: shards 1 -> 2; pass --overwrite" in err and "images changed" not in err
    write_image(data / "cat" / "new.png", size=(8, 8), seed=9)
    assert extract(data, out, "--shards", "2", "--shard", "0") == 2
    assert "exists and differs: shards 1 -> 2; the images changed (8 files before, 9 now" in capsys.readouterr().err
