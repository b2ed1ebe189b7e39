"""Settings vocabulary and the validation table: each setting's default, flag, help and rule written once, in its dataclass field.

A stage's config is a frozen dataclass whose fields are declared with ``option``::

    @dataclass(frozen=True)
    class ExtractConfig:
        batch_size: int = option(32, "images per network call", rule=Interval(int, 1, MAX_INT))

``validate(config)`` checks every field against its rule and raises one message,
``--batch-size 0: must be a whole number in [1, 4294967295]``; ``add_options(parser, Config)``
declares the flags with the field's default (the help text shows it); ``from_args(Config,
args)`` builds the config from the parsed flags. So a default is written once.

A list setting (``--strategies a,b``) has a ``ListOf`` rule: the one parser of comma lists
on the command line (a tuple in the config) and the rule each item obeys.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.core.errors import PipelineError

#: Interpolation names understood by ``keras.utils.load_img`` (and Pillow).
RESIZE_METHODS = ("nearest", "bilinear", "bicubic", "hamming", "box", "lanczos")
#: ``--precision`` values: the compute dtype policy of the network. ``auto`` picks the
#: fastest one that keeps downstream accuracy (see ``extraction.backbone.resolve_precision``).
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
#: ``--precision`` values of extraction: also ``int8`` (OpenVINO, calibrated; not for training networks).
EXTRACT_PRECISIONS = (*PRECISIONS, "int8")
STORAGE_DTYPES = ("float16", "float32")
#: Upper bound of counts and seeds (numpy seeds and HDF5 sizes take 32-bit values safely).
MAX_INT = 2**32 - 1


class Rule:
    """A constraint on one setting: ``check`` says whether a value obeys it, ``describe`` what it allows."""

    def check(self, value) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Interval(Rule):
    """A finite number of ``kind`` (int or float) between ``lo`` and ``hi`` (None = unbounded).

    ``closed`` says which ends belong to the interval: ``both``, ``left``, ``right`` or ``neither``.
    NaN and infinities never pass; booleans are not numbers here.
    """

    kind: type
    lo: float | None = None
    hi: float | None = None
    closed: str = "both"

    def check(self, value) -> bool:
        if isinstance(value, bool):
            return False
        if self.kind is int:
            if not isinstance(value, int):
                return False
        elif not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.lo is not None and (value < self.lo or (value == self.lo and self.closed in ("right", "neither"))):
            return False
        if self.hi is not None and (value > self.hi or (value == self.hi and self.closed in ("left", "neither"))):
            return False
        return True

    def describe(self) -> str:
        what = "a whole number" if self.kind is int else "a finite number"
        left = "[" if self.closed in ("both", "left") and self.lo is not None else "("
        right = "]" if self.closed in ("both", "right") and self.hi is not None else ")"
        shown = (lambda v: str(int(v))) if self.kind is int else (lambda v: f"{v:g}")
        lo = "-inf" if self.lo is None else shown(self.lo)
        hi = "inf" if self.hi is None else shown(self.hi)
        return f"{what} in {left}{lo}, {hi}{right}"


@dataclass(frozen=True)
class OneOf(Rule):
    """One of a fixed set of values (also the flag's argparse ``choices``)."""

    choices: tuple

    def check(self, value) -> bool:
        return value in self.choices

    def describe(self) -> str:
        return "one of " + ", ".join(map(str, self.choices))


@dataclass(frozen=True)
class ListOf(Rule):
    """A list setting: a comma list on the command line (``a,b``), a tuple in the config.

    ``item`` turns each word into a value (a ValueError: the word is not one); ``each``, if
    given, is the rule every item obeys; ``what`` names the items in the parse error;
    ``everything``, if given, is what the word ``all`` stands for. Each value may appear once
    (``--strategies lr,lr,svm`` gave a table with the lr row twice).
    """

    item: Callable = str
    each: Rule | None = None
    what: str = "values"
    everything: tuple | None = None

    def parse(self, text: str) -> tuple:
        """The tuple of a comma list (blanks around the commas ignored); argparse's error for an empty or bad one."""
        if self.everything is not None and text.strip() == "all":
            return tuple(self.everything)
        words = [w.strip() for w in text.split(",") if w.strip()]
        try:
            if not words:
                raise ValueError(text)
            values = tuple(self.item(w) for w in words)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {self.what}") from None
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:
            raise argparse.ArgumentTypeError(f"{text!r}: lists {twice} twice; name each of the {self.what} once")
        return values

    def check(self, value) -> bool:
        return (isinstance(value, (tuple, list)) and (self.each is None or all(self.each.check(v) for v in value))
                and all(v not in value[:i] for i, v in enumerate(value)))  # fmt: skip

    def describe(self) -> str:
        return "a list of " + (self.each.describe() if self.each is not None else self.what) + ", each once"

    @staticmethod
    def show(value) -> str:
        """A list as it is typed: ``a,b`` (``none`` when empty)."""
        return ",".join(map(str, value)) or "none"


def option(
    default=dataclasses.MISSING,
    help: str = "",
    *,
    rule: Rule | None = None,
    message: str | None = None,
    flag: str | None = None,
    short: str | None = None,
    metavar: str | None = None,
    positional: bool = False,
    nargs: str | None = None,
    cli: bool = True,
    shown: str | None = None,
    default_factory=dataclasses.MISSING,
):
    """A config field: its default, help text, rule and command-line flag, in one place.

    Args:
        default: the one default of the setting (omit for a required positional).
        help: the flag's help; ``(default X)`` is appended from ``default``.
        rule: what values are allowed; checked by ``validate``.
        message: replaces the rule's own description in the error (e.g. "VGG16 needs at least 32 pixels").
        flag: the long flag (default ``--`` + the field name with dashes).
        short: a short flag such as ``-o``.
        metavar, positional, nargs: as in argparse (``nargs="+"`` fields are tuples).
        cli: False for fields that are not flags (set by the stage, e.g. ``command_line``).
        shown: the default as the help shows it, where the field's own value would not say it
            (a default that depends on another setting).
    """
    meta = {"help": help, "rule": rule, "message": message, "flag": flag, "short": short, "metavar": metavar, "positional": positional, "nargs": nargs,
            "cli": cli, "shown": shown}  # fmt: skip
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    """The command-line name of a config field (``--batch-size``)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check(flag: str, value, rule: Rule, message: str | None = None) -> None:
    """Raise the one error template unless ``value`` obeys ``rule``: ``{flag} {value}: {what is allowed}``."""
    if not rule.check(value):
        shown = value if isinstance(value, (str, Path)) else repr(value)
        raise PipelineError(f"{flag} {shown}: {message or 'must be ' + rule.describe()}")


def validate(config):
    """Check every field of ``config`` that has a rule (None passes for optional fields); return ``config``.

    Raises:
        PipelineError: ``--flag value: must be ...`` for the first field that breaks its rule.
    """
    for f in dataclasses.fields(config):
        rule = f.metadata.get("rule")
        value = getattr(config, f.name)
        if rule is not None and value is not None:
            check(flag_of(f), value, rule, f.metadata.get("message"))
    _check_batch_fits(config)
    return config


def physical_memory() -> int:
    """Bytes of RAM (8 GiB where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def gigabytes(n: int) -> str:
    """``n`` bytes as ``1.23 GB``, for messages."""
    return f"{n / 1e9:.2f} GB"


def available_memory() -> int | None:
    """Bytes of memory the system can give a new allocation (``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_batch_fits(config) -> None:
    """Refuse an image side whose batch cannot fit in memory, before any network is built (it was a MemoryError traceback).

    The figure is a floor of what any network needs: the batch of decoded images alone, as
    float32 (``batch x side x side x 3 x 4`` bytes); activations come on top. So only settings
    that cannot run are refused.
    """
    fields = {f.name: f for f in dataclasses.fields(config)}
    batch = getattr(config, "batch_size", None) if "batch_size" in fields else None
    batch = batch if isinstance(batch, int) and batch > 0 else 1
    for name, f in fields.items():
        side = getattr(config, name)
        if not name.endswith("input_size") or not isinstance(side, int) or side <= 0:
            continue
        need, have = batch * side * side * 3 * 4, available_memory()
        if have is not None and need > have:
            with_batch = f" with --batch-size {batch}" if "batch_size" in fields else ""
            raise PipelineError(f"{flag_of(f)} {side}{with_batch}: one batch of images alone needs {_bytes(need)} as float32, "
                                f"more than the {_bytes(have)} of memory available; lower {flag_of(f)}" + (" or --batch-size" if with_batch else ""))  # fmt: skip


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "bytes" else f"{int(n)} bytes"
        n /= 1024
    return f"{n:.1f} TiB"


def _hints(cls) -> dict:
    """Field types of ``cls``, also for string annotations inherited from a base in another module."""
    import sys

    names: dict = {}
    for klass in reversed(cls.__mro__):
        module = sys.modules.get(klass.__module__)
        if module is not None:
            names.update(vars(module))
    return typing.get_type_hints(cls, names)


def _base_type(hint):
    """int for ``int``, ``int | None`` and ``tuple[int, ...]``; the type argparse converts each value to."""
    import types

    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None) and a is not Ellipsis]
    if origin in (typing.Union, types.UnionType, tuple) and args:
        return _base_type(args[0])
    return hint


def path_argument(text: str) -> Path:
    """A path on the command line; an empty one (``""``, an unset shell variable) is refused: ``Path("")`` is the current folder,
    which ``extract "$DATA"`` read as the data folder."""
    if text == "":
        raise argparse.ArgumentTypeError("an empty path names no file or folder (write . for the current folder)")
    return Path(text)


def add_options(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = ()) -> None:
    """Declare one flag per ``option`` field of ``cls`` (except ``skip`` and ``cli=False`` fields).

    Types come from the annotations (int, float, str, Path; bool becomes ``--x`` when the
    default is False and ``--no-x`` when it is True); choices from ``OneOf`` rules; comma
    lists from ``ListOf`` rules; the default from the field, shown in the help.
    """
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta or not meta.get("cli", True) or f.name in skip:
            continue
        kind = _base_type(hints[f.name])
        has_default = f.default is not dataclasses.MISSING
        help_text = meta.get("help", "")
        if meta.get("positional"):
            extra = {"nargs": meta["nargs"]} if meta.get("nargs") else {}
            parser.add_argument(f.name, type=path_argument if kind is Path else kind if kind in (int, float) else str, metavar=meta.get("metavar"), help=help_text, **extra)
            continue
        names = [x for x in (meta.get("short"), flag_of(f)) if x]
        if kind is bool:
            if f.default:
                names = [meta.get("flag") or "--no-" + f.name.replace("_", "-")]
                parser.add_argument(*names, dest=f.name, action="store_false", help=help_text)
            else:
                parser.add_argument(*names, dest=f.name, action="store_true", help=help_text)
            continue
        rule = meta.get("rule")
        shown = meta.get("shown") or ("none" if f.default is None else ListOf.show(f.default) if isinstance(rule, ListOf) else f.default)
        kwargs = {
            "dest": f.name,
            "type": rule.parse if isinstance(rule, ListOf) else path_argument if kind is Path else kind if kind in (int, float) else str,
            "metavar": meta.get("metavar"),
            "help": help_text + (f" (default {shown})" if has_default else ""),
        }
        if isinstance(rule, OneOf):
            kwargs["choices"] = rule.choices
        if meta.get("nargs"):
            kwargs["nargs"] = meta["nargs"]
        if has_default:
            kwargs["default"] = f.default
        else:
            kwargs["required"] = True
        parser.add_argument(*names, **kwargs)


def from_args(cls, args: argparse.Namespace, **extra):
    """``cls`` built from the parsed flags of its fields, plus ``extra`` (e.g. ``command_line``)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    for f in dataclasses.fields(cls):  # nargs fields arrive as lists: configs are frozen, so hold tuples
        if f.metadata.get("nargs") and isinstance(values.get(f.name), list):
            values[f.name] = tuple(values[f.name])
    values.update(extra)
    return cls(**values)


def config_json(config) -> dict:
    """A config as JSON-ready values (paths as strings, tuples as lists), for the files next to outputs."""

    def plain(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
