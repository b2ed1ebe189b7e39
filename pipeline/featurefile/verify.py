"""Verify stage: ``python -m pipeline verify FILE...`` prints ``ok FILE`` or each broken rule of the feature-file contract (``featurefile.checks``) as one ``FAIL`` line, and exits 1 if any."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.command import Command
from pipeline.core.config import option
from pipeline.featurefile.checks import verify


@dataclass(frozen=True)
class VerifyConfig:
    """Settings of ``python -m pipeline verify``."""

    files: tuple[Path, ...] = option(help="feature files (.h5)", positional=True, nargs="+")


def run(config: VerifyConfig) -> int:
    """Check each file; print ``ok FILE`` or one ``FAIL reason`` line per broken invariant.

    Returns:
        0 when every file is sound, else 1.
    """
    status = 0
    for path in config.files:
        problems = verify(path)
        if problems:
            status = 1
            for msg in problems:
                print(f"FAIL {msg}")
        else:
            print(f"ok {path}")
    return status


COMMAND = Command("verify", VerifyConfig, run, "check a feature file's invariants; exit 1 with the reasons if any fails")
