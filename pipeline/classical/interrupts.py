"""SIGTERM that library code cannot lose: ``core.outputs.sigterm_as_interrupt`` plus a remembered signal, raised again at every chunk, batch and fit.

``sigterm_as_interrupt`` raises ``Terminated`` wherever the main thread happens to be. Inside
library code that goes wrong in two ways, both seen in ``train`` runs: an import cut short
turns it into another error (``RuntimeError: Error calling __set_name__ ...``, a traceback
instead of "interrupted"), and code that runs in a finaliser or catches ``BaseException``
drops it (``Exception ignored in: <function _get_module_lock.<locals>.cb>``, and the run went
on). So here the signal is remembered. During an import, or a ``finish_first`` block, it is
only remembered (the import finishes whole, the outputs are all written);
``stop_if_terminated()``, called by the classical loops at every chunk read, every streamed
batch and every search fit, raises it (again); any error that escapes after the signal came
becomes ``Terminated``, and so does the end of the block.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.core.outputs import Terminated, sigterm_as_interrupt


class _Received:
    """Whether SIGTERM came (a plain flag: an Event's lock could deadlock inside a signal handler), and whether to hold it back."""

    flag = False
    hold = False


def _importing(frame) -> bool:
    """Whether ``frame`` runs inside the import machinery (raising there breaks the module being imported)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` (a KeyboardInterrupt), and keeps raising it.

    Raises:
        Terminated: SIGTERM came: at once (outside imports), at the next
            ``stop_if_terminated()``, from any error that escapes the block (chained as the
            cause), or when the block ends.
    """
    _Received.flag = False
    with sigterm_as_interrupt():
        if threading.current_thread() is threading.main_thread():
            raise_it = signal.getsignal(signal.SIGTERM)

            def remember(signum, frame):
                _Received.flag = True
                if not _Received.hold and not _importing(frame):
                    raise_it(signum, frame)

            signal.signal(signal.SIGTERM, remember)
        try:
            yield
            stop_if_terminated()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            if _Received.flag:
                raise Terminated("SIGTERM") from exc
            raise
        finally:
            _Received.flag = _Received.hold = False


@contextmanager
def finish_first() -> Iterator[None]:
    """Within ``stop_on_sigterm``, a block SIGTERM does not cut short: it is raised when the block ends.

    For outputs that must change together (a bundle and its metrics): all are replaced, or
    none, whenever the signal comes.
    """
    _Received.hold = True
    try:
        yield
    finally:
        _Received.hold = False
    stop_if_terminated()


def stop_if_terminated() -> None:
    """Raise ``Terminated`` if SIGTERM came within ``stop_on_sigterm`` (a no-op otherwise)."""
    if _Received.flag:
        raise Terminated("SIGTERM")
