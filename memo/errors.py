"""The base class of errors a user can act on, and the one way every program words a failure.

A :class:`UserError` comes from input or setup (a missing file, an image without a face, an unknown
setting, too little GPU memory); its message says what is wrong and what to do, and the command-line
programs print it without a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """An error caused by the user's input or setup, with a message that says how to fix it."""


class EmptyPathError(UserError, ValueError):
    """A path argument was given as an empty string (which ``Path`` would silently read as ``.``)."""


def as_path(value: str | os.PathLike, what: str) -> Path:
    """``value`` as a ``Path`` with ``~`` expanded; raises :class:`EmptyPathError` ("``what`` is empty") for an
    empty or blank string, which ``Path`` would otherwise turn into the current folder."""
    if not str(os.fspath(value)).strip():
        raise EmptyPathError(f"{what} is empty; give the path of the file or folder to use.")
    return Path(value).expanduser()


def failure_message(error: BaseException) -> str:
    """How a failed job is reported to the user (batch summary, web page): a :class:`UserError`'s own message,
    anything else its type and text with a pointer to the log, which holds the traceback."""
    if isinstance(error, UserError):
        return str(error)
    return f"unexpected {type(error).__name__}: {error} (the log has the details)"
