"""The feature-file contract: `verify` names every broken type, shape, length and attribute as one line (never a traceback), passes sound files, refuses files of another version of the pipeline, and the table of docs/feature-file.md lists exactly what the code checks."""

from __future__ import annotations

import re
import shutil

import h5py
import numpy as np
import pytest

from conftest import ROOT, make_tree
from pipeline.cli import main
from pipeline.featurefile.schema import ATTRIBUTES, DATASETS
from pipeline.featurefile.checks import verify
from shard_data import extract


@pytest.fixture(scope="module")
def sound(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    data = make_tree(root / "data", per_class=3, size=(12, 12))
    (data / "dog" / "bad.png").write_bytes(b"")
    out = root / "x.h5"
    assert extract(data, out) == 0
    assert verify(out) == []
    return out


def _replace(db, name, data):
    del db[name]
    db.create_dataset(name, data=data)


DAMAGE = {
    "no-rejected-reasons": (lambda db: db.__delitem__("rejected/reasons"), "missing dataset 'rejected/reasons'"),
    "integer-paths": (lambda db: _replace(db, "paths", np.arange(6)), "dataset 'paths' is int64; it must be UTF-8 string"),
    "empty-merged-group": (lambda db: db.create_group("merged"), "missing dataset 'merged/files'"),
    "1-d-features": (lambda db: _replace(db, "features", np.zeros(6, np.float16)), "dataset 'features' has shape (6,); it must have at least 2 dimensions"),
    "2-d-labels": (lambda db: _replace(db, "labels", np.zeros((6, 1), np.int32)), "dataset 'labels' has shape (6, 1); it must have 1 dimension"),
    "float-labels": (lambda db: _replace(db, "labels", np.zeros(6)), "dataset 'labels' is float64; it must be integer"),
    "integer-label-names": (lambda db: _replace(db, "label_names", np.arange(2)), "dataset 'label_names' is int64; it must be UTF-8 string"),
    "complete-yes": (lambda db: db.attrs.__setitem__("complete", "yes"), "attribute 'complete' is 'yes' (str); it must be a boolean"),
    "no-complete": (lambda db: db.attrs.__delitem__("complete"), "attribute 'complete' missing"),
    "input-size-text": (lambda db: db.attrs.__setitem__("input_size", "32"), "attribute 'input_size' is '32' (str); it must be an integer"),
    "feature-shape": (lambda db: db.attrs.__setitem__("feature_shape", [2, 2, 512]), "attribute 'feature_shape' is [2, 2, 512]"),
    "input-size": (lambda db: db.attrs.__setitem__("input_size", 64), "input_size 64 gives (2, 2, 512)"),
    "n-images": (lambda db: db.attrs.__setitem__("n_images", 99), "attribute 'n_images' is 99 but features has 6 rows"),
    "n-rejected": (lambda db: db.attrs.__setitem__("n_rejected", 0), "attribute 'n_rejected' is 0 but rejected/paths has 1 entries"),
    "storage": (lambda db: db.attrs.__setitem__("storage_dtype", "float32"), "features are float16 but attribute 'storage_dtype' is 'float32'"),
    "precision": (lambda db: db.attrs.__setitem__("precision", "auto"), "attribute 'precision' is 'auto'; it must be one of float32, bfloat16, float16, int8"),
    "fingerprint": (lambda db: db.attrs.__setitem__("fingerprint", "{not json"), "attribute 'fingerprint' is not a JSON object"),
    "seconds": (lambda db: db.attrs.__setitem__("extract_seconds", float("nan")), "attribute 'extract_seconds' is nan (float64); it must be a finite number"),
    "shard": (lambda db: db.attrs.__setitem__("shard", 3), "attribute 'shard' is 3; it must be below 'shards' (1)"),
    "no-versions": (lambda db: db.attrs.__delitem__("versions"), "attribute 'versions' missing"),
    "no-file-inodes": (lambda db: db.__delitem__("file_inodes"), "missing dataset 'file_inodes'"),
    "rejected-lengths": (lambda db: _replace(db, "rejected/file_sizes", np.zeros(3, np.int64)), "datasets have different lengths: {'rejected/paths': 1, 'rejected/reasons': 1, 'rejected/file_sizes': 3"),
    "version": (lambda db: db.attrs.__setitem__("format_version", 1), "written by another version of the pipeline (format_version 1, this version reads 2); extract it again"),
    "features-group": (lambda db: (db.__delitem__("features"), db.create_group("features")), "'features' is a group, not a dataset"),
    # thirteenth pass (#22): `dog/../cat/x` passed the label rule (its first part is dog); a class name given twice scored two classes as one
    "dotted-path": (lambda db: db["paths"].__setitem__(0, b"dog/../" + bytes(db["paths"][0])), "paths are not plain relative paths (an empty, '.' or '..' part)"),
    "double-slash": (lambda db: db["paths"].__setitem__(0, bytes(db["paths"][0]).replace(b"/", b"//")), "paths are not plain relative paths"),
    "repeated-name": (lambda db: db["label_names"].__setitem__(1, bytes(db["label_names"][0])), "label_names name a class twice ('cat')"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_each_broken_rule_is_one_reason(sound, tmp_path, capsys, name):
    damage, message = DAMAGE[name]
    bad = tmp_path / f"{name}.h5"
    shutil.copy(sound, bad)
    with h5py.File(bad, "r+") as db:
        damage(db)
    problems = verify(bad)
    assert any(message in p for p in problems), problems
    assert all(p.startswith(f"{bad}: ") and "\n" not in p for p in problems), problems
    assert main(["verify", str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"FAIL {p}" for p in problems]


def test_a_folder_or_a_non_hdf5_file_is_one_reason(tmp_path, capsys):
    (tmp_path / "folder.h5").mkdir()
    (tmp_path / "text.h5").write_text("hello\nworld\n")
    assert verify(tmp_path / "folder.h5") == [f"{tmp_path / 'folder.h5'}: is a folder, not a feature file"]
    [problem] = verify(tmp_path / "text.h5")
    assert problem.startswith(f"{tmp_path / 'text.h5'}: not a readable HDF5 feature file (") and "\n" not in problem
    assert main(["verify", str(tmp_path), str(tmp_path / "folder.h5")]) == 1
    assert capsys.readouterr().out == f"FAIL {tmp_path}: is a folder, not a feature file\nFAIL {tmp_path / 'folder.h5'}: is a folder, not a feature file\n"


def _docs_table() -> tuple[set[str], set[str]]:
    """The dataset and attribute names of the feature-file table in docs/feature-file.md."""
    text = (ROOT / "docs" / "feature-file.md").read_text()
    section = text[text.index("## Datasets and attributes") :]
    section = section[: section.index("\n## ", 5)]
    datasets, attributes = set(), set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        datasets |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    attr_line = next(line for line in section.splitlines() if line.startswith("| attributes"))
    attributes = set(re.findall(r"`([a-z_]+)`", attr_line.split("|")[2]))
    return datasets, attributes


def test_the_docs_table_lists_what_verify_checks():
    datasets, attributes = _docs_table()
    assert datasets == {c.name for c in DATASETS}
    assert attributes == {a.name for a in ATTRIBUTES}
