"""Where the project and the libraries it runs on keep files, set in the process environment before any of those
libraries is imported (``memo/__init__.py`` calls :func:`apply_library_defaults`), so that a run leaves nothing
in the system's temporary folder (``TMPDIR``).

Two libraries write there at import, whatever the program does:

- ``torch._dynamo`` (imported by diffusers) makes torch.compile's cache folder, ``$TMPDIR/torchinductor_<user>``
  by default: it goes to the project's cache, ``$XDG_CACHE_HOME/memo/torchinductor`` (``~/.cache/memo/...``),
  a folder meant to stay, where compiled kernels survive reboots (``memo.runtime.compilation``).
- onnxruntime (face analysis, vocal separation) starts Microsoft's telemetry, which writes ``$TMPDIR/.ses`` and
  ``~/.cache/Microsoft/DeveloperTools/.onnxruntime/``: ``ORT_DISABLE_TELEMETRY=1`` turns it off.

A value the user set is kept. When the cache folder cannot be made (a read-only home without
``XDG_CACHE_HOME``), torch's default is left, so that importing never fails.
"""

from __future__ import annotations

import os
from pathlib import Path

INDUCTOR_CACHE_FOLDER = "torchinductor"
"""The folder of :func:`memo_cache_dir` holding torch.compile's (inductor's) cache."""


def memo_cache_dir() -> Path:
    """The project's own cache folder: ``$XDG_CACHE_HOME/memo``, else ``~/.cache/memo``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "memo"


def library_defaults() -> dict[str, str]:
    """The environment variables :func:`apply_library_defaults` sets when the user has not: name -> value."""
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(memo_cache_dir() / INDUCTOR_CACHE_FOLDER),
        "ORT_DISABLE_TELEMETRY": "1",
    }


def apply_library_defaults() -> None:
    """Set :func:`library_defaults` in ``os.environ`` where unset (the inductor cache only if its folder can be
    made). Must run before torch._dynamo and onnxruntime are imported: both read them once, at import."""
    for name, value in library_defaults().items():
        if name in os.environ:
            continue
        if name == "TORCHINDUCTOR_CACHE_DIR":
            try:
                Path(value).mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
        os.environ[name] = value
