"""Command line: the one list of commands, their parsers generated from each command's config, and the run of one (always validated first); user errors become one line and exit status 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.core.command import PROG, Command, validated
from pipeline.core.errors import PipelineError

EXIT_USER_ERROR = 2

#: Every command's module, in the order ``--help`` lists them; each declares its ``COMMAND``.
MODULES = (
    "pipeline.datasets",
    "pipeline.extract.stage",
    "pipeline.extract.merge",
    "pipeline.featurefile.verify",
    "pipeline.backbones.command",
    "pipeline.classical.train",
    "pipeline.inference.predict",
    "pipeline.inference.evaluate",
    "pipeline.nets.finetune",
    "pipeline.nets.scratch",
    "pipeline.inference.export",
    "pipeline.compare.stage",
    "pipeline.bench.stage",
)


def _declared(module: str) -> Command:
    return importlib.import_module(module).COMMAND


#: Command name -> the module that declares it.
COMMANDS: dict[str, str] = {_declared(m).name: m for m in MODULES}


def command(name: str) -> Command:
    """The ``Command`` called ``name``."""
    return _declared(COMMANDS[name])


def build_parser() -> argparse.ArgumentParser:
    """``python -m pipeline``'s parser: one sub-parser per command, its flags read from the command's config fields."""
    from pipeline import __version__

    parser = argparse.ArgumentParser(prog=PROG, description="Offline transfer learning for image classification: extract features, train, fine-tune, compare.")
    parser.add_argument("--version", action="version", version=f"transfer-pipeline {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        command(name).add_to(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, build and validate the command's config, run it; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        chosen = command(args.command)
        result = chosen.run(validated(chosen.config(args, argv)))
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
