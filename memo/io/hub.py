"""Where model files come from: a local directory, or the Hugging Face hub through its cache.

Downloads go through huggingface_hub (resumable, cached, and honouring ``HF_HUB_OFFLINE``); only the
files a model needs are fetched. When they cannot be had, one error says what is missing and where to
put it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from memo.errors import UserError


class MissingModelError(UserError, RuntimeError):
    """A model's files are neither in a local directory nor obtainable from the hub."""


def resolve_model_dir(
    name_or_path: str | os.PathLike,
    allow_patterns: Sequence[str] | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Return a local directory holding the model ``name_or_path``.

    A path to an existing directory is returned as it is. Anything else is taken as a hub repo id and
    the files matching ``allow_patterns`` are fetched into (or found in) the hub cache.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or str(name_or_path).startswith((".", "~")) or str(name_or_path).count("/") != 1:
        raise MissingModelError(f"Model directory {str(name_or_path)!r} does not exist.")
    try:
        local = snapshot_download(
            repo_id=str(name_or_path),
            allow_patterns=list(allow_patterns) if allow_patterns else None,
            revision=revision,
            cache_dir=cache_dir,
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        wanted = ", ".join(allow_patterns) if allow_patterns else "all files"
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}
        reason = "offline mode (HF_HUB_OFFLINE) is on and they are not in the cache" if offline else str(error)
        raise MissingModelError(
            f"Could not get {wanted} of the Hugging Face repo {name_or_path!r}: {reason}. "
            f"Download them once with network access (huggingface-cli download {name_or_path}), "
            f"or put them in a local directory and give its path instead of {name_or_path!r}."
        ) from error
    return Path(local)


def require_model_file(path: str | os.PathLike, what: str, url: str, licence: str) -> Path:
    """``path`` when it is a file; otherwise a :class:`MissingModelError` in one line naming ``what`` the file
    is, the command that downloads it from ``url`` into place, and its ``licence``.

    For model files published outside the Hugging Face hub (metric networks), which are never fetched
    implicitly: evaluation must give the same numbers offline as online.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    raise MissingModelError(
        f"{what} is missing: {path} does not exist. Download it once with "
        f"`mkdir -p {path.parent} && curl -L -o {path} {url}` (licence: {licence}), "
        f"or give --models a folder that holds it (a tiny random stand-in: scripts/make_tiny_checkpoint.py)."
    )
