"""Merge stage: shard feature files -> one HDF5 file whose rows are virtual datasets over the shards.

``python -m pipeline merge OUT.h5 SHARD...`` writes ``OUT.h5`` with ``features``,
``labels``, ``paths``, ``file_sizes`` and ``file_mtimes_ns`` as HDF5 virtual datasets
(VDS): no feature is copied, and h5py, ``open_features``, ``train`` and ``predict`` read
the file exactly like one written by a single extraction. ``label_names``, ``rejected/``
and the attributes are real copies (``pipeline.extract.shardset``).

Row order: shard 0's rows, then shard 1's, and so on; inside a shard, its own file order
(for a fresh extraction: the files whose path hashes to that shard, in listing order,
minus rejects). So the merged file holds the same set of rows as a single-process run,
with the same label and features per path, but not in the same order.

The shard files stay where they are and must stay: the virtual datasets read them on
every access. Their names are stored relative to the merged file's folder (HDF5 looks
for a relative source next to the virtual file first), so the folder with the merged
file and its shards can be moved or copied as a whole. Re-extracting a shard changes
what the merged file reads; merge again afterwards (``extract --ray`` does).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.command import Command
from pipeline.core.config import option
from pipeline.core.outputs import OutputLock
from pipeline.core.signals import sigterm_as_interrupt
from pipeline.extract.shardset import merge_locked


@dataclass(frozen=True)
class MergeConfig:
    """Settings of ``python -m pipeline merge``."""

    output: Path = option(help="merged HDF5 file to write (e.g. features/train.h5)", positional=True)
    shards: tuple[Path, ...] = option(help="every shard file of one `extract --shards N --shard K` run", positional=True, nargs="+")
    overwrite: bool = option(False, "replace an existing output")
    command_line: str = option("", cli=False)


def run(config: MergeConfig) -> int:
    """Merge ``config.shards`` into ``config.output`` and print one summary line.

    Returns:
        0 (the merged file is written).

    Raises:
        PipelineError: a shard is missing, given twice, incomplete or unreadable, made from
            another data folder or another state of it, with other settings or weights than
            the others, or overlapping another; the output is one of the
            shards (however spelled) or a symbolic link, exists (without ``--overwrite``), is
            locked or cannot be written.
        KeyboardInterrupt: SIGINT or SIGTERM (``core.signals.Terminated``); nothing is left behind.
    """
    output = Path(config.output)
    # SIGTERM unwinds like Ctrl-C: the lock and the temporary file go, a previous output stays.
    with sigterm_as_interrupt(), OutputLock(output):
        n, n_rej = merge_locked(output, list(config.shards), overwrite=config.overwrite, command_line=config.command_line)
    print(f"merged {len(config.shards)} shards: {n} images, {n_rej} rejected -> {output}")
    if n_rej:
        print(f"note: rejected files are listed in rejected/ of {output}", file=sys.stderr)
    return 0


COMMAND = Command("merge", MergeConfig, run, "merge shard feature files into one file of HDF5 virtual datasets (rows: shard 0's, then shard 1's, ...)",
                  description="Write OUT.h5 whose features/labels/paths are virtual datasets over the shard files (which must stay next to it); refuses shards of different settings, incomplete or missing shards.")
