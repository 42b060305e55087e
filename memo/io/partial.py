"""Files and folders written under a temporary name and renamed onto their place once complete.

Every output of the project (the mp4, batch summaries, prepared-data files, finetuning checkpoints, the tiny
pack's files, evaluation reports and feature caches), and every temporary work folder (:func:`work_folder`:
vocal separation's copies of the user's audio), is written through :class:`Partial`: a hidden
``.NAME.<pid>-<hex>.partial[SUFFIX]`` beside the target, renamed onto it by :meth:`Partial.publish`, removed
by :meth:`Partial.discard`. A run stopped by an exception or a handled signal (``memo.errors.stop_on_signals``)
discards its partial on the way out.

A run killed where no handler sees it (``kill -9``, the OOM killer, a power cut) leaves the partial behind;
the next :class:`Partial` created in that folder removes it. Whether a partial's writer is still running is
told by an advisory ``flock`` the writer holds on the partial (a file, or the folder itself) from creating it
to publishing it: the kernel drops it when the process dies, however it dies, so a partial whose lock can be
taken is abandoned, and the partial of a job still running, in this process or another, on this machine or
(over NFS, where Linux turns ``flock`` into a lock the server keeps) another, is never touched. The pid in
the name only tells a person whose it was. Without ``fcntl`` (Windows) leftovers are not removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so leftovers are kept
    fcntl = None

logger = logging.getLogger("memo")

PARTIAL_PATTERN = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.partial(\.[A-Za-z0-9]+)?$")
"""The names :class:`Partial` gives: ``.NAME.<pid>-<8 hex>.partial`` and an optional suffix such as ``.mp4``."""


NAME_MAX = 255
"""The longest file name, in bytes, of the usual file systems (ext4, XFS, Btrfs, APFS, NTFS in UTF-16 units)."""


def _hidden_name(name: str, suffix: str) -> str:
    """``.NAME.<pid>-<8 hex>.partial[SUFFIX]``, NAME cut (on a character boundary) so that the whole fits
    :data:`NAME_MAX` bytes: a target name that fits must never fail for its longer partial name."""
    tail = f".{os.getpid()}-{uuid.uuid4().hex[:8]}.partial{suffix}"
    room = NAME_MAX - 1 - len(os.fsencode(tail))
    return f".{os.fsencode(name)[:room].decode('utf-8', 'ignore')}{tail}"


def _lock(fd: int, wait: bool) -> bool:
    """Take the exclusive advisory lock on ``fd``; False when ``wait`` is off and another process holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (it was not removed or replaced meanwhile)."""
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _open_flags(directory: bool) -> int:
    return os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if directory else os.O_RDWR


def remove_abandoned(folder: str | os.PathLike) -> list[Path]:
    """Remove the partials in ``folder`` whose writer no longer runs (nobody holds their lock); returns them.

    Partials being written, by any process, are left alone; so is everything not named like a partial.
    Nothing happens without ``fcntl`` or when the folder cannot be listed.
    """
    folder = Path(folder)
    if fcntl is None:
        return []
    try:
        names = [entry.name for entry in os.scandir(folder) if PARTIAL_PATTERN.match(entry.name)]
    except OSError:
        return []
    removed = []
    for name in names:
        path = folder / name
        directory = path.is_dir() and not path.is_symlink()
        try:
            fd = os.open(path, _open_flags(directory) | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if _lock(fd, wait=False) and _same_file(fd, path):
                if directory:
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)  # releases the lock taken, if any
    if removed:
        logger.info(
            "removed %d partial file(s) left in %s by runs that were killed: %s",
            len(removed),
            folder,
            ", ".join(path.name for path in removed),
        )
    return removed


_CLEANED: set[str] = set()
"""Folders this process has removed abandoned partials from."""


class Partial:
    """A hidden temporary file or folder beside ``target``, locked while this process writes it.

    ``suffix`` ends the temporary name (``.mp4`` lets writers that go by the extension pick the format);
    ``directory`` makes an (empty) folder instead of an (empty) file. Writers open :attr:`path` themselves
    (writing into the existing file or folder keeps the lock, which is on it, not on a name). The target's
    folder must exist. Use as a context manager: leaving the block without :meth:`publish` discards the partial.

    The first partial a process creates in a folder first removes the abandoned ones there
    (:func:`remove_abandoned`), so the next run into a folder cleans up after a killed one; later ones skip
    that, so writing many files into a big folder lists it once.
    """

    def __init__(self, target: str | os.PathLike, suffix: str = "", directory: bool = False) -> None:
        self.target = Path(target)
        self.directory = directory
        folder = os.path.abspath(self.target.parent)
        if folder not in _CLEANED:  # once per folder and process: a folder of many files is listed once
            _CLEANED.add(folder)
            remove_abandoned(folder)
        while True:
            self.path = self.target.with_name(_hidden_name(self.target.name, suffix))
            if directory:
                self.path.mkdir()
                self._fd = os.open(self.path, _open_flags(True))
            else:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            _lock(self._fd, wait=True)
            if _same_file(self._fd, self.path):  # not removed by a cleaner between creating and locking
                break
            os.close(self._fd)

    def __enter__(self) -> Partial:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()

    @property
    def done(self) -> bool:
        return self._fd is None

    def publish(self, sync: bool = False, replace: bool = True) -> Path:
        """Rename the partial onto the target and release it; returns the target.

        ``sync`` flushes the file's data to disk first (for files whose loss in a power cut would go unseen).
        An existing target is replaced when ``replace`` is on (a folder too: the old one is moved aside and
        removed), else :class:`FileExistsError` is raised and the partial is kept for :meth:`discard`.
        """
        if self.done:
            raise RuntimeError(f"{self.path} was already published or discarded.")
        if sync and not self.directory:
            os.fsync(self._fd)
        if self.target.exists() or self.target.is_symlink():
            if not replace:
                raise FileExistsError(f"{self.target} appeared while it was being written.")
            if self.target.is_dir() and not self.target.is_symlink():
                with Partial(self.target, directory=True) as old:
                    os.rmdir(old.path)
                    os.replace(self.target, old.path)  # the old folder, now under a locked hidden name
                    os.replace(self.path, self.target)
                    shutil.rmtree(old.path, ignore_errors=True)
                self._release()
                return self.target
        os.replace(self.path, self.target)
        self._release()
        return self.target

    def discard(self) -> None:
        """Remove the partial (if it was not published); safe to call again."""
        if self.done:
            return
        with contextlib.suppress(OSError):
            if self.directory:
                shutil.rmtree(self.path)
            else:
                self.path.unlink()
        self._release()

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def work_folder(name: str, parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """A temporary work folder (``.NAME.<pid>-<hex>.partial`` in ``parent``, default the system's temporary
    folder, ``TMPDIR``), removed on leaving, under the same rule as partial outputs: locked while this process
    runs, so that a run killed with ``kill -9`` leaves it only until the next one that makes a work folder there
    (:func:`remove_abandoned`). For intermediate files holding the user's data (decoded audio...)."""
    folder = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    with Partial(folder / name, directory=True) as partial:
        yield partial.path


def write_atomically(target: str | os.PathLike, data: bytes | str, sync: bool = False) -> Path:
    """Write ``data`` (text as UTF-8) to ``target`` through a :class:`Partial`; returns the target."""
    with Partial(target) as partial:
        with open(partial.path, "wb") as file:
            file.write(data.encode("utf-8") if isinstance(data, str) else data)
        return partial.publish(sync=sync)
