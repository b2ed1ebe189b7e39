"""The validation table: one message template from each field's rule, flags and defaults read from the fields."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.core.config import MAX_INT, Interval, OneOf, add_options, config_json, from_args, option, validate
from pipeline.core.errors import PipelineError


@dataclass(frozen=True)
class Demo:
    data_dir: Path = option(help="images", positional=True)
    files: tuple[Path, ...] = option((), "more files", nargs="*")
    batch_size: int = option(32, "images per call", rule=Interval(int, 1, MAX_INT))
    rate: float = option(0.5, "a share", rule=Interval(float, 0.0, 1.0, closed="neither"))
    size: int = option(224, "input side", rule=Interval(int, 32, MAX_INT), message="VGG16 needs at least 32 pixels")
    mode: str = option("fast", "how", rule=OneOf(("fast", "slow")))
    limit: float | None = option(None, "optional limit", rule=Interval(float, 0.0, None, closed="neither"))
    output: Path = option(Path("out"), "where", short="-o")
    quiet: bool = option(False, "no bar")
    augment: bool = option(True, "augment")
    command_line: str = option("", cli=False)


def parse(*argv):
    p = argparse.ArgumentParser()
    add_options(p, Demo)
    return p, p.parse_args(["data", *argv])


def test_defaults_are_read_from_the_fields():
    p, args = parse()
    config = from_args(Demo, args, command_line="x")
    assert config == Demo(Path("data"), command_line="x")
    assert config.batch_size == 32 and config.output == Path("out") and config.augment and not config.quiet
    assert "(default 32)" in p.format_help() and "(default fast)" in p.format_help() and "(default none)" in p.format_help()
    assert not hasattr(args, "command_line")


def test_flags_types_and_choices():
    _, args = parse("--batch-size", "8", "--rate", "0.25", "-o", "o2", "--quiet", "--no-augment", "--limit", "3", "--files", "a", "b")
    config = from_args(Demo, args)
    assert config.batch_size == 8 and config.rate == 0.25 and config.output == Path("o2") and config.quiet and not config.augment
    assert config.limit == 3.0 and config.files == (Path("a"), Path("b"))
    with pytest.raises(SystemExit):
        parse("--mode", "medium")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_size", 0, r"^--batch-size 0: must be a whole number in \[1, 4294967295\]$"),
        ("batch_size", 2**32, r"^--batch-size 4294967296: must be a whole number in"),
        ("batch_size", 2.0, r"^--batch-size 2.0: must be a whole number"),
        ("batch_size", True, r"^--batch-size True: must be a whole number"),
        ("rate", 1.0, r"^--rate 1.0: must be a finite number in \(0, 1\)$"),
        ("rate", math.nan, r"^--rate nan: must be a finite number"),
        ("limit", math.inf, r"^--limit inf: must be a finite number in \(0, inf\)$"),
        ("size", 16, r"^--size 16: VGG16 needs at least 32 pixels$"),
        ("mode", "medium", r"^--mode medium: must be one of fast, slow$"),
    ],
)
def test_one_message_template_names_flag_value_and_rule(field, value, message):
    import dataclasses

    config = dataclasses.replace(Demo(Path("d")), **{field: value})
    with pytest.raises(PipelineError, match=message):
        validate(config)


def test_valid_config_passes_and_none_is_allowed_for_optional_fields():
    config = Demo(Path("d"), limit=None)
    assert validate(config) is config
    assert config_json(Demo(Path("d"), files=(Path("a"),))) ["files"] == ["a"]
