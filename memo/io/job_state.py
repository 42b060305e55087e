"""The saved progress of one render, in a hidden folder beside its output: ``.NAME.resume/`` for ``NAME``.

What it holds (every file written atomically through :class:`memo.io.partial.Partial`, so a stop at any
moment leaves only whole files, and half-written ones follow the abandoned-partial rule):

- ``job.json``: the job's fingerprint (image and audio content, seed, every frame-changing setting); a
  rerun whose fingerprint differs discards the folder, naming the first difference.
- ``sound.m4a`` and ``clip-NNNNN.ts``: the sound track and one encoded segment per finished clip
  (:mod:`memo.io.segments`), with ``live.m3u8``, the live HLS playlist of the video so far.
- ``clip-NNNNN.pt``: what a finished clip leaves for the next ones: its denoised latents, the noise
  generator's state and the seconds it took. A clip counts as done when both its files are there.
- ``memory.pt``: a snapshot of the temporal memory through some clip (see :class:`memo.pipeline.ResumeState`),
  written on the schedule of :func:`snapshot_due` and when a handled signal stops the run; the latents of the
  clips before it are then removed. A memory on an accelerator is copied to the host and written to disk in
  the background while the render goes on (one snapshot at a time); a memory already on the host is written
  at once (copying it would double the host memory it takes).

The folder is locked (``flock``) while a run uses it: a second run into the same output is refused. It is
removed once the video is published.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from memo.errors import UserError
from memo.io.partial import Partial, _lock, write_atomically
from memo.io.segments import PLAYLIST_NAME, SOUND_NAME, segment_name

JOB_NAME = "job.json"
MEMORY_NAME = "memory.pt"
FIRST_SNAPSHOT_SECONDS = 120.0
"""The rendering time before the first memory snapshot (:func:`snapshot_due`): reading a snapshot at resume
(6.5 GiB at 512x512 bf16, about 7 s at 1 GB/s) costs about what replaying 2 minutes of clips does (about 7 %
of their time, docs/long-renders.md), so an earlier one would not make a resume faster."""


def snapshot_due(since: float, held: float, every: float) -> bool:
    """Whether to snapshot the temporal memory now: ``since`` seconds of rendering have passed since the last
    snapshot, which held ``held`` seconds of rendering (0 with none yet), and ``every`` is the longest interval
    (``resume_snapshot_minutes`` x 60; 0: every clip).

    Snapshots come after 2, 4, 8, 16 minutes of rendering (:data:`FIRST_SNAPSHOT_SECONDS`, then doubling), then
    every ``every``: a resume after ``kill -9`` replays the clips since the last snapshot, so it never replays more
    than about as much rendering as the snapshot holds (half the time rendered) early in a render, where a
    fixed interval would replay all of it, nor more than ``every`` later."""
    return since >= min(every, max(FIRST_SNAPSHOT_SECONDS, held))


def _save(data: object, path: Path) -> None:
    """``torch.save(data, path)``, a failed write raised as the ``OSError`` it is (torch raises a RuntimeError;
    ENOSPC when the disk is full), so that it reads as the other writes' errors do."""
    try:
        torch.save(data, path)
    except RuntimeError as error:
        full = shutil.disk_usage(path.parent).free < 16 * 1024**2
        raise OSError(
            errno.ENOSPC if full else errno.EIO, os.strerror(errno.ENOSPC if full else errno.EIO), str(path)
        ) from error


class JobBusyError(UserError, RuntimeError):
    """Another run is rendering into the same output."""


def state_folder(output: str | os.PathLike) -> Path:
    """Where the progress of the render into ``output`` is kept: ``.NAME.resume`` beside it."""
    output = Path(output)
    return output.with_name(f".{output.name}.resume")


def first_difference(saved: dict[str, str], job: dict[str, str]) -> str | None:
    """The first key whose value differs between two fingerprints, with both values, in words; None if equal."""
    for key in job:
        if saved.get(key) != job[key]:
            if key in ("image", "audio", "version"):
                return f"the {key} differs" if key != "version" else "memo's version differs"
            return f"{key} differs ({job[key]}, was {saved.get(key, 'unset')})"
    extra = sorted(set(saved) - set(job))
    return f"{extra[0]} differs (unset, was {saved[extra[0]]})" if extra else None


@dataclass
class ClipRecord:
    """What a finished clip leaves: its denoised latents (1, C, F, h, w), the noise generator's state after
    its noise was drawn (None without a generator), and the seconds its rendering took."""

    latents: torch.Tensor | None
    noise_state: torch.Tensor | None
    seconds: float


class JobState:
    """The progress folder of the render into ``output``, locked for this process while it is open.

    :meth:`open` finds it, checks it against ``fingerprint`` (discarding it when it differs or ``resume`` is
    off) and creates it; :meth:`done_clips` tells how far it got. Raises :class:`JobBusyError` when another run
    holds it.
    """

    def __init__(self, output: str | os.PathLike, fingerprint: dict[str, str]):
        self.output = Path(output)
        self.folder = state_folder(self.output)
        self.fingerprint = fingerprint
        self._fd: int | None = None
        self.discarded: str | None = None  # why saved progress was thrown away, if it was
        self._writing: threading.Thread | None = None  # a memory snapshot being written in the background
        self._write_error: BaseException | None = None
        self._seconds: dict[int, float] = {}  # each record's rendering time, read once (records are MiBs)

    # -- finding, checking, locking ------------------------------------------------------------------

    def saved(self) -> dict[str, str] | None:
        """The fingerprint saved in the folder, or None when there is none (or it cannot be read)."""
        try:
            return json.loads((self.folder / JOB_NAME).read_text())
        except (OSError, ValueError):
            return None

    def matches(self) -> bool:
        """Whether the folder holds progress of this very job."""
        return self.saved() == self.fingerprint

    def open(self, resume: bool = True) -> JobState:
        """Lock the folder (creating it), discard progress of another job or, without ``resume``, any; sets
        :attr:`discarded` to the reason when something was thrown away."""
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.folder.mkdir(exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        if not _lock(fd, wait=False):
            os.close(fd)
            raise JobBusyError(
                f"Another run is rendering {self.output} (its progress is in {self.folder}); wait for it to "
                "finish or stop it, or choose another output."
            )
        self._fd = fd
        saved = self.saved()
        if saved is not None and (not resume or saved != self.fingerprint):
            self.discarded = (
                "--restart (resume=False)" if resume is False else first_difference(saved, self.fingerprint)
            )
            self._clear()
        elif saved is None and any(self.folder.iterdir()):
            self._clear()  # a folder without its job file: nothing in it can be trusted
        if self.saved() is None:
            write_atomically(self.folder / JOB_NAME, json.dumps(self.fingerprint, indent=1, sort_keys=False))
        return self

    def _clear(self) -> None:
        self._seconds.clear()
        for entry in self.folder.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the lock (the folder stays, for a later run)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def remove(self) -> None:
        """Remove the folder (the video is published) and release the lock."""
        self.wait_for_memory(raise_error=False)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.close()

    def __enter__(self) -> JobState:
        return self

    def __exit__(self, *exc) -> None:
        self.wait_for_memory(raise_error=False)  # a snapshot's own failure only makes a resume replay more
        self.close()

    # -- clips -----------------------------------------------------------------------------------------

    @property
    def sound(self) -> Path:
        return self.folder / SOUND_NAME

    @property
    def playlist(self) -> Path:
        return self.folder / PLAYLIST_NAME

    def segment(self, clip: int) -> Path:
        return self.folder / segment_name(clip)

    def record_path(self, clip: int) -> Path:
        return self.folder / f"clip-{clip:05d}.pt"

    def done_clips(self) -> int:
        """How many clips, from the first, are finished (segment and record both written)."""
        clip = 0
        while self.segment(clip).is_file() and self.record_path(clip).is_file():
            clip += 1
        return clip

    def save_clip(self, clip: int, record: ClipRecord) -> None:
        """Write clip ``clip``'s record (after its segment: a clip is done once both are there)."""
        with Partial(self.record_path(clip), suffix=".pt") as partial:
            _save(
                {"latents": record.latents, "noise_state": record.noise_state, "seconds": record.seconds}, partial.path
            )
            partial.publish()
        self._seconds[clip] = record.seconds

    def load_clip(self, clip: int) -> ClipRecord:
        data = torch.load(self.record_path(clip), map_location="cpu", weights_only=True)
        self._seconds[clip] = float(data["seconds"])
        return ClipRecord(data["latents"], data["noise_state"], self._seconds[clip])

    def seconds_kept(self, clips: int) -> float:
        """The rendering time of the first ``clips`` clips, as recorded (each record read at most once)."""
        return sum(
            self._seconds[clip] if clip in self._seconds else self.load_clip(clip).seconds for clip in range(clips)
        )

    # -- the memory snapshot -----------------------------------------------------------------------------

    def save_memory(
        self, clip: int, states: dict[str, tuple[torch.Tensor, torch.Tensor]], background: bool | None = None
    ) -> None:
        """Snapshot the temporal memory holding the past frames through clip ``clip``: written atomically, then
        the latents of the clips before it, which no replay needs any more, are dropped.

        ``background`` (default: when the states are on an accelerator): copy the states to the host now and
        write them while the caller goes on (a snapshot still being written is waited for first); a failed
        write is raised by the next call or :meth:`wait_for_memory` (leaving the ``with`` block drops it). Otherwise the
        states are written before this returns, without a copy (a memory on the host is not doubled)."""
        self.wait_for_memory()
        if background is None:
            background = any(tensor.device.type != "cpu" for state in states.values() for tensor in state)
        host = {
            name: tuple(tensor.detach().to("cpu", copy=background) for tensor in state)
            for name, state in states.items()
        }
        if not background:
            self._write_memory(clip, host)
            return

        def write() -> None:
            try:
                self._write_memory(clip, host)
            except BaseException as error:  # raised in the render's thread by wait_for_memory
                self._write_error = error

        self._writing = threading.Thread(target=write, name="memo-memory-snapshot")
        self._writing.start()

    def wait_for_memory(self, raise_error: bool = True) -> None:
        """Wait for a memory snapshot being written in the background; raise its error (when ``raise_error``)."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.join()
        error, self._write_error = self._write_error, None
        if error is not None and raise_error:
            raise error

    def _write_memory(self, clip: int, host: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        with Partial(self.folder / MEMORY_NAME, suffix=".pt") as partial:
            _save({"clip": clip, "states": host}, partial.path)
            partial.publish()
        for earlier in range(clip - 1):  # the latents of the snapshot's clip and the one before may be needed
            path = self.record_path(earlier)
            if path.is_file():
                record = self.load_clip(earlier)
                if record.latents is not None:
                    self.save_clip(earlier, ClipRecord(None, None, record.seconds))

    def drop_memory(self) -> None:
        """Remove the snapshot once every clip is done (the largest file: a stop between publishing the video and
        removing the folder then leaves only the clips' small files behind); one being written is waited for."""
        self.wait_for_memory(raise_error=False)
        (self.folder / MEMORY_NAME).unlink(missing_ok=True)

    def load_memory(self) -> tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]] | None]:
        """The snapshot's clip and states, or (-1, None) when there is none."""
        path = self.folder / MEMORY_NAME
        if not path.is_file():
            return -1, None
        data = torch.load(path, map_location="cpu", weights_only=True)
        return int(data["clip"]), data["states"]
