"""Reliability: kill loops, hostile inputs, storage faults, concurrency, and the verify command."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, assert_recomputed_close, make_tree, write_image
from pipeline.images import decode
from pipeline.images.listing import list_images
from pipeline.cli import main
from pipeline.core.errors import PipelineError
from pipeline.featurefile.store import open_features
from pipeline.featurefile.checks import verify

FAST = ["--weights", "none", "--input-size", "32", "--batch-size", "4", "--quiet"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")


def extract(data, out, *extra):
    return main(["extract", str(data), "-o", str(out), *FAST, *extra])


def spawn(data, out, *extra, preexec_fn=None):
    cmd = [sys.executable, "-m", "pipeline", "extract", str(data), "-o", str(out), *FAST, "--workers", "1", *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)


def contents(out: Path):
    with open_features(out) as ff:
        feats = ff.db["features"][:]
        return {p: (lab, feats[k]) for k, (p, lab) in enumerate(zip(ff.paths, ff.labels.tolist()))}


def parts(out: Path) -> int:
    return len(list(out.with_name(out.name + ".partial").glob("part-*.part")))


@pytest.mark.slow
def test_kill_loop_at_random_moments_loses_and_duplicates_nothing(tmp_path):
    data = make_tree(tmp_path / "data", classes=("a", "b", "c", "d"), per_class=75, size=(10, 10))
    for name in ("a/003.png", "c/050.png"):
        (data / name).write_bytes(b"broken")
    reference = tmp_path / "ref.h5"
    assert extract(data, reference) == 0
    ref = contents(reference)
    assert len(ref) == 298

    out = tmp_path / "x.h5"
    rng = random.Random(1234)
    kills = during_work = 0
    for i in range(6):
        proc = spawn(data, out)
        if i in (0, 3):
            time.sleep(rng.uniform(0.05, 1.5))  # during start-up, before any work
        else:  # after a random number of further batches
            target = parts(out) + rng.randint(1, 12)
            while parts(out) < target and proc.poll() is None:
                time.sleep(0.005)
            during_work += 1
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.communicate(timeout=60)
        assert not out.exists(), "the output appears only when complete"
    assert kills >= 5 and during_work >= 3
    final = spawn(data, out)
    _, err = final.communicate(timeout=120)
    assert final.returncode == 0, err
    got = contents(out)
    assert set(got) == set(ref), "every path exactly once"
    for p, (lab, f) in ref.items():
        assert got[p][0] == lab
        assert_recomputed_close(got[p][1], f, err_msg=p)  # another process and batch composition
    with open_features(out) as ff:
        assert len(ff.paths) == len(set(ff.paths)) == 298
        assert sorted(x.decode() for x in ff.db["rejected/paths"][:]) == ["a/003.png", "c/050.png"]
    assert verify(out) == []


@pytest.mark.slow
def test_sigint_leaves_a_resumable_run_and_says_so(tmp_path):
    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=80, size=(10, 10))
    out = tmp_path / "x.h5"
    # Ctrl-C as a terminal delivers it: a test run started in the background of a script inherits
    # SIGINT ignored (the shell's rule for `cmd &`), and an ignored SIGINT stays ignored, as it should.
    proc = spawn(data, out, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while parts(out) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted: the test needs more batches"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "run the same command again to resume" in err
    assert parts(out) >= 2 and not out.exists()
    assert extract(data, out) == 0
    assert len(contents(out)) == 160


# --------------------------------------------------------------------------- hostile inputs
def _png_with_size(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (CRC fixed), with no image data."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + b"\0\0\0\0IEND\xaeB`\x82"


def _bad_icc(p: Path) -> None:
    Image.new("RGB", (16, 16), (1, 2, 3)).save(p, icc_profile=b"this is not an ICC profile" * 10)


def _animated_webp(p: Path) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in [(0, 255, 0), (255, 0, 0)]]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50)


HOSTILE = {
    # name: (writer, expected: None = extracted, else a substring of the reject reason)
    "zero_width.png": (lambda p: p.write_bytes(_png_with_size(0, 10)), "not an image"),
    "huge_header.png": (lambda p: p.write_bytes(_png_with_size(100000, 100000)), "decompression bomb"),
    "tall.png": (lambda p: write_image(p, size=(1, 3000)), None),
    "wide.png": (lambda p: write_image(p, size=(4000, 2)), None),
    "anim.webp": (_animated_webp, None),
    "bad_icc.png": (_bad_icc, None),
    "only_header.jpg": (lambda p: p.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"), "corrupt image header"),
    "html.png": (lambda p: p.write_text("<html><body>404 not found</body></html>"), "not an image"),
    "gif_as_png.png": (lambda p: Image.new("P", (8, 8)).save(p, format="GIF"), None),  # decoded by content
    "fifo.png": (lambda p: os.mkfifo(p), "not a regular file"),
    "device.png": (lambda p: os.symlink("/dev/zero", p), "not a regular file"),
    "folder.png": (lambda p: (p.mkdir(), write_image(p / "inner.png")), None),  # a folder named like an image: its image counts
    "loop.png": (lambda p: os.symlink(p, p), "dangling"),
    "one_pixel.bmp": (lambda p: Image.new("RGB", (1, 1), (9, 9, 9)).save(p), None),
    "la_mode.png": (lambda p: Image.new("LA", (8, 8)).save(p), None),
    "bilevel.tif": (lambda p: Image.new("1", (8, 8)).save(p), None),
    "cmyk.tif": (lambda p: Image.new("CMYK", (8, 8)).save(p), None),
    "bad_exif.jpg": (lambda p: Image.new("RGB", (8, 8)).save(p, exif=b"Exif\x00\x00MM\x00*garbage"), None),
}


@pytest.mark.slow
def test_hostile_inputs_each_extracted_or_rejected_and_counts_add_up(tmp_path, capsys):
    data = make_tree(tmp_path / "data", classes=("good", "bad"), per_class=2, size=(12, 12))
    expected_ok = {"good/000.png", "good/001.png", "bad/000.png", "bad/001.png"}
    expected_rej = {}
    for name, (make, reason) in HOSTILE.items():
        p = data / "bad" / name
        make(p)
        if name == "folder.png":
            expected_ok.add("bad/folder.png/inner.png")
        elif reason is None:
            expected_ok.add(f"bad/{name}")
        else:
            expected_rej[f"bad/{name}"] = reason
    # names that are not valid UTF-8, very deep folders
    weird = os.fsdecode(b"bad/caf\xe9-\xff.png")
    write_image(data / weird, size=(9, 9), seed=5)
    expected_ok.add(weird)
    deep = Path("good", *[f"d{i}" for i in range(60)], "deep.png")
    write_image(data / deep, size=(9, 9), seed=6)
    expected_ok.add(deep.as_posix())

    out = tmp_path / "x.h5"
    assert main(["extract", str(data), "-o", str(out), *FAST, "--image-timeout", "20"]) == 0
    summary = capsys.readouterr().out
    with open_features(out) as ff:
        got_ok = set(ff.paths)
        rejected = dict(zip([os.fsdecode(x) for x in ff.db["rejected/paths"][:]], [x.decode() for x in ff.db["rejected/reasons"][:]]))
    assert got_ok == expected_ok
    assert set(rejected) == set(expected_rej)
    for path, reason in expected_rej.items():
        assert reason in rejected[path], (path, rejected[path])
    assert f"extracted {len(expected_ok)} images, rejected {len(expected_rej)}" in summary
    assert verify(out) == []


def test_a_class_folder_whose_name_is_not_utf8(tmp_path, capsys):
    """Listing, digest, label_names in the file, reading it back, updates, shards and their merge."""
    from pipeline.extract.fingerprints import shard_path

    weird = os.fsdecode(b"caf\xe9")
    data = make_tree(tmp_path / "data", classes=(weird, "dog"), per_class=3, size=(12, 12))
    out = tmp_path / "x.h5"
    assert extract(data, out) == 0
    with open_features(out) as ff:
        assert ff.label_names == [weird, "dog"] and ff.paths[0] == f"{weird}/000.png" and ff.labels.tolist() == [0, 0, 0, 1, 1, 1]
        assert ff.db["label_names"][0] == b"caf\xe9"  # the folder's own bytes
    assert verify(out) == []
    capsys.readouterr()
    assert extract(data, out) == 0 and "up to date" in capsys.readouterr().out
    write_image(data / weird / "new.png", size=(12, 12), seed=40)
    assert extract(data, out) == 0 and "1 processed this run" in capsys.readouterr().out
    shards = [shard_path(tmp_path / "m.h5", k, 2) for k in range(2)]
    for k, shard in enumerate(shards):
        assert extract(data, shard, "--shards", "2", "--shard", str(k)) == 0
    assert main(["merge", str(tmp_path / "m.h5"), *map(str, shards)]) == 0
    with open_features(tmp_path / "m.h5") as ff:
        assert ff.label_names == [weird, "dog"] and len(ff) == 7
    assert verify(tmp_path / "m.h5") == []


def test_thousands_of_classes(tmp_path):
    data = tmp_path / "data"
    for c in range(1500):
        d = data / f"class{c:04d}"
        d.mkdir(parents=True)
        (d / "x.png").write_bytes(_tiny_png(c))
    out = tmp_path / "x.h5"
    assert main(["extract", str(data), "-o", str(out), "--weights", "none", "--input-size", "32", "--batch-size", "64", "--quiet"]) == 0
    with open_features(out) as ff:
        assert len(ff.label_names) == 1500 and ff.labels.tolist() == list(range(1500))


def _tiny_png(seed: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (seed % 256, seed // 256, 7)).save(buf, format="PNG")
    return buf.getvalue()


def test_files_vanishing_or_changing_between_listing_and_reading(tmp_path, monkeypatch):
    data = make_tree(tmp_path / "data", per_class=4)
    listing = list_images(data)
    (data / "cat" / "001.png").unlink()  # vanished after listing
    write_image(data / "dog" / "002.png", size=(50, 50), seed=42)  # changed after listing: read as it is now
    batches = list(decode.iter_batches(listing, np.arange(len(listing)), size=32, interpolation="bilinear", batch_size=8))
    b = batches[0]
    assert b.reasons[1] == "file vanished before it could be read" and not b.ok[1]
    assert b.ok[6]
    np.testing.assert_array_equal(b.pixels[6], decode.load_image(data / "dog" / "002.png", 32, "bilinear"))


def test_a_hanging_decode_is_rejected_by_the_time_limit_and_the_run_goes_on(tmp_path, monkeypatch):
    data = make_tree(tmp_path / "data", per_class=3)
    real = decode.load_image

    def slow(path, size, interpolation):
        if Path(path).name == "001.png" and Path(path).parent.name == "cat":
            time.sleep(5)  # a decoder stuck far beyond the limit
        return real(path, size, interpolation)

    monkeypatch.setattr(decode, "load_image", slow)
    listing = list_images(data)
    t0 = time.perf_counter()
    batches = list(decode.iter_batches(listing, np.arange(6), size=32, interpolation="bilinear", batch_size=4, workers=2, timeout=0.5))
    assert time.perf_counter() - t0 < 4.0, "the run must not wait for the stuck decode"
    ok = np.concatenate([b.ok for b in batches])
    reasons = sum((b.reasons for b in batches), [])
    assert ok.tolist() == [True, False, True, True, True, True]
    assert reasons[1] == "decoding took longer than 0.5 s (per-image time limit)"


# --------------------------------------------------------------------------- storage faults
def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_disk_full_fails_clearly_and_keeps_the_previous_output(tmp_path):
    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=30, size=(10, 10))
    out = tmp_path / "x.h5"
    assert extract(data, out, "--storage", "float32") == 0
    before = out.read_bytes()
    # the same run at a larger input size needs files bigger than the limit
    proc = spawn(data, out, "--overwrite", "--input-size", "64", "--storage", "float32", preexec_fn=_limit_file_size(60_000))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    last = err.strip().splitlines()[-1]  # TensorFlow's start-up notes come first
    assert last.startswith("error: ") and "no space left (or file size limit reached)" in last and "Traceback" not in err
    assert out.read_bytes() == before, "the previous complete output is untouched"
    assert verify(out) == []


def test_truncated_or_corrupted_feature_file_is_refused_clearly(tmp_path, capsys):
    data = make_tree(tmp_path / "data")
    out = tmp_path / "x.h5"
    assert extract(data, out) == 0
    raw = out.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(raw[: len(raw) // 2])
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(raw[:100] + bytes(255 - b for b in raw[100:400]) + raw[400:])
    for bad in (truncated, corrupt):
        problems = verify(bad)
        assert problems and str(bad) in problems[0]
        assert main(["verify", str(bad)]) == 1
        assert "FAIL" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0


def test_verify_names_each_broken_invariant(tmp_path):
    data = make_tree(tmp_path / "data")
    out = tmp_path / "x.h5"
    assert extract(data, out) == 0
    cases = {
        "incomplete": (lambda db: db.attrs.__setitem__("complete", False), "incomplete"),
        "no-checksum": (lambda db: db.attrs.__delitem__("weights_checksum"), "attribute 'weights_checksum' missing"),
        "duplicate": (lambda db: db["paths"].__setitem__(1, db["paths"][0]), "duplicate paths"),
        "label-range": (lambda db: db["labels"].__setitem__(0, 7), "labels range"),
        "nan": (lambda db: db["features"].__setitem__(2, np.full(db["features"].shape[1:], np.nan)), "non-finite"),
        "lengths": (lambda db: (db["labels"].resize((3,))), "different lengths"),
        "no-labels": (lambda db: db.__delitem__("labels"), "missing dataset 'labels'"),
    }
    for name, (damage, message) in cases.items():
        copy = tmp_path / f"{name}.h5"
        copy.write_bytes(out.read_bytes())
        with h5py.File(copy, "r+") as db:
            damage(db)
        problems = verify(copy)
        assert any(message in p for p in problems), (name, problems)


# --------------------------------------------------------------------------- concurrency
@pytest.mark.slow
def test_two_extractions_to_one_output_one_refuses(tmp_path):
    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=60, size=(10, 10))
    out = tmp_path / "x.h5"
    first = spawn(data, out)
    deadline = time.time() + 60
    while not out.with_name("x.h5.lock").exists() and time.time() < deadline:
        time.sleep(0.02)
    second = spawn(data, out)
    _, err2 = second.communicate(timeout=120)
    _, err1 = first.communicate(timeout=120)
    assert first.returncode == 0, err1
    assert second.returncode == 2 and "another run is writing this output" in err2
    assert len(contents(out)) == 120


@pytest.mark.slow
def test_readers_see_the_previous_complete_file_or_nothing(tmp_path):
    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=60, size=(10, 10))
    out = tmp_path / "x.h5"
    seen = set()
    for round_ in range(2):  # first: nothing before; second: an earlier complete file before
        proc = spawn(data, out, "--overwrite", *(["--storage", "float32"] if round_ else []))
        while proc.poll() is None:
            if out.exists():
                with open_features(out) as ff:  # raises if incomplete or torn
                    seen.add((round_, len(ff), str(ff.db["features"].dtype)))
            time.sleep(0.01)
        assert proc.returncode == 0, proc.communicate()
    assert (1, 120, "float16") in seen or (1, 120, "float32") in seen
    assert all(n == 120 for _, n, _ in seen)


# --------------------------------------------------------------------------- non-regular files
def test_a_fifo_is_refused_in_one_line_wherever_a_file_is_expected(tmp_path):
    """Issue #22: a FIFO given as an output or a feature file hung forever with no output."""
    data = make_tree(tmp_path / "data", per_class=2, size=(8, 8))
    good = tmp_path / "good.h5"
    assert extract(data, good) == 0
    fifo = tmp_path / "pipe.h5"
    os.mkfifo(fifo)
    cases = {
        "extract output": ["extract", str(data), "-o", str(fifo), *FAST],
        "verify": ["verify", str(fifo)],
        "train input": ["train", str(fifo), "-o", str(tmp_path / "m")],
        "merge input": ["merge", str(tmp_path / "m.h5"), str(fifo), str(good)],
    }
    for what, args in cases.items():
        proc = subprocess.run([sys.executable, "-m", "pipeline", *args], env=ENV, capture_output=True, text=True, timeout=120)
        lines = [x for x in proc.stdout.splitlines() + proc.stderr.splitlines() if x]
        assert proc.returncode in (1, 2) and len(lines) == 1 and "is a FIFO (named pipe)" in lines[0], (what, proc.stdout, proc.stderr)
    with pytest.raises(PipelineError, match=r"pipe\.h5: is a FIFO \(named pipe\), not a regular file; a feature file must be a regular file"):
        open_features(fifo)


# ---------------------------------------------------------------------------
# Output sets are all-or-nothing (core.outputsets): every stage that writes more than one file


def _set_files(folder: Path, prefix: str) -> dict[str, bytes]:
    """The bytes of every file of ``folder`` whose name starts with ``prefix`` (one output set)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name.startswith(prefix) and not p.name.endswith(".lock")}


def _leftovers(folder: Path) -> list[str]:
    """Staging folders, journals, temporaries and locks a publication could leave behind."""
    return sorted(p.name for p in folder.iterdir() if (p.name.startswith(".") and not p.name.endswith(".set.receipt")) or ".tmp" in p.name or p.name.endswith(".lock"))


def _full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _train_case(tmp_path):
    from feature_data import make_features
    from pipeline.classical import train

    feats = make_features(tmp_path / "f.h5", per_class=12)
    out = tmp_path / "models"

    def run(c):
        train.run(train.TrainConfig(features=feats, output=out, C=(c,), cv=2, quiet=True))

    return out, "lr.", lambda: run(0.01), lambda: run(1.0), "confusion_matrix"


def _net_case(stage: str):
    def case(tmp_path):
        from pipeline.nets import finetune, scratch

        data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=5, size=(16, 16))
        out = tmp_path / "out"
        tiny = dict(input_size=32, epochs=1, batch_size=8, quiet=True)

        def run(seed):
            if stage == "scratch":
                scratch.run(scratch.ScratchConfig(data, out_dir=out, filters=(4, 4, 4), dense=4, seed=seed, **tiny))
            else:
                finetune.run(finetune.FinetuneConfig(data, out_dir=out, weights="none", unfreeze_from="block5_conv3", seed=seed, **tiny))

        return out, f"{stage}.", lambda: run(0), lambda: run(1), "training_curves"

    return case


def _compare_case(tmp_path):
    root = tmp_path / "data"
    make_tree(root / "train", classes=("a", "b"), per_class=6, size=(16, 16))
    make_tree(root / "test", classes=("a", "b"), per_class=3, size=(16, 16))
    out = tmp_path / "out"

    def run(seed):  # through the CLI, as a user runs it: its exit status
        return main(["compare", "--data", str(root), "-o", str(out), "--weights", "none", "--input-size", "32", "--strategies", "lr", "--seed", str(seed), "--quiet"])

    return out, "compare.", lambda: run(0), lambda: run(1), "interval_chart"


def _bench_case(tmp_path):
    from feature_data import make_features
    from pipeline.bench import train as bench_train

    src = make_features(tmp_path / "f.h5", per_class=30, row_shape=(2, 2, 32), noise=3.0)
    out = tmp_path / "bench"

    def run():
        bench_train.run_train_bench(src, out, sizes=(90,), epochs=1, in_memory_mb=0.01, exact_max_rows=0, reads=1, say=lambda m: None)

    return out, "train_bench.", run, run, "line_chart"


STAGE_CASES = {"train": _train_case, "scratch": _net_case("scratch"), "finetune": _net_case("finetune"), "compare": _compare_case, "bench": _bench_case}


@pytest.mark.parametrize("stage", sorted(STAGE_CASES))
def test_a_write_failing_inside_an_output_set_leaves_the_previous_set_whole(stage, tmp_path, monkeypatch, capsys):
    """The disk fills at the set's plot (written after other files of the set): every file of the previous set is as it was, byte for byte, and nothing is left behind."""
    from pipeline.report import plots

    out, prefix, first, second, plot = STAGE_CASES[stage](tmp_path)
    assert first() in (None, 0)
    before = _set_files(out, prefix)
    assert len(before) >= 2, before.keys()
    with monkeypatch.context() as m:
        m.setattr(plots, plot, _full_disk)
        try:
            assert second() == 2, "the failed run says so"
            error = capsys.readouterr().err
        except (PipelineError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    assert _set_files(out, prefix) == before, "the previous set is whole: no file of the failed run beside it"
    assert "PipelineError" in error or error.startswith("error: "), f"one line, never a traceback: {error}"
    assert "no space left" in error.lower() and error.strip().count("\n") == 0, error
    assert _leftovers(out) == []
    assert second() in (None, 0)  # the next run publishes its whole set, and leaves nothing behind
    after = _set_files(out, prefix)
    assert set(after) == set(before) and _leftovers(out) == []


KILLER = """
import os, sys
from pathlib import Path

out, when = Path(sys.argv[1]), sys.argv[2]
replace, rename, moved = os.replace, os.rename, []


def killing_replace(src, dst, *a, **k):  # kill -9 after the first file of the set is in place
    if Path(dst).parent == out:
        moved.append(dst)
        if when == "between" and len(moved) == 2:
            os._exit(9)
    return replace(src, dst, *a, **k)


def killing_rename(src, dst, *a, **k):  # kill -9 just before the set is committed
    if when == "before" and Path(dst).parent == out and Path(dst).name.startswith("."):
        os._exit(9)
    return rename(src, dst, *a, **k)


os.replace, os.rename = killing_replace, killing_rename
from pipeline.cli import main

sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("when", ["before", "between"])
def test_a_kill_while_publishing_leaves_one_whole_set_for_readers_and_the_next_run(when, tmp_path):
    """kill -9 before the commit: the previous set stays whole, and the next run removes the staging folder; kill -9 between two renames:
    a reader (predict settles first) finds the whole new set, never a mix, and nothing is left behind."""
    import json

    import joblib

    from feature_data import make_features
    from pipeline.classical import train
    from pipeline.core.outputsets import settle_for

    feats = make_features(tmp_path / "f.h5", per_class=12)
    out = tmp_path / "models"
    train.run(train.TrainConfig(features=feats, output=out, C=(0.01,), cv=2, quiet=True))
    before = _set_files(out, "lr.")
    argv = ["train", str(feats), "-o", str(out), "--C", "1", "--cv", "2", "--quiet"]
    proc = subprocess.run([sys.executable, "-c", KILLER, str(out), when, *argv], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    if when == "before":
        assert _set_files(out, "lr.") == before
        assert [n for n in _leftovers(out) if ".set-" in n], "the killed run's staging folder is there until the next run"
        assert main(argv) == 0
    else:
        assert any(n == ".lr.set" for n in _leftovers(out)), "the committed set is in its journal"
        settle_for(out / "lr.joblib")
    bundle = joblib.load(out / "lr.joblib")
    metrics = json.loads((out / "lr.metrics.json").read_text())
    assert bundle["metrics"]["best_params"]["C"] == metrics["best_params"]["C"] == 1.0
    assert bundle["metrics"]["created"] == metrics["created"], "the bundle and the metrics beside it are of one run"
    assert "C=1" in (out / "lr.report.txt").read_text()
    assert _leftovers(out) == [] and sorted(_set_files(out, "lr.")) == sorted(before)


def test_a_member_the_new_set_does_not_have_goes_with_the_previous_set(tmp_path):
    """A dense-head finetune after an LP-FT one has no probe: the previous run's probe file is not left beside the new model."""
    from pipeline.core.outputsets import publish

    members = ("finetune.keras", "finetune.probe.joblib", "finetune.metrics.json")
    (tmp_path / "other.txt").write_text("not ours")
    for written in (members, (members[0], members[2])):
        with publish(tmp_path, "finetune", members, lock=members[0], locked=False) as stage:
            for name in written:
                stage.path(name).write_text(f"{len(written)} files")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".finetune.set.receipt", "finetune.keras", "finetune.metrics.json", "other.txt"]
    assert (tmp_path / "finetune.keras").read_text() == "2 files" and (tmp_path / "other.txt").read_text() == "not ours"
