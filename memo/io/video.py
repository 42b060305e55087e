"""The output video's place and form: where it may be written (:func:`check_output_path`, checked before any
work, creating nothing), what is read back from it (:func:`probe_video`), and the encoding's facts (H.264 on
CPU-independent algorithms, frames as pixels, AAC's sample rates).

The encoders are in ``memo/io/segments.py`` (a render's per-clip segments, its sound, the mp4 remux) and
``memo/io/video_writer.py`` (the same for a video written in one go).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch

from memo.errors import UserError, as_path
from memo.io.partial import NAME_MAX

_AAC_RATES = {8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000}


class OutputExistsError(UserError, FileExistsError):
    """The output file exists and overwriting it was not asked for."""


class OutputLocationError(UserError, OSError):
    """The output cannot be written where it was asked for: a file in the way, no permission, no room."""


MIN_FREE_BYTES = 64 * 1024**2
"""Free space the output's folder must have: a few minutes of 512x512 H.264 at crf 18 with AAC sound (a
minute is about 10 MB)."""

X264_PARAMS = "cpu-independent=1"
"""libx264 on its CPU-independent algorithms: with the ones it picks for this CPU, the same frames encoded twice
decode to different pixels (seen with PyAV 18.1 / FFmpeg 8.1, on one thread as on many: 3 distinct results in
10 encodes of one clip; the lookahead's choices vary), so a rerun, or a video split over two processes, would
not give the same file's pixels. With it, 10 encodes in 10 give one result, at the same size, quality and
speed (a 60-frame 512x512 clip: 97.7 kB vs 97.6 kB, PSNR 37.19 dB both, about 16 ms per frame)."""


def _kind(mode: int) -> str:
    """What a non-folder is, in words, for messages."""
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a file"


def _loops(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as error:
        return error.errno == errno.ELOOP
    return False


def _nearest_existing(folder: Path) -> tuple[Path, bool]:
    """The nearest of ``folder`` and its ancestors that exists (links followed), and whether a path below it
    could not be looked up for want of permission (then that ancestor cannot be entered), or raise
    :class:`OutputLocationError` for a symbolic link on the way that points nowhere or loops."""
    candidate, blocked = folder, False
    while True:
        try:
            os.stat(candidate)
            return candidate, blocked
        except PermissionError:
            blocked = True
        except FileNotFoundError:
            if os.path.islink(candidate):
                target = os.readlink(candidate)
                inside = "" if candidate == folder else f" (on the way to {folder})"
                raise OutputLocationError(
                    f"Cannot write to the output folder {folder}: {candidate}{inside} is a symbolic link to "
                    f"{target}, which does not exist. Create {target}, remove the link, or choose another "
                    "output folder."
                ) from None
        except NotADirectoryError:
            pass  # a file on the way: found as the nearest existing entry above
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise OutputLocationError(
                    f"Cannot write to the output folder {folder}: {candidate} cannot be read "
                    f"({error.strerror or error}). Choose another output folder."
                ) from None
            while candidate != candidate.parent and _loops(candidate.parent):
                candidate = candidate.parent  # the link itself, not a path through it
            raise OutputLocationError(
                f"Cannot write to the output folder {folder}: {candidate} is a symbolic link that loops back on "
                "itself. Fix or remove the link, or choose another output folder."
            ) from None
        if candidate == candidate.parent:
            return candidate, blocked
        candidate = candidate.parent


def check_output_folder(folder: str | os.PathLike, min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """Check that files can be written in ``folder``, creating nothing that stays: call before any model loads.

    The folder may not exist yet: then its nearest existing ancestor must be a folder (not a regular file, a
    named pipe or a device such as ``/dev/null``) in which a file can be created, which is tried (a hidden
    temporary file, removed at once). A symbolic link on the way must lead to a folder: a link to a missing
    folder is refused rather than followed (creating its target would put the output where the link's
    author meant something else to be), and so is a loop of links. The filesystem must have
    ``min_free_bytes`` free. Returns the folder; raises :class:`OutputLocationError` saying which folder is
    the problem and why.
    """
    folder = as_path(folder, "The output folder")
    existing, blocked = _nearest_existing(folder)
    inside = "" if existing == folder else f" (it is inside {existing})"
    if blocked:
        raise OutputLocationError(
            f"Cannot write to the output folder {folder}: {existing} cannot be entered (permission denied; a "
            f"folder needs execute permission to be entered). Fix its permissions (chmod u+x {existing}) or "
            "choose another output folder."
        )
    mode = os.stat(existing).st_mode
    if not stat.S_ISDIR(mode):
        raise OutputLocationError(
            f"Cannot write to the output folder {folder}{inside}: {existing} is {_kind(mode)}, not a folder. "
            "Choose another output folder."
        )
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".memo-write-check-"):
            pass
    except OSError as error:
        where = "" if existing == folder else f" (where {folder} would be created)"
        searchable = "" if os.access(existing, os.X_OK) else "; it lacks execute permission, which entering it needs"
        raise OutputLocationError(
            f"Cannot write to the output folder {folder}: creating a file in {existing}{where} failed "
            f"({error.strerror or error}{searchable}). Choose a folder you can write to, or fix its permissions."
        ) from None
    free = shutil.disk_usage(existing).free
    if free < min_free_bytes:
        raise OutputLocationError(
            f"Not enough free space for the output in {folder}: {free / 1024**2:.0f} MB free, at least "
            f"{min_free_bytes / 1024**2:.0f} MB needed. Free some space or choose another output folder."
        )
    return folder


def check_output_path(path: str | os.PathLike, overwrite: bool, example: str = "out.mp4") -> Path:
    """Check that the file ``path`` may be written (see :func:`check_output_folder`); creates nothing.

    Call before any expensive work; ``example`` is the file name the message for a folder suggests. Raises
    :class:`OutputExistsError` for an existing output without ``overwrite`` or a folder in its place,
    :class:`OutputLocationError` when its folder cannot be written.
    """
    path = as_path(path, "The output path")
    size = len(os.fsencode(path.name))
    if size > NAME_MAX:
        raise OutputLocationError(
            f"The output name {path.name!r} is {size} bytes long; a file name may have at most {NAME_MAX}. Give "
            "the image or audio file a shorter name, or the output one (batch: the manifest's output column)."
        )
    check_output_folder(path.parent)
    if path.is_dir():
        raise OutputExistsError(
            f"Output {str(path)!r} is a directory; give a file name such as {str(path / example)!r}."
        )
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputExistsError(
            f"Output {str(path)!r} already exists; pass --overwrite to replace it, or choose another output."
        )
    return path


@dataclass(frozen=True)
class CheckedOutput:
    """An output path that :func:`check_output_path` has passed (with ``overwrite``): the program's boundary
    checked it, so the code that writes it (``memo.io.video_writer.VideoWriter``, a render's segments) does not
    check it again."""

    path: Path
    overwrite: bool

    @classmethod
    def check(cls, path: str | os.PathLike, overwrite: bool, example: str = "out.mp4") -> CheckedOutput:
        """:func:`check_output_path`, remembered; raises as it does."""
        return cls(check_output_path(path, overwrite, example), overwrite)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones created, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
    return missing


@dataclass
class VideoInfo:
    """What a written video holds, as read back from the file."""

    num_frames: int
    fps: float
    width: int
    height: int
    video_codec: str
    has_audio: bool
    audio_codec: str | None
    audio_duration: float | None
    metadata: dict[str, str] = field(default_factory=dict)


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read a video's frame count (exact, from the sample table or by counting packets), size, rate and audio."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{str(path)!r} has no video stream.")
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        info = VideoInfo(
            num_frames=video.frames,
            fps=float(video.average_rate or video.guessed_rate or 0),
            width=video.codec_context.width,
            height=video.codec_context.height,
            video_codec=video.codec_context.name,
            has_audio=audio is not None,
            audio_codec=audio.codec_context.name if audio is not None else None,
            audio_duration=float(audio.duration * audio.time_base) if audio is not None and audio.duration else None,
            metadata=dict(container.metadata),
        )
        if not info.num_frames:
            info.num_frames = sum(1 for packet in container.demux(video) if packet.size)
    return info


def to_pixels(frames: torch.Tensor | np.ndarray, height: int, width: int) -> np.ndarray:
    """Frames as a uint8 (n, H, W, 3) array: from a float (3, n, H, W) tensor or array in [0, 1] (rounded), or a
    uint8 (n, H, W, 3) array as it is. Raises ``ValueError`` for any other layout or size."""
    if isinstance(frames, np.ndarray) and frames.dtype == np.uint8:
        layout, expected, pixels = "(n, H, W, 3)", (height, width, 3), frames
        shape = frames.shape[1:] if frames.ndim == 4 else None
    else:
        video = torch.as_tensor(frames)
        layout, expected = "(3, n, H, W)", (3, height, width)
        shape = (video.shape[0], *video.shape[2:]) if video.ndim == 4 else None
        if shape == expected:
            video = video.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
            pixels = video.permute(1, 2, 3, 0).cpu().numpy()
    if shape != expected:
        raise ValueError(
            f"Frames must be laid out {layout} with H, W = {height}, {width}; got shape {tuple(frames.shape)}."
        )
    return pixels
