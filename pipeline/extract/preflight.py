"""Checks made before any work, in one place, so that a run which could not finish fails at once in one line: an output that is a symbolic link, or whose work area is not the tool's own folder, coincides with an input or lies inside the data folder, cannot be written, or whose temporary, lock and work-area names do not fit the file system."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.outputs import check_output_writable, is_within, same_file
from pipeline.extract.workarea import WorkArea
from pipeline.images.listing import Listing, list_images

#: Digits of the process id in a temporary name (Linux's pid_max is at most 4194304).
PID_DIGITS = 7
#: The longest name created inside the work area (``.part-000000000.tmp``).
PART_NAME = ".part-000000000.tmp"
_FEATURE_SUFFIXES = (".h5", ".hdf5")


def check_paths(output: Path, data_dir: Path, weights: str | None = None, *, beside: Path | None = None) -> Listing:
    """Check an extraction's output against every rule, in this order, and return the listing of its data folder.

    No symbolic link; names beside it that fit (``beside``: the longest, e.g. a ``--ray`` run's shard
    files); its work area nothing but the tool's own folder (``WorkArea.check``); outside the data folder; then the folder is listed (a bad one fails here, before any work)
    and the output checked against its files and the weights file; last its folder made and writable.

    Raises:
        PipelineError: the first rule broken, in one line naming the path.
    """
    check_not_a_link(output)
    check_names_fit(beside or output)
    WorkArea(output).check()
    check_outside_folder(output, data_dir)
    whole = list_images(data_dir)
    check_not_an_input(output, whole, weights)
    check_output_writable(output)
    return whole


def _limits(folder: Path) -> tuple[int, int]:
    """This file system's longest name and path, in bytes, for ``folder`` or its nearest existing ancestor."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096


def check_names_fit(output: Path) -> None:
    """Refuse an output whose own name, or the name of a file made beside it, is too long for the file system.

    Beside ``OUT.h5`` a run creates ``OUT.h5.lock``, ``OUT.h5.partial/`` and the temporary
    ``.OUT.h5.tmp-PID``; each must fit in the file system's name limit (usually 255 bytes),
    and the longest path in the work area in its path limit.

    Raises:
        PipelineError: naming the output, the name that does not fit and the limit.
    """
    output = Path(output)
    name_max, path_max = _limits(output.parent)
    names = (
        (output.name, "the output's name"),
        (output.name + ".lock", "its lock file's name"),
        (output.name + ".partial", "its work area's name"),
        (f".{output.name}.tmp-{'0' * PID_DIGITS}", "its temporary file's name"),
    )
    overhead = max(len(os.fsencode(n)) for n, _ in names) - len(os.fsencode(output.name))
    for name, what in names:
        size = len(os.fsencode(name))
        if size > name_max:
            raise PipelineError(
                f"{output}: {what} would be {size} bytes long, over this file system's limit of {name_max} bytes per name; "
                f"use an output name of at most {name_max - overhead} bytes"
            )
    longest = len(os.fsencode(os.path.abspath(output))) + len(".partial/") + len(PART_NAME)
    if longest >= path_max:
        raise PipelineError(f"{output}: paths in its work area would be {longest} bytes long, over this system's limit of {path_max} bytes per path; use a shorter output path")


def check_not_a_link(output: Path) -> None:
    """Refuse an output that is a symbolic link: replacing it (a new file renamed into place) would turn the link into a file and leave its target stale.

    Raises:
        PipelineError: naming the link and its target.
    """
    output = Path(output)
    if output.is_symlink():
        raise PipelineError(
            f"{output}: is a symbolic link (to {os.readlink(output)}); outputs are replaced by a new file, "
            "which would replace the link and leave its target stale: give the target itself as the output, or remove the link"
        )


def check_outside_folder(output: Path, data_dir: Path) -> None:
    """Refuse an output inside the data folder (or the data folder itself): it, its work area and its lock file would be listed as inputs.

    Raises:
        PipelineError: naming the output and the data folder.
    """
    if is_within(output, data_dir):
        raise PipelineError(
            f"{output}: is inside the data folder {data_dir}; write the output outside it "
            "(it, its work area and its lock file would be read as images of the data folder)"
        )


def check_not_an_input(output: Path, listing: Listing, weights: str | None = None) -> None:
    """Refuse an output that is, by identity (however spelled, through links), a file the run reads.

    That is: a file of the data folder (a feature-file name in a class folder, also through a
    link or a hard link), the inside of a class folder that links out of the data folder, or
    the weights file.

    Raises:
        PipelineError: naming the output and the input it would overwrite.
    """
    output = Path(output)
    root = Path(listing.root)
    for name in listing.class_names:
        folder = root / name
        if folder.is_symlink() and is_within(output, folder):
            raise PipelineError(f"{output}: is inside class folder {folder} (a link to {os.path.realpath(folder)}); write the output elsewhere")
    try:
        inode = os.stat(output).st_ino
    except OSError:
        inode = None
    # Candidates: files with the output's inode (links, hard links), and feature-file names
    # (a link to an output that does not exist yet).
    candidates = [listing.paths[i] for i in np.flatnonzero(listing.inodes == inode).tolist()] if inode is not None else []
    candidates += [r.path for r in listing.skipped if r.inode == inode or r.path.lower().endswith(_FEATURE_SUFFIXES)]
    for path in candidates:
        if same_file(root / path, output):
            raise PipelineError(f"{output}: is the data folder's file {root / path}; write the output elsewhere")
    if weights not in (None, "imagenet", "none") and same_file(Path(weights), output):
        raise PipelineError(f"{output}: is also the weights file (--weights {weights}); write the output elsewhere")
