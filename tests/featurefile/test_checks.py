"""The verify stage: a sound file passes; each broken invariant (also of a merged file whose shards moved on, or whose shard became a FIFO) is named; the command prints ok/FAIL per file and exits 1 on any failure."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from pipeline.core.errors import PipelineError
from pipeline.featurefile.store import open_features, stored_output

from pipeline.cli import main
from pipeline.backbones.registry import PREPROCESSING
from pipeline.extract.fingerprints import shard_path
from pipeline.extract.shardset import merge
from pipeline.featurefile.writer import write_feature_file
from pipeline.featurefile.checks import verify

#: Every attribute the contract asks of a file written by one extraction (``extract`` writes these).
ATTRS = {"backbone": "vgg16", "layer": "block5_pool", "input_size": 32, "feature_shape": [1, 1, 512], "preprocessing": PREPROCESSING,
         "resize": "bilinear", "weights": "none", "weights_source": "random init", "weights_checksum": "none", "precision": "float32",
         "storage_dtype": "float32", "batch_size": 4, "versions": "{}", "created": "2024-01-01T00:00:00+00:00",
         "command_line": "python -m pipeline extract", "data_dir": "/data", "extract_seconds": 0.5,
         "images_processed_last_run": 2, "incremental": False, "rows_kept": 0}  # fmt: skip


def write(path, paths, *, shard=None, shards=2, rejected=()):
    """A small feature file with one row per path (class = the path's folder)."""
    classes = ("a", "b")
    labels = np.array([classes.index(p.split("/")[0]) for p in paths])
    feats = np.arange(len(paths), dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 1, 512), np.float32)
    n = 1 if shard is None else shards
    fp = {"backbone": "vgg16", "shards": n, "shard": shard or 0, "listing_sha256": str(paths), "n_files": len(paths)}
    write_feature_file(
        path, row_shape=(1, 1, 512), storage="float32", class_names=classes,
        rows=iter([(feats, labels, list(paths), np.ones(len(paths)), np.zeros(len(paths)))]),
        rejected=list(rejected), attrs={**ATTRS, "shards": n, "shard": shard or 0, "fingerprint": json.dumps(fp, sort_keys=True)},
    )  # fmt: skip
    return path


def test_a_sound_file_passes_and_the_command_says_ok(tmp_path, capsys):
    good = write(tmp_path / "good.h5", ["a/1.png", "b/2.png"], rejected=[("b/3.png", "empty file (0 bytes)", 0, 0)])
    assert verify(good) == []
    assert main(["verify", str(good)]) == 0
    assert capsys.readouterr().out == f"ok {good}\n"


def test_each_file_is_reported_and_any_failure_exits_1(tmp_path, capsys):
    good = write(tmp_path / "good.h5", ["a/1.png", "b/2.png"])
    both = write(tmp_path / "both.h5", ["a/1.png", "b/2.png"], rejected=[("a/1.png", "corrupt", 0, 0)])
    missing = tmp_path / "missing.h5"
    assert verify(both) == [f"{both}: 1 paths are both extracted and rejected, e.g. a/1.png"]
    assert main(["verify", str(good), str(both), str(missing)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"ok {good}" and out[1] == f"FAIL {both}: 1 paths are both extracted and rejected, e.g. a/1.png"
    assert out[2].startswith(f"FAIL {missing}: feature file does not exist") and len(out) == 3


def test_a_merged_file_whose_shards_moved_on_is_named(tmp_path):
    out = tmp_path / "x.h5"
    shards = [write(shard_path(out, 0, 2), ["a/1.png", "b/3.png"], shard=0), write(shard_path(out, 1, 2), ["a/2.png"], shard=1)]
    assert merge(out, shards) == 3
    assert verify(out) == []
    write(shards[1], ["a/2.png", "b/4.png"], shard=1)  # re-extracted after the merge
    assert verify(out) == [f"{shards[1]}: shard file changed since the merge"]
    shards[0].unlink()
    problems = verify(out)
    assert problems == [f"{out}: merged file whose shard file(s) x.shard-00000-of-00002.h5 are missing; keep them next to it (move the folder as a whole)"]



def test_a_merged_file_whose_shard_is_a_fifo_is_refused_without_opening_it(tmp_path):
    """Issue #22: verify, and train through open_features, hung opening the FIFO (and did not die on SIGTERM)."""
    out = tmp_path / "x.h5"
    shards = [write(shard_path(out, 0, 2), ["a/1.png", "b/3.png"], shard=0), write(shard_path(out, 1, 2), ["a/2.png"], shard=1)]
    assert merge(out, shards) == 3
    shards[1].unlink()
    os.mkfifo(shards[1])
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "verify", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    line = f"{shards[1]}: is a FIFO (named pipe), not a regular file; a shard file of the merged file {out} must be a regular file"
    assert proc.returncode == 1 and proc.stdout == f"FAIL {line}\n", (proc.stdout, proc.stderr)
    assert verify(out) == [line]
    with pytest.raises(PipelineError) as exc:
        open_features(out)
    assert str(exc.value) == line
    assert stored_output(out).fingerprint is None and line in stored_output(out).problem


def damage_chunk(path, row: int) -> None:
    """Overwrite the middle of the compressed chunk holding ``row`` of ``features`` (the file stays a valid HDF5 file)."""
    import h5py

    with h5py.File(path, "r") as db:
        ds = db["features"]
        info = ds.id.get_chunk_info_by_coord((row - row % ds.chunks[0],) + (0,) * (ds.ndim - 1))
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        f.write(b"\xff" * min(16, info.size // 2))


def test_readers_apply_verify_s_rules_and_a_damaged_chunk_is_one_line(tmp_path, capsys):
    """Issue #22: train trained on files verify rejects (a stale shard of a merged file, rows dropped by another tool), and a damaged gzip chunk was a 12-frame OSError."""
    import h5py
    import pytest

    from pipeline.core.errors import PipelineError
    from pipeline.featurefile.store import open_features

    out = tmp_path / "x.h5"
    shards = [write(shard_path(out, 0, 2), ["a/1.png", "b/3.png"], shard=0), write(shard_path(out, 1, 2), ["a/2.png"], shard=1)]
    assert merge(out, shards) == 3
    open_features(out).db.close()
    write(shards[1], ["a/2.png", "b/4.png"], shard=1)  # re-extracted after the merge: verify says so, so must every reader
    with pytest.raises(PipelineError, match=r"x.shard-00001-of-00002.h5: shard file changed since the merge \(merge again"):
        open_features(out)
    write(shards[0], ["a/1.png"], shard=0)  # and one with fewer rows: the first read failed, "corrupt feature file" (fifteenth pass)
    with pytest.raises(PipelineError, match=r"x.shard-00000-of-00002.h5: shard file changed since the merge \(merge again, or run `extract --ray` again\) \(and 1 more"):
        open_features(out)
    edited = write(tmp_path / "edited.h5", [f"{c}/{i}.png" for c in "ab" for i in range(20)])
    with h5py.File(edited, "r+") as db:  # another tool drops the last row of two columns (the counts stay)
        for name in ("labels", "paths"):
            db[name].resize(39, axis=0)
    assert verify(edited)
    with pytest.raises(PipelineError, match=r"edited.h5: datasets have different lengths"):
        open_features(edited)
    damaged = write(tmp_path / "damaged.h5", [f"{c}/{i}.png" for c in "ab" for i in range(40)])
    damage_chunk(damaged, 40)
    with open_features(damaged) as ff:  # cheap checks pass: the features are not read on open
        with pytest.raises(PipelineError, match=r"damaged.h5: features of rows 32..48 cannot be read \(.*\); the file is damaged: extract it again") as err:
            for _ in ff.iter_chunks(rows=16):
                pass
        assert "\n" not in str(err.value)
        with pytest.raises(PipelineError, match=r"features of rows 0..80 cannot be read"):
            ff.db["features"][:]
    assert main(["train", str(damaged), "-o", str(tmp_path / "model"), "--model", "lr"]) == 2
    err = "".join(line for line in capsys.readouterr().err.splitlines(keepends=True) if not line.startswith("note: "))  # (synthetic rows)
    assert err.count("\n") == 1 and "damaged.h5: features of rows" in err and "Traceback" not in err


def test_a_label_that_is_not_its_class_folder_is_refused_by_verify_and_every_reader(tmp_path):
    """Second adversarial pass (#22): label_names reversed, or labels shifted, by another tool passed verify, and evaluate reported accuracy 0.000 with exit 0."""
    import h5py
    import pytest

    from pipeline.core.errors import PipelineError
    from pipeline.featurefile.store import open_features

    for edit in ("label_names", "labels"):
        path = write(tmp_path / f"{edit}.h5", [f"{c}/{i}.png" for c in "ab" for i in range(3)])
        assert verify(path) == []
        with h5py.File(path, "r+") as db:
            db[edit][...] = db[edit][:][::-1]
        want = "6 rows have a label that is not their class folder, e.g. row 0 (a/0.png) has label 'b' but lies in class folder 'a'"
        assert verify(path) == [f"{path}: {want}"]
        with pytest.raises(PipelineError, match=rf"^{path}: .*{re.escape(want)}"):
            open_features(path)


@pytest.mark.parametrize("how", ["external-link", "soft-link", "virtual", "external-storage", "unlisted-shard"])
def test_rows_stored_in_another_file_are_refused_by_verify_and_readers(how, tmp_path):
    """Sixteenth pass: a feature file whose features were an external link (or a virtual dataset outside a merged file) to another
    file's reversed rows passed verify, trained to 0.000 with exit 0, and was "up to date" for extract. A feature file holds its own rows."""
    import h5py

    out = tmp_path / "x.h5"
    other = write(tmp_path / "other.h5", ["b/2.png", "a/1.png"])
    if how == "unlisted-shard":
        shards = [write(shard_path(out, 0, 2), ["a/1.png"], shard=0), write(shard_path(out, 1, 2), ["b/2.png"], shard=1)]
        merge(out, shards)
    else:
        write(out, ["a/1.png", "b/2.png"])
    with h5py.File(other, "r") as db:
        shape, dtype = db["features"].shape, db["features"].dtype
    with h5py.File(out, "r+") as db:
        if how == "external-link":
            del db["features"]
            db["features"] = h5py.ExternalLink(str(other), "/features")
        elif how == "soft-link":
            db["kept"] = db["features"]  # a hard link under another name, then features a soft link to it
            del db["features"]
            db["features"] = h5py.SoftLink("/kept")
        elif how == "virtual" or how == "unlisted-shard":
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            layout[:] = h5py.VirtualSource(str(other), "features", shape=shape)
            del db["features"]
            db.create_virtual_dataset("features", layout)
        else:
            raw = db["features"][:]
            del db["features"]
            (tmp_path / "raw.bin").write_bytes(raw.tobytes())
            db.create_dataset("features", shape=shape, dtype=dtype, external=[(str(tmp_path / "raw.bin"), 0, raw.nbytes)])
    message = {"external-link": r"'features' is a link \(ExternalLink\) to .*other\.h5:/features, not stored in the file",
               "soft-link": r"'features' is a link \(SoftLink\) to /kept, not stored in the file",
               "virtual": r"its rows are virtual datasets of .*other\.h5 but it is not a merged file",
               "external-storage": r"'features' keeps its data in another file \(.*raw\.bin\)",
               "unlisted-shard": r"merged file reading .*other\.h5, which its merged record does not list"}[how]  # fmt: skip
    assert any(re.search(message, m) for m in verify(out)), verify(out)
    with pytest.raises(PipelineError, match=message):
        open_features(out)


def test_a_link_to_a_merged_file_from_another_folder_is_refused_with_the_way_to_read_it(tmp_path):
    """Eighteenth pass: through a link in another folder HDF5 looks for the shards beside the link, then in the current folder (a file
    of that name there is read), so the link is refused; the message now names the file the link leads to."""
    out = tmp_path / "sh" / "x.h5"
    out.parent.mkdir()
    shards = [write(shard_path(out, 0, 2), ["a/1.png", "b/3.png"], shard=0), write(shard_path(out, 1, 2), ["a/2.png"], shard=1)]
    merge(out, shards)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.h5").symlink_to(out)
    (tmp_path / "linked").symlink_to(out.parent)  # a linked folder keeps the shards beside it: read
    assert verify(tmp_path / "linked" / "x.h5") == []
    message = f"it is a link to {out}: name that file, or link its folder"
    assert message in verify(tmp_path / "elsewhere" / "x.h5")[0]
    with pytest.raises(PipelineError, match=re.escape(message)):
        open_features(tmp_path / "elsewhere" / "x.h5")
