"""The optional runtimes face analysis and vocal separation run on, and the one message when one is missing.

``onnxruntime`` comes with the ``cpu`` or ``gpu`` extra (``onnxruntime`` or ``onnxruntime-gpu``, which clash),
``insightface`` is installed on its own with ``--no-deps`` (it declares ``opencv-python``, which clashes with
the headless OpenCV used here), and ``audio_separator`` needs onnxruntime. A base ``pip install -e .`` has none
of them working; programs check with :func:`check_runtimes` before any model loads, and the code that
imports them goes through :func:`import_runtime`, so a missing one is a one-line :class:`MissingRuntimeError`.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from memo.errors import UserError

ONNXRUNTIME_INSTALL = 'pip install -e ".[gpu]" (or ".[cpu]" on a machine without CUDA)'
INSIGHTFACE_INSTALL = 'pip install --no-deps "insightface>=0.7.3"'
INSTALL = {
    "onnxruntime": (ONNXRUNTIME_INSTALL, "face analysis and vocal separation run on it"),
    "insightface": (INSIGHTFACE_INSTALL, "face analysis"),
    "audio_separator": (f'{ONNXRUNTIME_INSTALL}, or turn it off with vocal_separation=false', "vocal separation"),
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
