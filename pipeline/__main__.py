"""Entry point of ``python -m pipeline``.

A SIGTERM or Ctrl-C while the modules load (about a second, before the command's own handling in
``cli.main``) or after the command ended is one line and exit 130 too: Ctrl-C there was a
traceback through the imports, SIGTERM a silent 143.
"""

import signal
import sys


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _entry() -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        from pipeline.cli import main

        return main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


raise SystemExit(_entry())
