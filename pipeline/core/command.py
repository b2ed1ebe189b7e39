"""A command declared as data: its name, config class, run function and help; its parser, its config (with the command line recorded) and its validation are made from them, the same way for every command."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Callable

from pipeline.core.config import add_options, from_args, validate
from pipeline.core.outputs import command_line

#: How ``python -m pipeline`` is typed; the start of every recorded command line and usage line.
PROG = "python -m pipeline"


@dataclass
class Command:
    """One ``python -m pipeline NAME``: each command module declares one as ``COMMAND``.

    Attributes:
        name: the command word.
        Config: the frozen dataclass of its settings; every flag is one of its ``option`` fields.
        run: ``run(config)``; an int result is the exit status, any other result means 0.
        help: the one line ``python -m pipeline --help`` shows for it.
        description: a longer text for ``python -m pipeline NAME --help`` (default: ``help``).
    """

    name: str
    Config: type
    run: Callable
    help: str
    description: str | None = None

    def add_to(self, subparsers) -> argparse.ArgumentParser:
        """Declare the command and its flags (read from ``Config``'s fields) on an argparse sub-parsers object."""
        parser = subparsers.add_parser(self.name, help=self.help, description=self.description)
        add_options(parser, self.Config)
        return parser

    def config(self, args: argparse.Namespace, argv: list[str] | None = None):
        """The ``Config`` of parsed flags, recording ``argv`` (the words after ``python -m pipeline``) where it has a ``command_line`` field; not validated yet."""
        extra = {"command_line": command_line(argv)} if "command_line" in {f.name for f in dataclasses.fields(self.Config)} else {}
        return from_args(self.Config, args, **extra)

    def parse(self, argv: list[str]):
        """The ``Config`` of ``python -m pipeline NAME ARGV`` (``argv`` without the name); argparse exits on a bad flag."""
        parser = argparse.ArgumentParser(prog=PROG)
        self.add_to(parser.add_subparsers(dest="command", required=True))
        words = [self.name, *map(str, argv)]
        return self.config(parser.parse_args(words), words)


def validated(config):
    """``config`` checked: by its own ``validate()`` where it has one (which applies the rules table too), else by the rules table."""
    own = getattr(config, "validate", None)
    return own() if callable(own) else validate(config)
