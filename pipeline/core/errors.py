"""The one exception type for user-facing errors: the CLI prints its message on one line and exits non-zero."""


class PipelineError(Exception):
    """Bad input or an impossible request; the message names the file and the rule broken.

    Raised for anything the user can fix (a missing folder, a wrong file, a bad flag).
    The CLI prints ``error: <message>`` without a traceback and exits with status 2.
    """


class NeedsOverwrite(PipelineError):
    """An existing output a run would replace only when asked; ``problem`` is the message without its advice, for a caller that
    offers another remedy (``compare`` has no ``--overwrite``)."""

    def __init__(self, problem: str, advice: str = "pass --overwrite to replace it"):
        super().__init__(f"{problem}; {advice}")
        self.problem = problem


def printable(name: str) -> str:
    """A file-system name as text to print or draw: bytes that are not UTF-8 (``\\udcff`` in the str) as escapes (``\\xff``)."""
    return str(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def first_line(error: object) -> str:
    """The first line of an error's message, stripped (HDF5's and Keras's span many); the error's type name when the message is empty."""
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__
