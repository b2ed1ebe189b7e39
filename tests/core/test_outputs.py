"""The ground floor's output helpers: file identity however spelled, paths within a folder."""

from __future__ import annotations

import os

from pipeline.core.outputs import is_within, same_file


def test_same_file_sees_through_spellings_and_links(tmp_path):
    (tmp_path / "d").mkdir()
    f = tmp_path / "d" / "x.h5"
    f.write_text("x")
    os.symlink(tmp_path / "d", tmp_path / "link")
    assert same_file(f, tmp_path / "d" / ".." / "d" / "x.h5")
    assert same_file(f, "/" + str(f))  # a leading // is the same file
    assert same_file(f, tmp_path / "link" / "x.h5")
    assert not same_file(f, tmp_path / "d" / "y.h5")
    assert same_file(tmp_path / "missing.h5", tmp_path / "link" / ".." / "missing.h5")


def test_is_within(tmp_path):
    assert is_within(tmp_path / "a" / "b.h5", tmp_path / "a")
    assert is_within(tmp_path / "a", tmp_path / "a")
    assert not is_within(tmp_path / "ab" / "x", tmp_path / "a")
