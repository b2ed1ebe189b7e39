"""A backbone resolved once for a run: its registry entry, input size and feature shape, its weights, compute precision and int8 model; what the later steps read instead of asking the registry and the weights again."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.backbones import int8 as engines
from pipeline.backbones.int8 import Calibration
from pipeline.core.errors import PipelineError
from pipeline.backbones.registry import BackboneSpec, get_spec
from pipeline.backbones.weights import WeightsInfo, resolve_weights_of


@dataclass(frozen=True)
class ResolvedBackbone:
    """The network a run computes its features with.

    Attributes:
        spec: the registry entry (name, feature layer, preprocessing).
        input_size: the square input side.
        feature_shape: one image's features at ``input_size``.
        weights: the resolved weights (file, source, tensor checksum).
        precision: the compute precision, resolved (for ``--ray`` as asked, or the existing
            output's for ``auto``: the workers resolve it).
        calibration: for ``int8``, the model to use (``int8.sample_calibration`` or
            ``Calibration.known``); None for the other precisions.
    """

    spec: BackboneSpec
    input_size: int
    feature_shape: tuple[int, int, int]
    weights: WeightsInfo
    precision: str | None
    calibration: Calibration | None = None

    def open(self, *, batch_size: int, progress: bool):
        """The network itself (TensorFlow, or OpenVINO for int8), its weights loaded and checked: uint8 RGB batches in, float32 features out.

        Raises:
            PipelineError: as ``int8.open_backbone``; the weights changed while loading.
        """
        net = engines.open_backbone(
            self.input_size, self.weights, self.precision, batch_size=batch_size, calibration=self.calibration, progress=progress, backbone=self.spec.name
        )
        if net.weights_checksum != self.weights.checksum:
            raise PipelineError(f"weights checksum changed while loading ({self.weights.checksum} -> {net.weights_checksum})")
        return net


def resolve_backbone(name: str, weights: str, input_size: int, precision: str | None, *, progress: bool = False) -> ResolvedBackbone:
    """Backbone ``name`` at ``input_size`` with the weights ``weights`` names (``imagenet``, ``none`` or a file), found or provisioned, computing at ``precision``.

    Raises:
        PipelineError: ``name`` is not a backbone of this program, or as ``weights.resolve_weights_of``.
    """
    spec = get_spec(name)
    shape = spec.feature_shape(input_size)
    return ResolvedBackbone(spec, int(input_size), shape, resolve_weights_of(spec, weights, progress=progress), precision)
