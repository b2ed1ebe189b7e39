"""The measured children of ``bench``: each step runs alone in a fresh process (``python -m pipeline.bench.children STEP ...``), so its speed and peak memory are its own; it prints one ``BENCH {json}`` line."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.config import MAX_INT, Interval, ListOf, OneOf, add_options, from_args, option, validate
from pipeline.core.errors import PipelineError

#: What the parent prints the child's figures after.
MARK = "BENCH "
#: The steps: ``compute`` (the network alone: the limit), ``naive`` (the tutorial loop), ``extract``
#: (the extract stage), ``interleaved`` (every precision in turn, batch by batch), ``calibrate``
#: (int8 calibration), ``backbone`` (one backbone's extract, at its own input side).
STEPS = ("compute", "naive", "extract", "interleaved", "calibrate", "backbone")


@dataclass(frozen=True)
class Step:
    """One measured step as the parent asks for it."""

    step: str = option(help="what to measure: " + ", ".join(STEPS), positional=True, rule=OneOf(STEPS))
    data: Path = option(Path("."), "the class tree of the images")
    size: int = option(224, "network input side", rule=Interval(int, 1, MAX_INT))
    batch: int = option(32, "images per network call", rule=Interval(int, 1, MAX_INT))
    precision: str = option("float32", "the precision of compute and extract")
    precisions: tuple[str, ...] = option(("float32",), "interleaved: the precisions called in turn", rule=ListOf(what="precisions"))
    out: Path | None = option(None, "the feature file naive, extract and backbone write")
    rounds: int = option(3, "interleaved: rounds over the images", rule=Interval(int, 1, MAX_INT))
    backbone: str = option("vgg16", "backbone: the network measured")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _paths(data: Path) -> list[Path]:
    from pipeline.images.listing import list_images

    listing = list_images(data)
    return [listing.root / p for p in listing.paths]


def _calibration(data: Path, size: int, weights):
    """The int8 calibration ``extract --precision int8`` picks for ``data`` (so every step uses one model)."""
    from pipeline.backbones.int8 import sample_calibration
    from pipeline.images.listing import list_images

    return sample_calibration(list_images(data), input_size=size, resize="bilinear", weights_checksum=weights.checksum)


def _child_compute(data: Path, size: int, batch: int, precision: str) -> dict:
    """The network alone on preprocessed batches already in memory: the hardware limit."""
    from pipeline.backbones.int8 import open_backbone
    from pipeline.images.decode import load_image
    from pipeline.backbones.weights import resolve_weights

    paths = _paths(data)
    pixels = np.stack([load_image(p, size, "bilinear") for p in paths])
    weights = resolve_weights("imagenet", progress=False)
    calibration = _calibration(data, size, weights) if precision == "int8" else None
    # Traced at construction, like extract's; no warm-up call, so both pay the same
    # first-call cost and the ratio shows only what decoding and writing add.
    net = open_backbone(size, weights, precision, batch_size=batch, calibration=calibration)
    t0 = time.perf_counter()
    net(pixels)
    seconds = time.perf_counter() - t0
    return {"images": len(paths), "seconds": seconds}


def _child_naive(data: Path, size: int, batch: int, out: Path) -> dict:
    """The recipe copied from countless tutorials: one load_img at a time, predict on
    batches of 32, accumulate everything, write float64 uncompressed HDF5."""
    import h5py
    import keras

    from pipeline.backbones.network import build
    from pipeline.backbones.weights import load_weights, resolve_weights

    paths = _paths(data)
    model = build("vgg16", size, "float32")
    load_weights(model, resolve_weights("imagenet", progress=False))
    model.predict(np.zeros((batch, size, size, 3), np.float32), batch_size=batch, verbose=0)  # warm-up
    t0 = time.perf_counter()
    features, labels, pending = [], [], []
    for p in paths:
        img = keras.utils.load_img(p, target_size=(size, size))
        x = keras.applications.vgg16.preprocess_input(keras.utils.img_to_array(img))
        pending.append(x)
        labels.append(p.parent.name)
        if len(pending) == batch:
            features.append(model.predict(np.array(pending), batch_size=batch, verbose=0))
            pending = []
    if pending:
        features.append(model.predict(np.array(pending), batch_size=batch, verbose=0))
    feats = np.concatenate(features).astype(np.float64)
    with h5py.File(out, "w") as db:
        db.create_dataset("features", data=feats)
        db.create_dataset("labels", data=np.array(labels, dtype="S"))
    seconds = time.perf_counter() - t0
    return {"images": len(paths), "seconds": seconds, "bytes": out.stat().st_size}


def _child_interleaved(data: Path, size: int, batch: int, precisions: list[str], rounds: int) -> dict:
    """Every precision's network in one process, called in turn batch by batch: ratios a shared machine's load cannot skew."""
    from pipeline.backbones.int8 import open_backbone
    from pipeline.images.decode import load_image
    from pipeline.backbones.weights import resolve_weights

    pixels = np.stack([load_image(p, size, "bilinear") for p in _paths(data)])
    weights = resolve_weights("imagenet", progress=False)
    nets = {p: open_backbone(size, weights, p, batch_size=batch, calibration=_calibration(data, size, weights) if p == "int8" else None) for p in precisions}
    for net in nets.values():
        net(pixels[:batch])  # first-call costs out of the way
    seconds: dict[str, list[float]] = {p: [] for p in nets}
    for _ in range(rounds):
        for i in range(0, len(pixels), batch):
            for p, net in nets.items():
                t0 = time.perf_counter()
                net(pixels[i : i + batch])
                seconds[p].append(time.perf_counter() - t0)
    per_round = {p: np.asarray(s).reshape(rounds, -1).sum(1) for p, s in seconds.items()}
    kernels = {p: net.kernels() for p, net in nets.items() if hasattr(net, "kernels")}
    return {"images": len(pixels), "rounds": rounds, "int8_kernels": kernels.get("int8"),
            "images_per_second": {p: float(np.median(len(pixels) / t)) for p, t in per_round.items()},
            "vs_float32": {p: float(np.median(per_round["float32"] / t)) for p, t in per_round.items()} if "float32" in nets else {}}  # fmt: skip


def _child_calibrate(data: Path, size: int) -> dict:
    """Calibrate the int8 model of ``data`` from scratch (timed), then cache it unless it is cached already."""
    from pipeline.backbones.int8 import install_model, models_dir, quantize
    from pipeline.backbones.weights import resolve_weights

    weights = resolve_weights("imagenet", progress=False)
    calibration = _calibration(data, size, weights)
    models_dir().mkdir(parents=True, exist_ok=True)
    from pipeline.core.outputsets import scratch_folder

    with scratch_folder(models_dir(), "bench") as t:
        t0 = time.perf_counter()
        info = quantize(calibration, weights, input_size=size, folder=Path(t) / "model")
        seconds = time.perf_counter() - t0
        install_model(Path(t) / "model", calibration.key)
    return {"images": info["calibration_images_read"], "seconds": seconds, "key": calibration.key}


def _child_extract(data: Path, size: int, batch: int, precision: str, out: Path, **settings) -> dict:
    import h5py

    from pipeline.extract import stage as extract
    from pipeline.extract.config import ExtractConfig

    out.unlink(missing_ok=True)  # a fresh extraction each repeat, never "up to date"
    t0 = time.perf_counter()
    cfg = ExtractConfig(data_dir=data, output=out, input_size=size, batch_size=batch, precision=precision, quiet=True, **settings)
    if extract.run(cfg) != 0:
        raise PipelineError("extract failed inside the benchmark")
    wall = time.perf_counter() - t0
    with h5py.File(out, "r") as db:
        n = int(db["features"].shape[0])
        loop = float(db.attrs["extract_seconds"])
        stored = int(db["features"].id.get_storage_size())
    return {"images": n, "seconds": loop, "wall_seconds": wall, "bytes": out.stat().st_size, "feature_bytes": stored}


def measure(step: Step) -> dict:
    """Run ``step``; its figures, with the process's peak memory."""
    if step.step == "backbone":  # at its own default input side; speed does not depend on the weights
        from pipeline.backbones.network import build, count_macs
        from pipeline.backbones.registry import get_spec

        spec = get_spec(step.backbone)
        weights = "imagenet" if step.backbone == "vgg16" else "none"
        r = _child_extract(step.data, spec.input_size, step.batch, step.precision, step.out, backbone=step.backbone, weights=weights)
        r.update(input_size=spec.input_size, feature_shape=list(spec.feature_shape(spec.input_size)), gmacs=count_macs(build(step.backbone, spec.input_size)) / 1e9)
    elif step.step == "compute":
        r = _child_compute(step.data, step.size, step.batch, step.precision)
    elif step.step == "interleaved":
        r = _child_interleaved(step.data, step.size, step.batch, list(step.precisions), step.rounds)
    elif step.step == "calibrate":
        r = _child_calibrate(step.data, step.size)
    elif step.step == "naive":
        r = _child_naive(step.data, step.size, step.batch, step.out)
    else:
        r = _child_extract(step.data, step.size, step.batch, step.precision, step.out)
    r["peak_rss_mb"] = _peak_rss_mb()
    return r


def main(argv: list[str]) -> int:
    """Parse one step, measure it, print ``BENCH {json}``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.children")
    add_options(parser, Step)
    step = validate(from_args(Step, parser.parse_args(argv)))
    print(MARK + json.dumps(measure(step)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
