"""SIGTERM (and Ctrl-C) as an interrupt, in one place: within a block SIGTERM or SIGINT raises ``Terminated`` (a KeyboardInterrupt), so locks, temporary files and work areas unwind as for Ctrl-C; a signal that lands where raising would do harm is remembered and raised as soon as it is safe.

Raising wherever the main thread happens to be goes wrong inside library code in two ways
(both seen in ``train`` runs): an import cut short turns the signal into another error (a
traceback instead of "interrupted"), and code that runs in a finaliser or catches
``BaseException`` drops it, and the run goes on. So the signal is also remembered: during an
import, or a ``finish_first`` block, it is only remembered (the import finishes whole, the
outputs are all written); ``stop_if_terminated()``, called by long loops at every step, raises
it (again); any error that escapes the block after the signal came becomes ``Terminated``, and
so does the end of the block.

Python runs a signal handler only between bytecodes of the main thread, so a native call that does
not return (a liblinear fit at an absurd C ran 19+ minutes deaf to SIGTERM) held the signal back
for as long as it ran. With ``hard_stop`` (the CLI's block), a watchdog thread woken by the signal
itself (``signal.set_wakeup_fd``) ends the process when the main thread has not taken the signal
within that many seconds: as a kill -9 would, which every output and lock is built to survive.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an interrupt, so ``with`` blocks (locks, temporary files) unwind as for Ctrl-C."""


class _Received:
    """Whether SIGTERM (or SIGINT) came (a plain flag: an Event's lock could deadlock inside a signal handler), which, and whether to hold it back."""

    flag = False
    name = "SIGTERM"
    hold = False
    active = 0  # nesting depth of ``sigterm_as_interrupt`` blocks in the main thread
    seen = 0  # signals the main thread's handler has taken (the watchdog compares)


def _importing(frame) -> bool:
    """Whether ``frame`` runs inside the import machinery (raising there breaks the module being imported)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _raise_unless_unsafe(signum, frame) -> None:
    _Received.seen += 1
    _Received.flag, _Received.name = True, signal.Signals(signum).name
    if not _Received.hold and not _importing(frame):
        raise Terminated(_Received.name)


class _Watchdog:
    """Ends the process when SIGTERM (or the block's own SIGINT) is not taken by the main thread within ``grace`` seconds."""

    def __init__(self, grace: float):
        self.grace = grace
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)  # set_wakeup_fd's rule: a full buffer must not block the signal handler
        self.previous = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="signal-watchdog", daemon=True).start()

    def _watch(self) -> None:
        with self.reader:
            while True:
                try:
                    got = self.reader.recv(64)
                except OSError:
                    return
                if not got:  # closed: the block ended
                    return
                ours = {signal.SIGTERM} | ({signal.SIGINT} if signal.getsignal(signal.SIGINT) is _raise_unless_unsafe else set())
                if any(b in ours for b in got):
                    self._wait_for_main(_Received.seen, signal.Signals(next(b for b in got if b in ours)).name)

    def _wait_for_main(self, seen: int, name: str) -> None:
        end = time.monotonic() + self.grace
        while time.monotonic() < end:
            if _Received.seen != seen or self.writer.fileno() == -1:
                return  # taken (it unwinds as usual), or the block is over
            time.sleep(0.05)
        print(f"error: interrupted ({name}); the running computation (native code) did not give way within {self.grace:g} s, so the process ends "
              "at once, as a kill -9 would: outputs are replaced whole or not at all, and the next run removes this run's work files",
              file=sys.stderr, flush=True)  # fmt: skip
        os._exit(130)

    def close(self) -> None:
        signal.set_wakeup_fd(self.previous)
        self.writer.close()


@contextmanager
def sigterm_as_interrupt(hard_stop: float | None = None) -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` (a KeyboardInterrupt) in the main thread, and keeps raising it.

    Locks are released and temporary files removed on the way out, previous outputs stay
    intact, and the CLI prints its one-line "interrupted" message. Outside the main thread
    (where Python cannot install handlers) the block runs unchanged. With ``hard_stop``
    seconds (the CLI's outermost block, never a notebook's), a signal the main thread has not
    taken by then (it is inside a native call) ends the process at once, with a one-line message.

    Raises:
        Terminated: SIGTERM came: at once (outside imports and ``finish_first``), at the next
            ``stop_if_terminated()``, from any error that escapes the block (chained as the
            cause), or when the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = _Received.flag, _Received.hold
    _Received.flag = _Received.hold = False
    previous = signal.signal(signal.SIGTERM, _raise_unless_unsafe)
    # Ctrl-C too, where Python's own handler is in place: its KeyboardInterrupt, raised inside library
    # code that catches BaseException, was dropped and the run went on to exit 0 (seen in extract).
    previous_int = signal.signal(signal.SIGINT, _raise_unless_unsafe) if signal.getsignal(signal.SIGINT) is signal.default_int_handler else None
    _Received.active += 1
    watchdog = _Watchdog(hard_stop) if hard_stop is not None else None
    try:
        yield
        stop_if_terminated()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        if _Received.flag:
            raise Terminated(_Received.name) from exc
        raise
    finally:
        if watchdog is not None:
            watchdog.close()
        _Received.active -= 1
        signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)
        _Received.flag, _Received.hold = saved


def reclaim_sigterm() -> None:
    """Inside ``sigterm_as_interrupt``, install its SIGTERM handler again: a library started in the block
    (``ray.init`` installs one that exits at once) replaced it, and SIGTERM would skip the unwinding and
    the "interrupted" message. A no-op outside the block and outside the main thread."""
    if _Received.active and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_unless_unsafe)


@contextmanager
def finish_first() -> Iterator[None]:
    """Within ``sigterm_as_interrupt``, a block SIGTERM does not cut short: it is raised when the block ends.

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
    """Raise ``Terminated`` if SIGTERM or SIGINT came within ``sigterm_as_interrupt`` (a no-op otherwise)."""
    if _Received.flag:
        raise Terminated(_Received.name)
