"""Errors that end a run with one clear line instead of a traceback.

Every failure a user can cause or fix (bad input, contradicting flags, unusable
paths, a full disk) is raised as a :class:`StreamconvError` subclass whose
message names the file, tensor, flag or path and says what to do. The CLI prints
``streamconv: error: <message>`` and exits with :attr:`exit_code`; only
``--debug`` shows the traceback. Anything else escaping is a bug in streamconv.
"""

from __future__ import annotations

import errno


class StreamconvError(Exception):
    """Base class: a failure with a user-facing one-line message."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split("\n"))


class InputError(StreamconvError):
    """The checkpoint on disk is damaged, incomplete or not what it claims to be."""


class FlagError(StreamconvError):
    """A command-line flag is invalid or contradicts the checkpoint's shapes."""


class PathError(StreamconvError):
    """A load or save path cannot be used as given."""


class WriteError(StreamconvError):
    """Writing the output failed (disk full, file-size limit, I/O error).

    The save directory is left in a state that ``--resume`` can finish.
    """

    exit_code = 3


def write_error(e: OSError, path: str) -> WriteError:
    """The one-line :class:`WriteError` for an ``OSError`` met while writing ``path``: what happened, what to do."""
    if e.errno == errno.ENOSPC:
        what, todo = "the disk is full", "free space"
    elif e.errno == errno.EFBIG:
        what, todo = "the file-size limit was reached (ulimit -f)", "raise the limit"
    elif e.errno == errno.EDQUOT:
        what, todo = "the disk quota is exhausted", "free quota"
    else:
        what, todo = e.strerror or str(e), "fix the cause"
    return WriteError(f"writing {path} failed: {what}; {todo} and rerun the same command with --resume "
                      "(finished rank files are kept)")


class Interrupted(StreamconvError):
    """The run was interrupted (Ctrl-C / SIGTERM); ``--resume`` can finish it."""

    exit_code = 130


class VerifyMismatch(StreamconvError):
    """``verify`` found differences; the report has already been printed."""

    exit_code = 1
