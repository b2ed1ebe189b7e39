"""Command line: the one list of commands, their parsers generated from each command's config, and the run of one (always validated first); user errors become one line and exit status 2."""

from __future__ import annotations

import argparse
import importlib
import io
import os
import sys

from pipeline.core.command import PROG, Command, validated
from pipeline.core.errors import PipelineError
from pipeline.core.h5output import check_hdf5_environment
from pipeline.core.signals import sigterm_as_interrupt

EXIT_USER_ERROR = 2
#: Seconds a SIGTERM or Ctrl-C may wait for a native computation before the process ends without unwinding (``core.signals``).
HARD_STOP_S = 10.0
#: The status when the reader of standard output went away (``| head``): a process killed by SIGPIPE, as ``cat`` would be.
EXIT_READER_GONE = 128 + 13

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


class ReaderGone(PipelineError):
    """Standard output is a pipe whose reader exited (``| head``): the command stops, quietly."""


class _Stdout(io.BufferedWriter):
    """The process's standard output, whose write errors are said as such: its reader gone stops
    the command quietly (``ReaderGone``); any other (a full disk) is one line naming it."""

    def _said(self, call, *args):
        try:
            return call(*args)
        except OSError as exc:
            null = os.open(os.devnull, os.O_WRONLY)  # what is still buffered goes nowhere, also at exit
            os.dup2(null, self.fileno())
            os.close(null)
            if isinstance(exc, BrokenPipeError):
                raise ReaderGone("standard output: its reader exited") from None
            raise PipelineError(f"standard output: {exc.strerror or exc}; what was written there is incomplete") from None

    def write(self, data):
        return self._said(super().write, data)

    def flush(self):
        return self._said(super().flush)


def standard_streams() -> None:
    """Make the three standard streams safe before any work.

    A closed one (``2>&-``), or an output one open for reading only, is opened on /dev/null:
    else the first file the run opens takes its number, and what the libraries print there
    (TensorFlow's and HDF5's messages) lands inside that file, or every message fails. A
    closed standard output is refused (the results would be lost). The real standard output
    is wrapped in ``_Stdout``.

    Raises:
        PipelineError: standard output is closed; the current folder no longer exists.
    """
    import fcntl

    closed = []
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except OSError:
            mode = None
        if mode is None or (fd > 0 and mode == os.O_RDONLY):  # closed, or open for reading only (a shell's script file)
            closed.append(name)
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one, as the lower ones are open
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))
    if "stdout" in closed:
        raise PipelineError("standard output is closed: the command's results would be lost; redirect it instead (>/dev/null discards them)")
    out = sys.stdout
    if out is sys.__stdout__ and not isinstance(getattr(out, "buffer", None), _Stdout):
        sys.stdout = io.TextIOWrapper(_Stdout(io.FileIO(1, "w", closefd=False)), encoding=out.encoding, errors=out.errors, line_buffering=out.line_buffering)
    try:
        os.getcwd()
    except FileNotFoundError:
        raise PipelineError("the current folder no longer exists (deleted after the shell entered it): cd to an existing folder") from None


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, build and validate the command's config, run it; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        standard_streams()
        check_hdf5_environment()  # before any work: HDF5_DRIVER=family and the like make HDF5 open other files
        chosen = command(args.command)
        with sigterm_as_interrupt(hard_stop=HARD_STOP_S):  # every command: SIGTERM unwinds its locks and temporaries and says "interrupted" (exit 130)
            result = chosen.run(validated(chosen.config(args, argv)))
        sys.stdout.flush()
        return result if type(result) is int else 0
    except ReaderGone:
        return EXIT_READER_GONE
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if getattr(exc, "hdf5_poisoned", False):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_USER_ERROR)  # skip HDF5's shutdown, which crashes after a failed write
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
