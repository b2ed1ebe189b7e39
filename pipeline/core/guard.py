"""Outputs checked against inputs: a path a stage would write that is one of its inputs (by file identity, however spelled), or that lies inside an image folder it reads, is refused before any work."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.outputs import is_within, same_file


def refuse_inputs_as_outputs(outputs: Iterable[Path], inputs: Iterable[tuple[str, Path]], advice: str) -> None:
    """Raise if any of ``outputs`` names the same file or folder as one of ``inputs``.

    Identity is ``core.outputs.same_file``'s: device and inode when both exist, else the
    fully resolved paths, so ``//x``, ``a/../x`` and symbolic links are all seen through.
    Each path is stat-ed once per comparison (a predict run compares one output with every
    image), and resolved only when neither exists.

    Args:
        outputs: every path the stage will write or replace (existing or not).
        inputs: ``(what, path)`` pairs, e.g. ``("the feature file", path)``.
        advice: what to do instead, e.g. ``"choose another -o folder"``.

    Raises:
        PipelineError: ``OUT: is WHAT PATH (the same file); writing it would destroy that input; ADVICE``.
    """
    inputs = list(inputs)
    for out in outputs:
        out_stat = _stat(out)
        for what, path in inputs:
            in_stat = _stat(path)
            if out_stat is not None and in_stat is not None:  # both exist: same_file's device-and-inode rule, one stat each
                same = (out_stat.st_dev, out_stat.st_ino) == (in_stat.st_dev, in_stat.st_ino)
            else:  # an existing file is never a missing one; else compare the resolved paths
                same = out_stat is None and in_stat is None and same_file(Path(out), Path(path))
            if same:
                raise PipelineError(f"{out}: is {what} {path} (the same file); writing it would destroy that input; {advice}")


def _stat(path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def refuse_inside(output: Path, folders: Iterable[tuple[str, Path | str | None]], advice: str) -> None:
    """Raise if ``output`` lies inside one of the image ``folders`` (``(what, folder)``; None or a missing folder is skipped).

    Its files (plots, models) would be listed as images of that folder by the next extract or training run.

    Raises:
        PipelineError: ``OUT: is inside WHAT FOLDER (its files would be read as images there next time); ADVICE``.
    """
    folders = list(folders)
    for what, folder in folders:
        if folder and Path(folder).is_dir() and is_within(Path(output), Path(folder)):
            raise PipelineError(f"{output}: is inside {what} {folder} (its files would be read as images there next time); {advice}")
    for what, folder in folders:
        for split in _sibling_splits(folder):  # DATA/train given: DATA/test is a tree of the same data set (a plot there became a test image)
            if is_within(Path(output), split):
                raise PipelineError(f"{output}: is inside {split}, a split beside {what} {folder} (its files would be read as images there next time); {advice}")


#: Sub-folder names that are splits of a data set, not classes (compared in lower case).
SPLIT_NAMES = frozenset({"train", "test", "val", "valid", "validation"})


def _sibling_splits(folder) -> list[Path]:
    """The other split folders beside an image folder that is a split (``DATA/train`` -> ``DATA/test``, ``DATA/val``...)."""
    if not folder or Path(folder).name.lower() not in SPLIT_NAMES:
        return []
    parent = Path(folder).parent
    try:
        return [parent / n for n in sorted(os.listdir(parent)) if n.lower() in SPLIT_NAMES and n != Path(folder).name and (parent / n).is_dir()]
    except OSError:
        return []


def refuse_replacing_inputs(folder: Path, inputs: Iterable[tuple[str, Path]], stage: str, advice: str) -> None:
    """Raise if replacing ``folder`` as a whole (``core.outputs.atomic_folder``) would destroy an input or go through a link.

    Never a path without a name (``.``, ``..``), never a symbolic link (or what it points at),
    never a folder that is or holds one of ``inputs`` (``--overwrite`` or not).

    Raises:
        PipelineError: one line naming the folder and the input it holds.
    """
    folder = Path(folder)
    inputs = list(inputs)
    if folder.name in ("", ".", ".."):
        raise PipelineError(f"{folder}: names no folder of its own; {advice}")
    refuse_inputs_as_outputs([folder], inputs, advice)
    if folder.is_symlink():
        raise PipelineError(f"{folder}: is a symbolic link; {stage} replaces its folder, never a link (or what it points at): {advice}")
    held = next(((what, p) for what, p in inputs if folder.exists() and is_within(Path(p), folder)), None)
    if held:
        raise PipelineError(f"{folder}: holds {held[0]} {held[1]}; replacing the folder would delete it: {advice}")
