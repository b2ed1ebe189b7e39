"""Shared fixtures: tiny image trees written under tmp_path, and an in-process CLI runner."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_image(path: Path, size=(40, 30), seed=0, fmt=None, mode="RGB") -> Path:
    """A small random image; the format follows the extension unless ``fmt`` is given."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def make_tree(root: Path, classes=("cat", "dog"), per_class=3, size=(40, 30), ext=".png", seed: int | None = None) -> Path:
    """``root/<class>/<i>.png`` with distinct random pixels in each file.

    ``seed``: of the first image; None: from the folder's name, so a ``train`` and a ``test`` tree never share an image
    (stages refuse a test tree holding a training image).
    """
    seed = zlib.crc32(Path(root).name.encode()) * 1000 if seed is None else seed
    for c in classes:
        for i in range(per_class):
            write_image(root / c / f"{i:03d}{ext}", size=size, seed=seed)
            seed += 1
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "data")


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run ``python -m pipeline ARGS`` in a subprocess; returns (exit code, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def cli():
    return run_cli


def by_path(path):
    """{path: (label name, features)} and the sorted rejected paths of a feature file."""
    from pipeline.featurefile.store import open_features

    with open_features(path) as ff:
        names, feats = ff.label_names, ff.db["features"][:]
        rows = {p: (names[lab], feats[i]) for i, (p, lab) in enumerate(zip(ff.paths, ff.labels.tolist()))}
        return rows, sorted(x.decode() for x in ff.db["rejected/paths"][:])


#: Tolerance for features that were *recomputed* (another batch composition, another process,
#: a resumed run): oneDNN's last float32 bits depend on which images share a batch on some
#: CPUs (AVX2), and float16 storage can then round a value to the neighbouring float16
#: (2^-11 relative). Rows that were *copied* (kept rows of an update, reads through a merge)
#: are compared bit for bit instead.
RECOMPUTED = {"rtol": 2e-3, "atol": 2e-3}


def assert_recomputed_close(got, expected, err_msg=""):
    """``got`` equals ``expected`` within the tolerance of recomputed features (float16 storage)."""
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32), err_msg=err_msg, **RECOMPUTED)


def assert_same_rows(merged, reference):
    """Same paths, labels and rejects; features equal within float16 storage (shards batch
    other images together than a single run)."""
    rows, rej = by_path(merged)
    ref_rows, ref_rej = by_path(reference)
    assert set(rows) == set(ref_rows) and rej == ref_rej
    for p, (label, f) in ref_rows.items():
        assert rows[p][0] == label, p
        assert_recomputed_close(rows[p][1], f, err_msg=p)


def stopping_batches(after: int = 2):
    """A stand-in for ``pipeline.extract.loop.iter_batches`` raising KeyboardInterrupt after ``after`` batches (a run stopped midway)."""
    from pipeline.extract import loop as runner

    real = runner.iter_batches

    def batches(*args, **kwargs):
        for k, batch in enumerate(real(*args, **kwargs)):
            if k == after:
                raise KeyboardInterrupt
            yield batch

    return batches


def png_bytes(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def spell(path: Path, how: str, tmp_path: Path, *, of_folder: bool = False) -> Path:
    """``path`` written another way: as given (``plain``), with a leading ``//``, through a symlinked folder, or through ``..``.

    A folder (``of_folder``) is itself linked and climbed out of; a file is reached through its linked or climbed-out-of parent.
    """
    if how == "plain":
        return path
    if how == "double-slash":
        return Path("//" + str(path).lstrip("/"))
    folder = path if of_folder else path.parent
    if how == "symlink":
        link = tmp_path / "link"
        link.symlink_to(folder, target_is_directory=True)
        return link if of_folder else link / path.name
    spelled = folder / ".." / folder.name
    return spelled if of_folder else spelled / path.name
