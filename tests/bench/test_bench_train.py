"""``bench --train``: replicated rows, the read-pass reference, both modes timed, and the table, JSON and chart it writes; a full disk is one line."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from feature_data import make_features
from pipeline.bench import train as bench_train
from pipeline.featurefile.store import open_features


def test_replicate_copies_the_rows_with_a_small_seeded_perturbation_class_by_class(tmp_path):
    src = make_features(tmp_path / "src.h5", per_class=20, row_shape=(2, 2, 16))
    n = bench_train.replicate(src, tmp_path / "big.h5", 150, seed=3)
    assert n == 150
    with open_features(src) as a, open_features(tmp_path / "big.h5") as b:
        xa, xb, yb = a.db["features"][:].astype(np.float32), b.db["features"][:].astype(np.float32), b.labels
        assert b.spec == a.spec and b.label_names == a.label_names
    assert np.array_equal(yb, np.repeat([0, 1, 2], 50))  # class by class, like an extraction
    np.testing.assert_array_equal(xb[:20], xa[:20])  # the first copy is the rows themselves
    rel = np.abs(xb[20:40] / xa[:20] - 1)
    assert 0.01 < np.median(rel) < 0.1  # then copies within a few percent
    bench_train.replicate(src, tmp_path / "again.h5", 150, seed=3)
    with open_features(tmp_path / "again.h5") as c:
        np.testing.assert_array_equal(c.db["features"][:], xb.astype(np.float16))  # seeded


def test_the_train_bench_times_both_modes_against_the_read_pass_and_writes_its_outputs(tmp_path):
    src = make_features(tmp_path / "train.h5", per_class=30, row_shape=(2, 2, 32), noise=3.0)
    test = make_features(tmp_path / "test.h5", per_class=20, row_shape=(2, 2, 32), noise=3.0, seed=7)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    left, users = tmp_path / f".train-bench.scratch-{dead}", tmp_path / f".train-bench.scratch-{int(dead) + 1000000}"
    (left / "rows-400.h5").parent.mkdir()
    (left / "rows-400.h5").write_bytes(b"x" * 1000)  # the row files a kill -9 left beside -o, for good (seventeenth pass)
    (left / ".pipeline-staging").write_bytes(b"")
    (users / "mine.txt").parent.mkdir()
    (users / "mine.txt").write_text("a user's folder of that name: not the tool's (no mark)")
    said = []
    out = tmp_path / "bench"
    r = bench_train.run_train_bench(src, out, test=test, sizes=(90, 360), epochs=2, in_memory_mb=0.1, exact_max_rows=0, reads=1, say=said.append)
    assert [row["rows"] for row in r["rows"]] == [90, 360]
    small, big = r["rows"]
    assert "in_memory" in small and "in_memory" not in big  # 360 x 128 x 4 bytes > 0.1 MB: out of core only
    assert small["in_memory"]["space"] == "features" and 0.5 < small["in_memory"]["accuracy"] <= 1
    for row in r["rows"]:
        assert row["read_seconds"] > 0 and row["out_of_core"]["seconds"] > 0
        assert row["ratio"] == row["out_of_core"]["seconds"] / (row["read_seconds"] * 2)
        assert row["out_of_core"]["rows_per_s"] == row["rows"] * 2 / row["out_of_core"]["seconds"]
    on_disk = json.loads((out / "train_bench.json").read_text())
    assert on_disk["rows"][1]["rows"] == 360 and on_disk["noise"] == bench_train.NOISE
    table = (out / "train_bench.md").read_text()
    assert "| 360 |" in table and table.count("\n| ") == 3  # the header and two sizes
    assert (out / "train_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("read pass" in s for s in said)
    assert [p.name for p in tmp_path.glob(".train-bench.scratch-*")] == [users.name]  # the replicated files are gone, the killed run's too


def test_bench_train_from_the_command_line(tmp_path):
    from pipeline.cli import main

    src = make_features(tmp_path / "train.h5", per_class=20, row_shape=(2, 2, 16))
    test = make_features(tmp_path / "test.h5", per_class=10, row_shape=(2, 2, 16), seed=7)
    argv = ["bench", "--train", "--replay", str(src), "--test-features", str(test), "--train-sizes", "60,120", "-o", str(tmp_path / "b"), "--quiet"]
    assert main(argv) == 0
    assert [row["rows"] for row in json.loads((tmp_path / "b" / "train_bench.json").read_text())["rows"]] == [60, 120]


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("limit", [1024, 16384, 65536])
def test_a_full_disk_while_replicating_is_one_line_leaves_the_previous_outputs_and_no_row_files(tmp_path, limit):
    src = make_features(tmp_path / "train.h5", per_class=30, row_shape=(2, 2, 32), noise=3.0)
    test = make_features(tmp_path / "test.h5", per_class=20, row_shape=(2, 2, 32), noise=3.0, seed=7)
    out = tmp_path / "bench"
    bench_train.run_train_bench(src, out, test=test, sizes=(90,), epochs=1, exact_max_rows=0, reads=1, say=lambda s: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", TMPDIR=str(temp))
    cmd = [sys.executable, "-m", "pipeline", "bench", "--train", "--replay", str(src), "--test-features", str(test), "--train-sizes", "90,720", "-o", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path, preexec_fn=_file_size_limit(limit))
    assert proc.returncode == 2, (proc.returncode, proc.stderr)  # not 1 (a traceback), not -11 (a crash)
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("note: ")]  # (synthetic rows: their images cannot be compared)
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(".h5: no space left (or file size limit reached) while writing: File too large")
    assert "/rows-" in lines[0]  # the replicated rows: the file that did not fit
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob("train-bench-*")) and not os.listdir(temp)  # the row files' folder is gone


def test_the_train_bench_refuses_to_score_on_its_own_training_rows(tmp_path, capsys):
    """Fifth pass (#22): bench --train --replay te.h5 --test-features te.h5 reported accuracy 1.000 (train refuses the same pair)."""
    from pipeline.cli import main

    src = make_features(tmp_path / "train.h5", per_class=20, row_shape=(2, 2, 16))
    assert main(["bench", "--train", "--replay", str(src), "--test-features", str(src), "--train-sizes", "60", "-o", str(tmp_path / "b"), "--quiet"]) == 2
    assert f"{src}: is the training file {src}; a test set must hold other images" in capsys.readouterr().err
    assert not (tmp_path / "b" / "train_bench.md").exists()


def test_a_merged_replay_file_is_replicated_as_a_single_file(tmp_path):
    """Tenth pass (#22): `bench --train --replay MERGED.h5` copied the merged file's attributes into its row file, then refused that
    file for missing its merged record (naming a temporary that no longer existed)."""
    from shard_data import make_run
    from pipeline.extract import merge as merge_mod
    from pipeline.featurefile.checks import verify

    _data, reference, _out, shards = make_run(tmp_path)
    assert merge_mod.run(merge_mod.COMMAND.parse([str(tmp_path / "m.h5"), *map(str, shards)])) == 0
    assert bench_train.replicate(tmp_path / "m.h5", tmp_path / "rows.h5", 40) >= 38  # per class, rounded down
    assert verify(tmp_path / "rows.h5") == []
    with open_features(tmp_path / "rows.h5") as ff, open_features(reference) as ref:
        assert ff.label_names == ref.label_names and ff.spec == ref.spec
