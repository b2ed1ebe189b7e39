"""Benchmark settings: int8 is measured by default, and a missing int8 extra is a one-line error before any work."""

from __future__ import annotations

import sys

import pytest

from pipeline.bench import stage as bench
from pipeline.core.errors import PipelineError


def test_int8_is_measured_by_default_and_needs_its_extra(tmp_path, monkeypatch):
    (tmp_path / "train").mkdir()
    config = bench.BenchConfig(data=tmp_path, output=tmp_path / "out")
    assert "int8" in config.precisions and config.validate() is config
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(PipelineError, match=r"^--precision int8 needs the int8 extra, .*; or leave int8 out of --precisions$"):
        config.validate()
    bench.BenchConfig(data=tmp_path, output=tmp_path / "out", precisions=("float32", "bfloat16")).validate()


def test_isa_takes_native_or_avx2(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(PipelineError, match=r"--isa avx512"):
        bench.BenchConfig(data=tmp_path, isa="avx512").validate()
