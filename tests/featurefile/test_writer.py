"""The feature-file writer on a full disk: one error naming the file, the run stopped at the next block, the previous file and no temporary left, and the process's HDF5 still sound (it writes the next file and exits cleanly)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from feature_data import make_features

#: ``python -c`` with OUT and LIMIT: writes 400 blocks of 64 rows to OUT under a file-size limit of LIMIT bytes,
#: prints the error and the blocks taken, then lifts the limit and writes OUT.again.h5 in the same process.
_WRITE_UNDER_LIMIT = """
import os, resource, signal, sys
from pathlib import Path
import numpy as np
from pipeline.core.errors import PipelineError
from pipeline.featurefile.store import open_features
from pipeline.featurefile.writer import write_feature_file

out, limit = Path(sys.argv[1]), int(sys.argv[2])
taken = []

def rows(blocks):
    rng = np.random.default_rng(0)
    for k in range(blocks):
        taken.append(k)
        zeros = np.zeros(64, np.int64)
        yield rng.standard_normal((64, 2, 2, 32)).astype(np.float32), np.full(64, k % 3, np.int32), [f"{'abc'[k % 3]}/{k}-{i}.png" for i in range(64)], zeros, zeros

def write(path, blocks):
    return write_feature_file(path, row_shape=(2, 2, 32), storage="float16", class_names=("a", "b", "c"), rows=rows(blocks), rejected=[], attrs={"spec": "x"})

os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])  # one compression thread: as many chunks in flight on any machine
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
try:
    write(out, 400)
except PipelineError as exc:
    print(exc)
print(len(taken))
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
again = out.with_name(out.name + ".again.h5")
print(write(again, 3), len(open_features(again)))
"""


@pytest.mark.parametrize("limit", [2048, 100_000, 1_000_000])
def test_a_full_disk_stops_the_writer_with_one_error_and_leaves_hdf5_sound(tmp_path, limit):
    out = make_features(tmp_path / "x.h5", per_class=5, row_shape=(2, 2, 32))
    before = out.read_bytes()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", _WRITE_UNDER_LIMIT, str(out), str(limit)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", (proc.returncode, proc.stderr)  # no traceback, no crash at exit
    error, taken, again = proc.stdout.splitlines()
    assert error == f"{out}: no space left (or file size limit reached) while writing: File too large"
    assert int(taken) < 100  # of 400 blocks of 16 KiB (6 MiB in all): the writer stopped soon after the failure
    assert again == "192 192"  # the same process then writes and reads a whole file
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["x.h5", "x.h5.again.h5"]  # no temporary file
