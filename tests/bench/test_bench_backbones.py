"""Benchmark ``--backbone``: each backbone's extraction speed, feature shape and GMACs in one run, the table, and a bad name refused before any work."""

from __future__ import annotations

import json

import pytest

from conftest import make_tree
from pipeline.bench import stage as bench
from pipeline.core.errors import PipelineError
from pipeline.backbones.network import build, count_macs
from pipeline.backbones.registry import BACKBONES


def _parse(*argv):
    return bench.COMMAND.parse(list(argv))


def test_the_flag_takes_a_list_or_all(tmp_path):
    (tmp_path / "train").mkdir()
    assert _parse("--data", str(tmp_path), "--backbone", "all").backbones == tuple(BACKBONES)
    assert _parse("--data", str(tmp_path), "--backbone", "resnet50,mobilenetv2").backbones == ("resnet50", "mobilenetv2")
    assert _parse("--data", str(tmp_path)).backbones == ()
    with pytest.raises(PipelineError, match=r"^--backbone vgg16,alexnet: choose from all, vgg16, "):
        _parse("--data", str(tmp_path), "--backbone", "vgg16,alexnet", "--precisions", "float32").validate()


def test_backbones_are_measured_in_one_run(tmp_path):
    make_tree(tmp_path / "data" / "train", classes=("a", "b"), per_class=2)
    config = bench.BenchConfig(data=tmp_path / "data", images=4, repeats=1, batch_size=4, precisions=("float32",),
                               backbones=("mobilenetv2", "resnet50"), output=tmp_path / "out", quiet=True)  # fmt: skip
    result = bench.run(config)
    rows = {r["backbone"]: r for r in result["backbones"]["rows"]}
    assert list(rows) == ["mobilenetv2", "resnet50"] and "throughput" not in result
    for name, r in rows.items():
        assert r["input_size"] == 224 and r["feature_shape"] == list(BACKBONES[name].feature_shape(224))
        assert r["gmacs"] == pytest.approx(count_macs(build(name, 224)) / 1e9) and r["images_per_second"] > 0
    assert rows["mobilenetv2"]["vs_first"] == 1.0 and rows["resnet50"]["gmacs"] > 10 * rows["mobilenetv2"]["gmacs"]
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "| resnet50 | 224 | 7x7x2048 |" in md and "x mobilenetv2" in md
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["backbones"]["first"] == "mobilenetv2"
