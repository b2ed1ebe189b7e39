"""Progress bars: one tqdm set-up for every long loop: on stderr, drawn only on a terminal, gone when done.

A log file or a pipe gets no bar at all (tqdm's carriage-return frames and the blank line a
cleared bar leaves are noise there); the stage's summary line says what was done.
"""

from __future__ import annotations

import sys


def progress(total: int | None, desc: str, unit: str = "img", *, quiet: bool = False, **kwargs):
    """A tqdm bar on stderr, disabled when ``quiet`` or when stderr is not a terminal; extra ``kwargs`` go to tqdm."""
    from tqdm import tqdm

    shown = not quiet and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not shown, file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)
