"""The validation table: one message template from each field's rule, flags and defaults read from the fields."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.core.config import MAX_INT, Interval, ListOf, OneOf, add_options, config_json, from_args, option, validate
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


@dataclass(frozen=True)
class Lists:
    sizes: tuple[int, ...] = option((), "sizes", rule=ListOf(int, each=Interval(int, 1, MAX_INT), what="whole numbers"), metavar="N1,N2,...")
    names: tuple[str, ...] = option(("a", "b"), "names", rule=ListOf(what="names", everything=("a", "b", "c")))


def test_a_list_field_is_a_comma_list_whose_default_is_written_once():
    p = argparse.ArgumentParser()
    add_options(p, Lists)
    assert from_args(Lists, p.parse_args([])) == Lists()
    assert "(default a,b)" in p.format_help() and "(default none)" in p.format_help()
    config = from_args(Lists, p.parse_args(["--sizes", "100, 300,500", "--names", "all"]))
    assert config.sizes == (100, 300, 500) and config.names == ("a", "b", "c")
    for bad in ("1,x", ",", ""):
        with pytest.raises(SystemExit):
            p.parse_args(["--sizes", bad])


def test_a_list_field_checks_each_item_with_its_rule():
    with pytest.raises(PipelineError, match=r"^--sizes \(5, 0\): must be a list of a whole number in \[1, 4294967295\], each once$"):
        validate(Lists(sizes=(5, 0)))
    with pytest.raises(PipelineError, match=r"^--names abc: must be a list of names, each once$"):
        validate(Lists(names="abc"))
    assert ListOf(float, what="numbers").parse("0.5, 2") == (0.5, 2.0) and ListOf.show(()) == "none"


def test_an_image_side_whose_batch_cannot_fit_in_memory_is_refused_before_any_network(capsys):
    """Second adversarial pass (#22): `extract --input-size 100000` was a numpy MemoryError traceback after the network was built."""
    from pipeline.cli import main
    from pipeline.core.config import available_memory

    have = available_memory()
    assert have is not None and have > 0
    side = int((2 * have / (32 * 3 * 4)) ** 0.5) + 1  # a batch of 32 such images needs twice the memory there is
    for argv in (["extract", "data", "-o", "x.h5", "--weights", "none"], ["scratch", "data", "-o", "out"], ["finetune", "data", "-o", "out", "--weights", "none"]):
        assert main([*argv, "--input-size", str(side)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --input-size {side} with --batch-size 32: one batch of images alone needs ") and err.endswith("lower --input-size or --batch-size\n")
    assert main(["extract", "data", "-o", "x.h5", "--weights", "none", "--input-size", str(side), "--batch-size", "1"]) == 2  # data missing: a later rule
    assert "one batch" not in capsys.readouterr().err


def test_a_list_flag_names_each_value_once():
    """Fifth pass (#22): compare --strategies lr,lr,svm wrote a table with the lr row twice, exit 0. Every list flag refuses a repeat."""
    import argparse

    from pipeline.core.config import ListOf

    rule = ListOf(what="strategies")
    assert rule.parse("lr, svm") == ("lr", "svm") and rule.check(("lr", "svm"))
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'lr,lr,svm': lists lr twice; name each of the strategies once$"):
        rule.parse("lr,lr,svm")
    assert not rule.check(("lr", "lr")) and rule.describe() == "a list of strategies, each once"
