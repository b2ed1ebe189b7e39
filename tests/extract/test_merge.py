"""The merge stage: the command line writes the merged file and says so in one line; a bad shard set is one error line; SIGTERM and a full disk leave the previous output, no lock and no temporary file."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

import h5py
import pytest

from pipeline.extract import merge as merge_mod
from pipeline.core.errors import PipelineError
from conftest import ROOT
from shard_data import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tree of 3 classes (21 images, one broken, one .txt), its single-process file and 3 shards."""
    return make_run(tmp_path_factory.mktemp("merge"))


def _merge_cli(*argv: str) -> int:
    """``python -m pipeline merge ARGV`` through the stage's own parser and runner, with the CLI's error handling."""
    config = merge_mod.COMMAND.parse(list(argv))
    try:
        return merge_mod.run(config)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def test_cli(run, tmp_path, capsys):
    data, reference, out, shards = run
    assert _merge_cli(str(tmp_path / "c.h5"), *map(str, shards)) == 0
    assert f"merged 3 shards: 21 images, 2 rejected -> {tmp_path / 'c.h5'}" in capsys.readouterr().out
    with h5py.File(tmp_path / "c.h5", "r") as db:
        assert db.attrs["command_line"].startswith("python -m pipeline merge ")
    assert _merge_cli(str(tmp_path / "d.h5"), str(shards[0])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: missing shards 1, 2 of 3") and err.count("\n") == 1


#: ``python -m pipeline ARGS`` that sends itself SIGTERM halfway through writing the merged file.
_TERMINATED_MID_MERGE = """
import os, signal, sys, time
from pipeline.cli import main
from pipeline.extract import shardset

real = shardset._rejected

def terminated(*args, **kwargs):  # called inside the temporary file's block
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    return real(*args, **kwargs)

shardset._rejected = terminated
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_merge_says_so_and_leaves_no_lock(run, tmp_path):
    data, reference, out, shards = run
    merged = tmp_path / "m.h5"
    assert _merge_cli(str(merged), *map(str, shards)) == 0
    before = merged.read_bytes()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-c", _TERMINATED_MID_MERGE, "merge", str(merged), *map(str, shards), "--overwrite"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["m.h5"]  # no lock, no temporary file
    assert merged.read_bytes() == before


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("limit", [1024, 4096, 8192, 16384])
def test_a_full_disk_while_merging_is_one_line_and_keeps_the_previous_file(run, tmp_path, limit):
    data, reference, out, shards = run
    merged = tmp_path / "m.h5"
    assert _merge_cli(str(merged), *map(str, shards)) == 0
    before = merged.read_bytes()
    assert len(before) > limit  # the new file cannot fit
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "pipeline", "merge", "--overwrite", str(merged), *map(str, shards)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, preexec_fn=_file_size_limit(limit))
    assert proc.returncode == 2, (proc.returncode, proc.stderr)  # not 1 (a traceback), not -11 (a crash)
    assert proc.stderr == f"error: {merged}: no space left (or file size limit reached) while writing: File too large\n"
    assert merged.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.h5"]  # no temporary file, no lock


def test_a_shard_that_is_a_merged_file_or_a_vds_prefix_is_one_line_never_a_crash(run, tmp_path):
    """Tenth pass (#22): a shard file that was a link to (or a copy of) its own merged file made verify, train and merge segfault
    (HDF5 recursed), and HDF5_VDS_PREFIX made a merged file read another folder's shards with verify saying ok."""
    import shutil

    _data, _reference, _out, shards = run
    for how in ("link", "copy"):
        folder = tmp_path / how
        folder.mkdir()
        for s in shards:
            shutil.copy(s, folder / s.name)
        assert _merge_cli(str(folder / "m.h5"), *(str(folder / s.name) for s in shards)) == 0
        (folder / shards[0].name).unlink()
        if how == "link":
            (folder / shards[0].name).symlink_to("m.h5")
        else:
            shutil.copy(folder / "m.h5", folder / shards[0].name)
        for argv in (["verify", str(folder / "m.h5")], ["merge", str(tmp_path / f"{how}-again.h5"), *(str(folder / s.name) for s in shards)]):
            done = subprocess.run([sys.executable, "-m", "pipeline", *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)
            assert done.returncode in (1, 2), (argv, done.returncode, done.stderr[-500:])
            assert "is itself a merged file" in done.stdout + done.stderr
    good = tmp_path / "good"
    good.mkdir()
    for s in shards:
        shutil.copy(s, good / s.name)
    assert _merge_cli(str(good / "m.h5"), *(str(good / s.name) for s in shards)) == 0
    env = {**os.environ, "HDF5_VDS_PREFIX": str(tmp_path / "link")}
    done = subprocess.run([sys.executable, "-m", "pipeline", "verify", str(good / "m.h5")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 2 and "HDF5_VDS_PREFIX=" in done.stderr and "is set in the environment" in done.stderr  # the CLI, before any work
    from pipeline.featurefile.checks import verify

    os.environ["HDF5_VDS_PREFIX"] = str(tmp_path / "link")  # the Python API: the reader's own check
    try:
        assert any("HDF5_VDS_PREFIX is set" in p for p in verify(good / "m.h5"))
    finally:
        del os.environ["HDF5_VDS_PREFIX"]
