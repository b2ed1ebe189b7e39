"""Command line: parses arguments into a stage config and calls that stage's ``run``; user errors become one line and a non-zero exit."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from pipeline.core.config import PRECISIONS, RESIZE_METHODS, STORAGE_DTYPES
from pipeline.extraction.extract import ExtractConfig
from pipeline.core.errors import PipelineError

EXIT_USER_ERROR = 2


def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="VGG16 bottleneck features of a class-per-folder image tree into HDF5")
    p.add_argument("data_dir", type=Path, help="folder with one sub-folder per class")
    p.add_argument("-o", "--output", type=Path, required=True, help="HDF5 file to write (e.g. features/train.h5)")
    p.add_argument("--input-size", type=int, default=224, help="square input side; 224 gives 7x7x512 features (default 224)")
    p.add_argument("--batch-size", type=int, default=32, help="images per network call (default 32)")
    p.add_argument("--weights", default="imagenet", help="imagenet (default), none (random init, explicit) or a weights file PATH")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="compute precision; auto = fastest that keeps accuracy (default)")
    p.add_argument("--storage", default="float16", choices=STORAGE_DTYPES, help="stored feature dtype (default float16)")
    p.add_argument("--resize", default="bilinear", choices=RESIZE_METHODS, help="resize interpolation, as in keras.utils.load_img (default bilinear)")
    p.add_argument("--workers", type=int, default=0, help="decoding threads (default 0 = automatic)")
    p.add_argument("--image-timeout", type=float, default=60.0, help="seconds one image may take to decode before it is rejected (default 60)")
    p.add_argument("--shards", type=int, default=1, help="split the images into this many deterministic shards (default 1; with --ray: one per worker)")
    p.add_argument("--shard", type=int, default=0, help="which shard to extract, 0-based (default 0)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any file is rejected")
    p.add_argument("--overwrite", action="store_true", help="replace an output made from other images or settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar (batch logs); the summary line is still printed")
    p.add_argument("--ray", action="store_true", help="run the shards as Ray tasks (a GPU each, else CPU workers), retry failed ones, merge into OUTPUT")
    p.add_argument("--address", default=None, help="with --ray: cluster to join (auto, HOST:6379, ray://HOST:10001); default $RAY_ADDRESS, else a local cluster")
    p.add_argument("--ray-workers", type=int, default=None, help="with --ray: shard tasks at once (default: one per GPU, else one per node)")
    p.add_argument("--ray-retries", type=int, default=None, help="with --ray: retries of a shard whose worker died or failed (default 3)")


def _run_extract(args, argv) -> int:
    from pipeline.extraction import extract

    config = ExtractConfig(
        data_dir=args.data_dir,
        output=args.output,
        input_size=args.input_size,
        batch_size=args.batch_size,
        weights=args.weights,
        precision=args.precision,
        storage=args.storage,
        resize=args.resize,
        workers=args.workers,
        image_timeout=args.image_timeout,
        strict=args.strict,
        overwrite=args.overwrite,
        quiet=args.quiet,
        shards=args.shards,
        shard=args.shard,
        command_line=shlex.join(["python", "-m", "pipeline", *argv]),
    )
    if args.ray:
        from pipeline.extraction.distributed import DEFAULT_RETRIES, run_ray

        retries = DEFAULT_RETRIES if args.ray_retries is None else args.ray_retries
        return run_ray(config, args.address, args.ray_workers, retries=retries)
    if args.address is not None or args.ray_workers is not None or args.ray_retries is not None:
        raise PipelineError("--address, --ray-workers and --ray-retries only apply with --ray")
    return extract.run(config)


def _add_weights(sub) -> None:
    p = sub.add_parser("weights", help="provision the ImageNet VGG16 weights if needed and print the file in use")
    p.add_argument("--weights", default="imagenet", help="imagenet (default) or a weights file PATH to check")


def _run_weights(args, argv) -> int:
    from pipeline.extraction.weights import provision

    info = provision(args.weights)
    print(info.path)
    print(f"source: {info.source}; tensor sha256: {info.checksum}", file=sys.stderr)
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check a feature file's invariants; exit 1 with the reasons if any fails")
    p.add_argument("files", type=Path, nargs="+", help="feature files (.h5)")


def _run_verify(args, argv) -> int:
    from pipeline.extraction.store import verify

    status = 0
    for path in args.files:
        problems = verify(path)
        if problems:
            status = 1
            for msg in problems:
                print(f"FAIL {msg}")
        else:
            print(f"ok {path}")
    return status


#: Every command and the module that owns it. A command's module exposes the stage contract:
#: ``add_parser(subparsers)`` (its flags), ``from_args(args, argv)`` (flags -> frozen config)
#: and ``run(config)`` (an int is the exit status; any other result means 0).
COMMANDS = {
    "extract": "pipeline.extraction.extract",
    "merge": "pipeline.extraction.merge",
    "verify": "pipeline.extraction.verify",
    "weights": "pipeline.extraction.provision",
    "train": "pipeline.classical.train",
    "predict": "pipeline.classical.predict",
    "finetune": "pipeline.nets.finetune",
    "scratch": "pipeline.nets.scratch",
    "compare": "pipeline.compare",
    "bench": "pipeline.bench",
}

# TRANSITION (removed when every module has the contract): commands not yet moved to it.
_LEGACY = {
    "extract": (_add_extract, _run_extract),
    "weights": (_add_weights, _run_weights),
    "verify": (_add_verify, _run_verify),
    "train": ("pipeline.classical.train", "add_parser", "run_cli"),
    "predict": ("pipeline.classical.predict", "add_parser", "run_cli"),
    "finetune": ("pipeline.nets.finetune", "add_finetune_parser", "run_finetune_cli"),
    "scratch": ("pipeline.nets.finetune", "add_scratch_parser", "run_scratch_cli"),
    "merge": ("pipeline.extraction.merge", "add_parser", "run_cli"),
    "compare": ("pipeline.compare", "add_parser", "run_cli"),
    "bench": ("pipeline.bench", "add_parser", "run_cli"),
}


def _module(name: str):
    import importlib

    try:
        module = importlib.import_module(COMMANDS[name])
    except ModuleNotFoundError:
        return None
    return module if hasattr(module, "from_args") else None


def _add(name: str, sub) -> None:
    import importlib

    module = _module(name)
    if module is not None:
        module.add_parser(sub)
        return
    legacy = _LEGACY[name]
    if callable(legacy[0]):
        legacy[0](sub)
    else:
        getattr(importlib.import_module(legacy[0]), legacy[1])(sub)


def _run(name: str, args, argv) -> int:
    import importlib

    module = _module(name)
    if module is not None:
        result = module.run(module.from_args(args, argv))
        return result if type(result) is int else 0
    legacy = _LEGACY[name]
    if callable(legacy[1]):
        return legacy[1](args, argv)
    return getattr(importlib.import_module(legacy[0]), legacy[2])(args, argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split(":")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        _add(name, sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _run(args.command, args, argv)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if getattr(exc, "hdf5_poisoned", False):
            import os

            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_USER_ERROR)  # skip HDF5's shutdown, which crashes after a failed write
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
