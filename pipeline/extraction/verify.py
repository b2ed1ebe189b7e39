"""Verify stage: every broken invariant of a feature file (single or merged), as messages; ``python -m pipeline verify FILE...`` exits 1 if any."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import config as settings
from pipeline.core.config import option
from pipeline.core.errors import PipelineError
from pipeline.extraction.shardset import stale_sources
from pipeline.extraction.store import open_features


@dataclass(frozen=True)
class VerifyConfig:
    """Settings of ``python -m pipeline verify``."""

    files: tuple[Path, ...] = option(help="feature files (.h5)", positional=True, nargs="+")


def verify(path: Path | str) -> list[str]:
    """Every broken invariant of a feature file, as messages (empty list: the file is sound)."""
    try:
        ff = open_features(path, require_complete=False)
    except PipelineError as exc:
        return [str(exc)]
    problems: list[str] = []
    with ff:
        db = ff.db
        if not bool(db.attrs.get("complete", False)):
            problems.append(f"{path}: incomplete (attribute 'complete' is not set)")
        for key in ("weights", "weights_checksum", "backbone", "layer", "input_size", "precision", "resize"):
            if key not in db.attrs:
                problems.append(f"{path}: attribute '{key}' missing")
        if "merged" in db:
            problems.extend(stale_sources(path))
        paths = ff.paths
        if len(set(paths)) != len(paths):
            problems.append(f"{path}: {len(paths) - len(set(paths))} duplicate paths")
        if "rejected" in db:
            rej = {os.fsdecode(x) for x in db["rejected/paths"][:]}
            both = rej & set(paths)
            if both:
                problems.append(f"{path}: {len(both)} paths are both extracted and rejected, e.g. {sorted(both)[0]}")
            if db["rejected/paths"].shape != db["rejected/reasons"].shape:
                problems.append(f"{path}: rejected/paths and rejected/reasons differ in length")
        else:
            problems.append(f"{path}: group 'rejected' missing")
        try:
            for start, block in ff.iter_chunks():
                bad = ~np.isfinite(block)
                if bad.any():
                    row = start + int(np.argwhere(bad.reshape(len(block), -1).any(axis=1))[0][0])
                    problems.append(f"{path}: non-finite feature values (first in row {row})")
                    break
        except Exception as exc:
            problems.append(f"{path}: features unreadable ({exc})")
    return problems


def add_parser(sub) -> None:
    """The ``verify`` command and its arguments."""
    p = sub.add_parser("verify", help="check a feature file's invariants; exit 1 with the reasons if any fails")
    settings.add_options(p, VerifyConfig)


def from_args(args, argv) -> VerifyConfig:
    """The parsed arguments as a ``VerifyConfig``."""
    return settings.from_args(VerifyConfig, args)


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
