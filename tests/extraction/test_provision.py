"""The weights stage: ``python -m pipeline weights`` prints the weights file in use, its source and checksum; a missing file is one error line."""

from __future__ import annotations

from pipeline.cli import main
from pipeline.extraction import weights_onnx
from pipeline.extraction.weights import IMAGENET_TENSOR_SHA256


def test_prints_the_file_its_source_and_checksum(capsys):
    converted = weights_onnx.ensure_converted(progress=False)  # the real cache (provisioned by make setup)
    assert main(["weights", "--weights", str(converted)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{converted}\n"
    assert captured.err == f"source: explicit-file; tensor sha256: {IMAGENET_TENSOR_SHA256}\n"


def test_a_missing_file_is_one_error_line(tmp_path, capsys):
    assert main(["weights", "--weights", str(tmp_path / "nope.h5")]) == 2
    assert capsys.readouterr().err == f"error: weights file {tmp_path / 'nope.h5'} does not exist\n"
