"""Checks before any work: an output inside the data folder (however reached), an output that is a symbolic link or the weights file, and output names too long for the file system are refused in one line, and nothing is written."""

from __future__ import annotations

import os
import re

import pytest

from conftest import make_tree
from pipeline.cli import main
from shard_data import FAST, extract, extract_shards


def _one_line_error(capsys, pattern: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    return err


def _inside_a_linked_class(t):
    os.symlink(t / "elsewhere", t / "data" / "owl")  # a class folder that links out of the data folder
    return t / "elsewhere" / "out.h5"


def _a_link_in_the_data_folder(t):
    os.symlink(t / "out.h5", t / "data" / "cat" / "features.h5")  # dangling until the output is written
    return t / "out.h5"


def _a_hard_link_in_the_data_folder(t):
    (t / "out.h5").write_bytes(b"an earlier output")
    os.link(t / "out.h5", t / "data" / "dog" / "copy.h5")
    return t / "out.h5"


@pytest.mark.parametrize(
    "where, message",
    [
        (lambda t: t / "data" / "out.h5", r"out.h5: is inside the data folder .*data; write the output outside it"),
        (lambda t: t / "data" / "cat" / "out.h5", r"cat/out.h5: is inside the data folder"),
        (lambda t: (os.symlink(t / "data", t / "via"), t / "via" / "out.h5")[1], r"via/out.h5: is inside the data folder"),
        (lambda t: t / "data" / "cat" / ".." / "out.h5", r"out.h5: is inside the data folder"),
        (_inside_a_linked_class, r"elsewhere/out.h5: is inside class folder .*data/owl \(a link to .*elsewhere\)"),
        (_a_link_in_the_data_folder, r"out.h5: is the data folder's file .*data/cat/features.h5"),
        (_a_hard_link_in_the_data_folder, r"out.h5: is the data folder's file .*data/dog/copy.h5"),
    ],
    ids=["top", "class-folder", "linked-folder", "dot-dot", "linked-class-folder", "link-to-output", "hard-link"],
)
def test_an_output_inside_the_data_folder_is_refused(tmp_path, capsys, where, message):
    make_tree(tmp_path / "data", per_class=2, size=(12, 12))
    make_tree(tmp_path / "elsewhere", classes=("x",), per_class=1, size=(12, 12))
    out = where(tmp_path)
    before = sorted(os.listdir(tmp_path / "data"))
    assert extract(tmp_path / "data", out) == 2
    _one_line_error(capsys, message)
    assert sorted(os.listdir(tmp_path / "data")) == before
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob("*.lock"))


def test_an_output_that_is_a_symbolic_link_is_refused(tmp_path, capsys):
    make_tree(tmp_path / "a", per_class=2, size=(12, 12))
    make_tree(tmp_path / "b", classes=("x", "y"), per_class=2, size=(12, 12))
    target = tmp_path / "store" / "target.h5"
    assert extract(tmp_path / "a", target) == 0
    before = target.read_bytes()
    link = tmp_path / "link.h5"
    os.symlink(target, link)
    assert extract(tmp_path / "b", link, "--overwrite") == 2
    _one_line_error(capsys, rf"link.h5: is a symbolic link \(to {re.escape(str(target))}\); .*give the target itself as the output")
    assert link.is_symlink() and target.read_bytes() == before
    shards = extract_shards(tmp_path / "b", tmp_path / "s" / "x.h5", 2)
    assert main(["merge", str(link), *map(str, shards), "--overwrite"]) == 2
    _one_line_error(capsys, r"link.h5: is a symbolic link")
    assert link.is_symlink() and target.read_bytes() == before


def test_an_output_that_is_the_weights_file_is_refused(tmp_path, capsys):
    make_tree(tmp_path / "data", per_class=2, size=(12, 12))
    weights = tmp_path / "w.h5"
    weights.write_bytes(b"weights")
    argv = ["extract", str(tmp_path / "data"), "-o", str(tmp_path / "." / "w.h5"), "--input-size", "32", "--quiet", "--weights", str(weights)]
    assert main(argv) == 2
    _one_line_error(capsys, r"w.h5: is also the weights file \(--weights .*w.h5\)")
    assert weights.read_bytes() == b"weights"


def test_an_output_name_too_long_for_its_temporary_file_fails_before_any_work(tmp_path, capsys):
    data = make_tree(tmp_path / "data", per_class=2, size=(12, 12))
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    out = tmp_path / ("x" * (limit - len(".partial") - 3) + ".h5")  # it and its work area fit; ".NAME.tmp-PID" does not
    assert extract(data, out) == 2
    err = _one_line_error(capsys, rf"its temporary file's name would be {limit + 5} bytes long, over this file system's limit of {limit} bytes per name")
    assert err.startswith(f"error: {out}: ") and f"at most {limit - 13} bytes" in err
    assert sorted(os.listdir(tmp_path)) == ["data"]  # nothing was started
    shards = extract_shards(data, tmp_path / "s" / "x.h5", 2)
    assert main(["merge", str(out), *map(str, shards)]) == 2
    _one_line_error(capsys, rf"its temporary file's name would be {limit + 5} bytes long")
    fits = tmp_path / ("x" * (limit - 13 - 3) + ".h5")
    assert extract(data, fits) == 0 and fits.exists()
    assert main(["extract", str(data), "-o", str(fits), *FAST, "--ray", "--shards", "2"]) == 2  # its shard files' names are longer still
    _one_line_error(capsys, r"shard-00000-of-00002.h5: the output's name would be")
