"""The base class of errors a user can act on, and the one way every program words a failure.

A :class:`UserError` comes from input or setup (a missing file, an image without a face, an unknown
setting, too little GPU memory); its message says what is wrong and what to do, and the command-line
programs print it without a traceback.

The optional runtimes face analysis and vocal separation run on are checked here too, so a missing one is
one :class:`MissingRuntimeError` line: ``onnxruntime`` comes with the ``cpu`` or ``gpu`` extra (``onnxruntime``
or ``onnxruntime-gpu``, which clash), ``insightface`` is added alone where it is missing (it declares
``opencv-python`` and the CPU ``onnxruntime``, which clash with the headless OpenCV and ``onnxruntime-gpu``),
and ``audio_separator`` needs onnxruntime. Programs check
with :func:`check_runtimes` before any model loads; code that imports them goes through :func:`import_runtime`.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType


class UserError(Exception):
    """An error caused by the user's input or setup, with a message that says how to fix it."""


class EmptyPathError(UserError, ValueError):
    """A path argument was given as an empty string (which ``Path`` would silently read as ``.``)."""


def as_path(value: str | os.PathLike, what: str) -> Path:
    """``value`` as a ``Path`` with ``~`` expanded; raises :class:`EmptyPathError` ("``what`` is empty") for an
    empty or blank string, which ``Path`` would otherwise turn into the current folder, and :class:`UserError` for
    a ``~NAME`` that names no user here."""
    if not str(os.fspath(value)).strip():
        raise EmptyPathError(f"{what} is empty; give the path of the file or folder to use.")
    try:
        return Path(value).expanduser()
    except RuntimeError:  # ~NAME for a user this system does not know, or ~ without a home
        user = str(os.fspath(value))[1:].split("/")[0]
        home = f"no user named {user!r} here" if user else "no home folder is set (HOME)"
        raise UserError(f"{what} {value}: {home}, so {'~' + user} cannot be expanded; give the path in full.") from None


def failure_message(error: BaseException) -> str:
    """How a failed job is reported to the user (batch summary, web page): a :class:`UserError`'s own message
    (a system error the user can act on is one too, :func:`system_error`), anything else its type and text with
    a pointer to the log, which holds the traceback."""
    if isinstance(error, UserError):
        return str(error)
    translated = system_error(error)
    if translated is not None:
        return str(translated)
    return f"unexpected {type(error).__name__}: {error} (the log has the details)"


class SystemResourceError(UserError, OSError):
    """The system refused a file operation for a reason the user can fix (disk full, read-only, no permission)."""


SYSTEM_ERRORS = {
    errno.ENOSPC: ("the disk is full", "free some space or write elsewhere, then run again"),
    errno.EDQUOT: ("the disk quota is used up", "free some space or write elsewhere, then run again"),
    errno.EFBIG: ("the file grew past the size this system allows (ulimit -f)", "raise the limit or write elsewhere"),
    errno.EROFS: ("the file system is read-only", "choose a writable folder"),
    errno.EACCES: ("permission denied", "choose a folder you can write to, or change its permissions"),
    errno.EPERM: ("the operation is not permitted", "choose a folder you can write to, or change its permissions"),
    errno.EMFILE: ("too many files are open", "raise the limit (ulimit -n) and run again"),
}
"""``errno`` -> (what happened, what to do), for the system errors a user can act on."""


def system_error(error: BaseException) -> SystemResourceError | None:
    """A system error the user can act on (an ``OSError`` of :data:`SYSTEM_ERRORS`, from Python or a library such
    as PyAV) as one line naming the file, what happened and what to do; None for anything else."""
    if not isinstance(error, OSError) or isinstance(error, UserError) or error.errno not in SYSTEM_ERRORS:
        return None
    what, fix = SYSTEM_ERRORS[error.errno]
    where = f" while writing {error.filename}" if getattr(error, "filename", None) else ""
    translated = SystemResourceError(f"{what}{where} ({error.strerror or error}): {fix}.")
    translated.errno = error.errno
    return translated


def as_user_error(error: BaseException) -> UserError | None:
    """``error`` as the programs report it in one ``error:`` line: a :class:`UserError` itself, a system error the
    user can act on translated (:func:`system_error`), None for anything else (a bug: its traceback is kept).
    Programs catch ``(UserError, OSError)`` and re-raise when this gives None."""
    return error if isinstance(error, UserError) else system_error(error)


# --------------------------------------------------------------------------------------------------
# Stopping on a signal

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
"""Ctrl-C, what ``kill``, ``timeout``, job schedulers and ``docker stop`` send, and a closed terminal."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; raised where the program is, so every ``with`` block and ``finally``
    cleans up (partial outputs are removed) as for Ctrl-C, which it is for SIGINT. ``status`` is the exit
    status a shell gives a process killed by that signal: 128 + its number (130, 143, 129)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.status = 128 + signum
        name = signal.Signals(signum).name
        super().__init__("interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by {name}")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """While inside, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread (a second one
    while cleaning up is ignored); the previous handlers come back on leaving. Yields a list that receives
    the signal's number, for callers under a library that catches the exception itself (Gradio's server
    loop). Elsewhere than in the main thread (where Python cannot install handlers) nothing changes."""
    stopping: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield stopping
        return

    def handler(signum, frame):
        if not stopping:
            stopping.append(signum)
            raise Interrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield stopping
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


# --------------------------------------------------------------------------------------------------
# Optional runtimes

ONNXRUNTIME_INSTALL = 'pip install -e ".[gpu]" (or ".[cpu]" on a machine without CUDA)'
INSIGHTFACE_INSTALL = 'pip install --no-deps "insightface>=0.7.3"'
"""Adds insightface alone (the floor is pyproject.toml's). Its declared ``opencv-python`` and CPU ``onnxruntime``
(insightface 2.1's Requires-Dist) are left out, as uv's ``exclude-dependencies`` leaves them out; everything
else it requires (numpy, onnx, scipy, scikit-image, tqdm, requests) comes with the package already."""
ONNXRUNTIME_GPU_INSTALL = "pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu"
"""Puts back the CUDA build of ONNX Runtime where pip installed insightface's CPU ``onnxruntime`` beside it
(both write the module ``onnxruntime``; whichever came last runs)."""
EVAL_INSTALL = 'pip install -e ".[eval]"'
INSTALL = {
    "onnxruntime": (ONNXRUNTIME_INSTALL, "face analysis and vocal separation run on it"),
    "insightface": (INSIGHTFACE_INSTALL, "face analysis"),
    "audio_separator": (f"{ONNXRUNTIME_INSTALL}, or turn it off with vocal_separation=false", "vocal separation"),
    "torch_fidelity": (EVAL_INSTALL, "FID"),
    "cdfvd": (EVAL_INSTALL, "FVD"),
    "python_speech_features": (EVAL_INSTALL, "the Sync metrics"),
}
"""Import name -> (how to install it, what needs it)."""


class MissingRuntimeError(UserError, ImportError):
    """A runtime the program needs is not installed (or cannot be imported)."""


def _missing(name: str, reason: str) -> MissingRuntimeError:
    runtime = name.split(".")[0]
    install, used_for = INSTALL[runtime]
    return MissingRuntimeError(f"{runtime} is not installed ({used_for}; {reason}): run `{install}`.")


def import_runtime(name: str) -> ModuleType:
    """Import ``name`` (a runtime of :data:`INSTALL` or one of its modules, e.g. ``insightface.app``), or raise
    :class:`MissingRuntimeError` naming what to install. Importing ``audio_separator`` or ``insightface``
    without onnxruntime names onnxruntime."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing = (getattr(error, "name", None) or name).split(".")[0]
        if missing == "onnxruntime" and not name.startswith("onnxruntime"):
            raise _missing("onnxruntime", f"{name.split('.')[0]} needs it") from error
        raise _missing(name, str(error)) from error


def check_runtimes(vocal_separation: bool) -> None:
    """Cheaply check, without importing them, that the runtimes a run needs are installed: onnxruntime and
    insightface always, audio-separator when ``vocal_separation``. Raises :class:`MissingRuntimeError`."""
    needed = ["onnxruntime", "insightface"] + (["audio_separator"] if vocal_separation else [])
    for name in needed:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise _missing(name, "it cannot be found")
