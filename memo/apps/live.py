"""The video as it is made, in pieces a player can show while the render goes on (the web app's live stream).

:func:`generate_watched` renders like :meth:`MemoGenerator.generate` and also hands out, as they finish,
segments of at least ``min_seconds`` of video with their sound: ``on_segment(path, index, start_s, duration_s)``.
They are the render's own per-clip MPEG-TS segments (``memo/io/segments.py``), the pieces the final mp4 is
remuxed from, joined into >= 2 s pieces (:class:`SegmentGroups`): nothing is encoded a second time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from memo.generator import MemoGenerator, Progress

SegmentCallback = Callable[[Path, int, float, float], None]
"""Called as ``on_segment(path, index, start_s, duration_s)`` when a segment (an mp4 with H.264 and AAC) is
written: its file, its number from 0, where it starts in the video and how long it lasts, in seconds."""

MIN_SEGMENT_SECONDS = 2.0
"""Shortest live segment: a browser plays segments of 2-3 s without stutter; one clip is ~0.5 s at 30 fps."""


class SegmentGroups:
    """Joins consecutive MPEG-TS segments (one per clip, timestamps continuing from one to the next, as the segment
    store writes them) into pieces of at least ``min_seconds`` for ``on_segment``, by putting their bytes one after
    the other (a valid MPEG-TS stream: nothing is encoded again). :meth:`finish` hands out the rest."""

    def __init__(self, folder: Path, on_segment: SegmentCallback, min_seconds: float = MIN_SEGMENT_SECONDS) -> None:
        self.folder, self.on_segment, self.min_seconds = folder, on_segment, min_seconds
        self.pending: list[tuple[bytes, float, float]] = []
        self.index = 0

    def add(self, path: Path, index: int, start_s: float, duration_s: float) -> None:
        self.pending.append((Path(path).read_bytes(), start_s, duration_s))  # read now: the render removes it
        if sum(duration for _, _, duration in self.pending) >= self.min_seconds - 1e-6:
            self.finish()

    def finish(self) -> None:
        """Hand out the segments gathered so far as one piece (nothing when there are none)."""
        if not self.pending:
            return
        joined = self.folder / f"live_{self.index:05d}.ts"
        with joined.open("wb") as out:
            for data, _, _ in self.pending:
                out.write(data)
        start = self.pending[0][1]
        duration = sum(duration for _, _, duration in self.pending)
        self.pending = []
        self.on_segment(joined, self.index, start, duration)
        self.index += 1


def generate_watched(
    generator: MemoGenerator,
    image: str | os.PathLike,
    audio: str | os.PathLike,
    output: str | os.PathLike,
    on_segment: SegmentCallback,
    segments: Path,
    progress: Progress | None = None,
    resume: bool = False,
) -> Path:
    """:meth:`MemoGenerator.generate` into ``output`` (returned), handing each >= 2 s piece of the render's
    segments to ``on_segment``; the pieces are written under ``segments`` (a folder the caller owns and removes).
    ``resume`` goes on from the saved progress of the same job (its kept segments come first), else starts over."""
    groups = SegmentGroups(segments, on_segment)
    result = generator.generate(image, audio, output, progress=progress, on_segment=groups.add, resume=resume)
    groups.finish()
    return result
