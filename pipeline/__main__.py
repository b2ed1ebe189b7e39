"""Entry point of ``python -m pipeline``.

A SIGTERM or Ctrl-C while the modules load (about a second, before the command's own handling in
``cli.main``) is one line and exit 130 too: Ctrl-C there was a traceback through the imports,
SIGTERM a silent 143. While they load a signal is only remembered, then acted on: raised inside an
import, library code swallowed it and the run went on. Once the command is over, one is ignored.
"""

import signal
import sys

_received: list[str] = []


def _remember(signum, frame):
    _received.append(signal.Signals(signum).name)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _take(handler) -> None:
    """SIGTERM, and Ctrl-C unless the shell ignores it (a background job), go to ``handler``."""
    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _remember, _interrupt):
        signal.signal(signal.SIGINT, signal.default_int_handler if handler is _interrupt else handler)


def _entry() -> int:
    _take(_remember)
    try:
        from pipeline.cli import main

        if _received:
            raise KeyboardInterrupt(_received[0])
        _take(_interrupt)
        return main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        _take(_remember)


raise SystemExit(_entry())
