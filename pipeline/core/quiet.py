"""TensorFlow's start-up lines kept off the user's terminal: its C++ log level set before it loads, and the lines its libraries print before abseil's logging starts filtered out of stderr while it is imported.

``TF_CPP_MIN_LOG_LEVEL`` silences TensorFlow's C++ logging once abseil is initialised, but
each of its shared libraries prints ``WARNING: All log messages before absl::InitializeLog()
is called are written to STDERR`` and ``oneDNN custom operations are on ...`` while it loads,
on every command. The import of ``tensorflow`` therefore runs with file descriptor 2 sent to a
temporary file; afterwards every line of it is written back to stderr except those start-up
notices. Warnings a user should see (Python warnings, errors) pass.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
from contextlib import contextmanager

#: The start-up notices dropped (anything else printed during the import is written back).
NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|oneDNN custom operations are on"
    r"|cpu_feature_guard\.cc.*This TensorFlow binary is optimized|^To enable the following instructions:"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered|could not find cuda drivers"
)


@contextmanager
def filtered_stderr(pattern: re.Pattern = NOISE):
    """Run the block with fd 2 captured; then write back every captured line that ``pattern`` does not match."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (an embedded interpreter): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True) if not pattern.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once, and wraps its loading in ``filtered_stderr``."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: the real finders take it from here
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            with filtered_stderr():
                load(module)

        spec.loader.exec_module = exec_module
        return spec


def quiet_tensorflow() -> None:
    """Set TensorFlow's C++ log level (unless the user set one) and filter its start-up lines on its first import; idempotent, no effect once it is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorFlow) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietTensorFlow())
