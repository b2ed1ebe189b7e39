"""Command line: a plain dispatcher from command names to stage modules; user errors become one line and exit status 2."""

from __future__ import annotations

import argparse
import sys

from pipeline.core.errors import PipelineError

EXIT_USER_ERROR = 2


#: Every command and the module that owns it. A command's module exposes the stage contract:
#: ``add_parser(subparsers)`` (its flags), ``from_args(args, argv)`` (flags -> frozen config)
#: and ``run(config)`` (an int is the exit status; any other result means 0).
COMMANDS = {
    "extract": "pipeline.extract.stage",
    "merge": "pipeline.extract.merge",
    "verify": "pipeline.extract.verify",
    "weights": "pipeline.backbones.command",
    "train": "pipeline.classical.train",
    "predict": "pipeline.classical.predict",
    "evaluate": "pipeline.classical.evaluate",
    "finetune": "pipeline.nets.finetune",
    "scratch": "pipeline.nets.scratch",
    "export": "pipeline.nets.export",
    "compare": "pipeline.compare.stage",
    "bench": "pipeline.bench.stage",
}

def _module(name: str):
    import importlib

    return importlib.import_module(COMMANDS[name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Offline transfer learning for image classification: extract features, train, fine-tune, compare.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        _module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        module = _module(args.command)
        result = module.run(module.from_args(args, argv))
        return result if type(result) is int else 0
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
