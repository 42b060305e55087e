"""What is wrong with an input path, said the same way by every program and for every kind of input file.

:func:`input_problem` tells a missing file apart from what users actually typed: a URL (never fetched), a
Windows path on another system, a folder, a pipe such as a shell's ``<(...)`` (read once, but inputs are read
more than once), a device. The image and audio loaders and the batch manifest's check before any model loads
all word it through here.
"""

from __future__ import annotations

import os
import re
import stat

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/+")
"""A URL (``https://``, ``s3://``, ``file:/``; also with the doubled slash collapsed, as ``Path`` collapses it)."""
WINDOWS = re.compile(r"^([A-Za-z]:[\\/]|\\\\)|\\")
"""A Windows path: a drive letter, a UNC share, or backslashes as separators."""


def input_problem(path: str | os.PathLike, what: str = "file") -> str | None:
    """Why ``path`` cannot be read as the input ``what`` ("is a URL ...", "does not exist"), None when it is a
    regular file. Nothing is read."""
    text = os.fspath(path)
    if not os.path.exists(text):
        if URL.match(text):
            return "is a URL; URLs are not fetched: download the file and give its path"
        if os.sep == "/" and WINDOWS.search(text):
            return (
                "does not exist (it is a Windows path: on this system write it with / and this system's folders, "
                "e.g. /mnt/c/... under WSL)"
            )
        if os.path.islink(text):
            return f"is a link to {os.readlink(text)}, which does not exist (a moved or deleted file)"
        return "does not exist"
    if os.path.isdir(text):
        return f"is a folder, not a {what}"
    mode = os.stat(text).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "is a pipe (a shell's <(...) gives one), which can be read only once; save it to a file and give that"
    if not stat.S_ISREG(mode):
        return f"is not a regular file (a device?); give the {what} itself"
    return None
