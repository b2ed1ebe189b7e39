"""SIGTERM as an interrupt: raised inside the block only, raised again after library code swallowed it, the cause of an error it provoked, held back during an import and a finish_first block."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from pipeline.core.signals import Terminated, finish_first, reclaim_sigterm, sigterm_as_interrupt, stop_if_terminated


def test_sigterm_becomes_an_interrupt_only_inside_the_block():
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or what a library (ray.init) installed
    with pytest.raises(Terminated):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises as soon as the signal arrives
    assert signal.getsignal(signal.SIGTERM) is before


def _sigterm_swallowed_by_a_library() -> None:
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler raises here
    except BaseException:  # what some library code does
        pass


def test_a_sigterm_that_library_code_swallowed_is_raised_again_at_the_next_checkpoint():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with sigterm_as_interrupt():
            _sigterm_swallowed_by_a_library()
            stop_if_terminated()
            raise AssertionError("not reached: the checkpoint raises")
    stop_if_terminated()  # outside the block: nothing pending
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_a_ctrl_c_that_library_code_swallowed_is_raised_again_at_the_next_checkpoint():
    """Python's KeyboardInterrupt, raised inside code that catches BaseException, was dropped and the run went on."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background test run inherits it ignored)
    with pytest.raises(Terminated, match="SIGINT"):
        with sigterm_as_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler raises here
            except BaseException:  # what some library code does
                pass
            stop_if_terminated()
            raise AssertionError("not reached: the checkpoint raises")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back
    stop_if_terminated()  # outside the block: nothing pending
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with sigterm_as_interrupt():  # an ignored SIGINT (a command started with `&` by a script) stays ignored
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    signal.signal(signal.SIGINT, before)


def test_an_error_a_sigterm_turned_into_becomes_terminated():
    """An import cut short by the interrupt raised ``RuntimeError: Error calling __set_name__`` (seen in a train run): it is the interrupt."""
    with pytest.raises(Terminated) as exc:
        with sigterm_as_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            except BaseException as inner:
                raise RuntimeError("Error calling __set_name__") from inner
    assert isinstance(exc.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError):  # without a SIGTERM, errors pass unchanged
        with sigterm_as_interrupt():
            raise RuntimeError("a real error")


def test_a_sigterm_during_an_import_lets_the_import_finish_then_stops(tmp_path, monkeypatch):
    """Raising inside the import machinery breaks the module (seen: ``Exception ignored in ... _get_module_lock``); the signal waits for the import."""
    (tmp_path / "sigterm_mid_import.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.2)\nDONE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "sigterm_mid_import", raising=False)
    with pytest.raises(Terminated):
        with sigterm_as_interrupt():
            import sigterm_mid_import  # noqa: F401  (sends SIGTERM to this process while it is imported)

            assert sigterm_mid_import.DONE  # the module is whole
    monkeypatch.delitem(sys.modules, "sigterm_mid_import")


def test_a_sigterm_while_the_outputs_are_written_waits_for_all_of_them():
    written = []
    with pytest.raises(Terminated):
        with sigterm_as_interrupt():
            with finish_first():
                for name in ("bundle", "metrics", "report", "plot"):
                    if name == "metrics":
                        os.kill(os.getpid(), signal.SIGTERM)
                        time.sleep(0.2)
                    written.append(name)
            written.append("after")
    assert written == ["bundle", "metrics", "report", "plot"]


def test_a_handler_a_library_installed_in_the_block_is_replaced_again_by_reclaim():
    """ray.init installs its own SIGTERM handler inside the block; reclaim_sigterm puts ours back (outside a block it does nothing)."""
    seen = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with sigterm_as_interrupt():
            signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # what ray.init does
            reclaim_sigterm()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
    assert seen == [] and signal.getsignal(signal.SIGTERM) is before
    reclaim_sigterm()
    assert signal.getsignal(signal.SIGTERM) is before


_NATIVE_CALL = """
import ctypes, os, signal, sys, threading
from pipeline.core.signals import sigterm_as_interrupt
with sigterm_as_interrupt(hard_stop=float(sys.argv[1])):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the main thread never takes it: as inside a native call that does not return
    sleep = ctypes.CDLL(None).sleep  # native, without the GIL, blind to the signal
    print("ready", flush=True)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()  # sent once the main thread is inside the call
    sleep(60)
print("returned", flush=True)
"""


@pytest.mark.parametrize("grace", [0.5, 2.0])
def test_a_sigterm_a_native_call_holds_back_ends_the_process_after_the_grace(grace):
    """A liblinear fit at C=1e-300 ran 19+ minutes deaf to SIGTERM: the block's watchdog ends the process when the main thread has not taken the signal in time."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", _NATIVE_CALL, str(grace)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=40)
    finally:
        proc.kill()
    took = time.monotonic() - t0
    assert proc.returncode == 130 and "returned" not in out, (proc.returncode, out, err)
    assert 1.0 + grace <= took < 40
    assert err.count("\n") == 1 and err.startswith(f"error: interrupted (SIGTERM); the running computation (native code) did not give way within {grace:g} s")


def test_without_hard_stop_or_once_the_signal_is_taken_the_watchdog_stays_out():
    """The Python-level path is unchanged: the signal is taken at once and unwinds as Terminated (no hard exit after the grace);
    the block's end puts the previous wakeup fd back."""
    before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(before)
    with pytest.raises(Terminated):
        with sigterm_as_interrupt(hard_stop=0.2):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
    time.sleep(0.5)  # past the grace: this process is still here
    assert signal.set_wakeup_fd(before) == before
