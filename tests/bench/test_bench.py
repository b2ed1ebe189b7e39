"""Benchmark settings (int8 measured by default, a missing int8 extra a one-line error before any work, --data-path checked too), the child steps and the report."""

from __future__ import annotations

import sys

import pytest

from pipeline.bench import children, report
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


def test_data_path_needs_no_data_folder_but_its_values_are_still_checked(tmp_path):
    config = bench.BenchConfig(data=tmp_path / "none", data_path=True, precisions=("int8",))
    assert config.validate() is config  # no DATA/train, and int8 is not measured there
    with pytest.raises(PipelineError, match=r"^--repeats 0: "):
        bench.BenchConfig(data=tmp_path / "none", data_path=True, repeats=0).validate()


def test_a_child_step_is_parsed_from_its_fields_and_checked(capsys):
    with pytest.raises(PipelineError, match=r"^--step nonsense: must be one of compute, naive, extract, interleaved, calibrate, backbone$"):
        children.main(["nonsense"])
    with pytest.raises(SystemExit):
        children.main(["interleaved", "--precisions", ","])


def test_the_report_writes_the_throughput_table_and_the_checks():
    row = {"variant": "extract-float32", "images_per_second": 20.0, "vs_naive": 2.0, "vs_extract_float32": 1.0, "vs_extract_bfloat16": None,
           "vs_compute_limit": 0.5, "vs_compute_float32": 0.5, "peak_rss_mb": 900.0, "bytes_per_image": 1234.0}  # fmt: skip
    result = {"machine": "m", "input_size": 32, "batch_size": 4, "repeats": 1, "throughput": {"images": 4, "rows": [row]},
              "memory": {"images": [4, 40], "peak_rss_mb": [100.0, 110.0], "growth": 0.1}}  # fmt: skip
    md = report.markdown(result)
    assert "| extract-float32 | 20.00 | 2.00 | 1.00 |  | 0.500 | 0.500 | 900 | 1,234 |" in md
    assert "Peak memory of extract: 4 images 100 MB, 40 images 110 MB (+10.0%)." in md and "Incremental" not in md
