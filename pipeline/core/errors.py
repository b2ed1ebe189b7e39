"""The one exception type for user-facing errors: the CLI prints its message on one line and exits non-zero."""


class PipelineError(Exception):
    """Bad input or an impossible request; the message names the file and the rule broken.

    Raised for anything the user can fix (a missing folder, a wrong file, a bad flag).
    The CLI prints ``error: <message>`` without a traceback and exits with status 2.
    """
