"""The video as it is made, in pieces a player can show while the render goes on (the web app's live stream).

:func:`generate_watched` renders like :meth:`MemoGenerator.generate` and also hands out, as they finish,
segments of at least ``min_seconds`` of video with their sound: ``on_segment(path, index, start_s, duration_s)``.

Interim, until ``MemoGenerator.generate(..., on_segment=...)`` exists (the segment store of issue 27, branch
i27-resume): the segments are encoded here from the frames on their way to the mp4 (:class:`SegmentTap`), a
second encode of the same frames. Once ``generate`` takes ``on_segment``, :func:`generate_watched` passes it on
instead and joins the store's per-clip MPEG-TS segments into >= 2 s pieces (:class:`SegmentGroups`): the very
pieces the final mp4 is assembled from.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from memo.generator import MemoGenerator, PreparedAudio, PreparedImage, Progress
from memo.io.audio import DecodedAudio
from memo.io.video import VideoWriter

SegmentCallback = Callable[[Path, int, float, float], None]
"""Called as ``on_segment(path, index, start_s, duration_s)`` when a segment (an mp4 with H.264 and AAC) is
written: its file, its number from 0, where it starts in the video and how long it lasts, in seconds."""

MIN_SEGMENT_SECONDS = 2.0
"""Shortest live segment: a browser plays segments of 2-3 s without stutter; one clip is ~0.5 s at 30 fps."""


class SegmentTap:
    """Collects the frames on their way to the mp4 and encodes them, with the matching slice of the sound, into an
    mp4 segment in ``folder`` whenever at least ``min_seconds`` of video have gathered (:meth:`finish` writes the
    rest). Frames come as :meth:`memo.io.video.VideoWriter.write` takes them; they are copied."""

    def __init__(
        self,
        folder: Path,
        fps: float,
        audio: DecodedAudio | None,
        on_segment: SegmentCallback,
        min_seconds: float = MIN_SEGMENT_SECONDS,
        crf: int = 18,
    ) -> None:
        self.folder, self.fps, self.audio, self.on_segment = folder, fps, audio, on_segment
        self.min_frames = max(1, round(min_seconds * fps))
        self.crf = crf
        self.pending: list[np.ndarray] = []  # uint8 (n, H, W, 3)
        self.written = 0  # frames in earlier segments
        self.index = 0

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        if isinstance(frames, np.ndarray) and frames.dtype == np.uint8:
            pixels = frames.copy()
        else:
            video = torch.as_tensor(frames).detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
            pixels = video.permute(1, 2, 3, 0).cpu().numpy()
        self.pending.append(pixels)
        if sum(len(block) for block in self.pending) >= self.min_frames:
            self.finish()

    def finish(self) -> None:
        """Write the frames gathered so far as one segment (nothing when there are none)."""
        if not self.pending:
            return
        frames = np.concatenate(self.pending)
        self.pending = []
        start_s, duration_s = self.written / self.fps, len(frames) / self.fps
        path = self.folder / f"segment_{self.index:05d}.mp4"
        height, width = frames.shape[1:3]
        with VideoWriter(path, self.fps, width, height, audio=self._sound(start_s, duration_s), crf=self.crf) as out:
            out.write(frames)
        self.on_segment(path, self.index, start_s, duration_s)
        self.written += len(frames)
        self.index += 1

    def _sound(self, start_s: float, duration_s: float) -> DecodedAudio | None:
        if self.audio is None:
            return None
        rate = self.audio.rate
        first, last = round(start_s * rate), round((start_s + duration_s) * rate)
        return dataclasses.replace(self.audio, samples=self.audio.samples[:, first:last])


class SegmentGroups:
    """Joins consecutive MPEG-TS segments (one per clip, timestamps continuing from one to the next, as the segment
    store writes them) into pieces of at least ``min_seconds`` for ``on_segment``, by putting their bytes one after
    the other (a valid MPEG-TS stream: nothing is encoded again). :meth:`finish` hands out the rest."""

    def __init__(self, folder: Path, on_segment: SegmentCallback, min_seconds: float = MIN_SEGMENT_SECONDS) -> None:
        self.folder, self.on_segment, self.min_seconds = folder, on_segment, min_seconds
        self.pending: list[tuple[Path, float, float]] = []
        self.index = 0

    def add(self, path: Path, index: int, start_s: float, duration_s: float) -> None:
        self.pending.append((Path(path), start_s, duration_s))
        if sum(duration for _, _, duration in self.pending) >= self.min_seconds - 1e-6:
            self.finish()

    def finish(self) -> None:
        """Hand out the segments gathered so far as one piece (nothing when there are none)."""
        if not self.pending:
            return
        joined = self.folder / f"live_{self.index:05d}.ts"
        with joined.open("wb") as out:
            for path, _, _ in self.pending:
                out.write(path.read_bytes())
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
    """:meth:`MemoGenerator.generate` into ``output`` (returned), handing each finished segment to ``on_segment``;
    the interim segments are written under ``segments`` (a folder the caller owns and removes). ``resume`` goes
    on from the saved progress of the same job where ``generate`` can (issue 27's resume), else starts over."""
    accepts = inspect.signature(generator.generate).parameters
    more = {"resume": resume} if "resume" in accepts else {}
    if "on_segment" in accepts:
        groups = SegmentGroups(segments, on_segment)
        result = generator.generate(image, audio, output, progress=progress, on_segment=groups.add, **more)
        groups.finish()
        return result
    watched = generator.with_settings()

    def render_tapped(
        prepared_image: PreparedImage,
        prepared_audio: PreparedAudio,
        output_path: Path,
        seed: int,
        overwrite: bool,
        progress: Progress | None = None,
    ) -> Path:
        """:meth:`MemoGenerator.render`, with the frames also going to a :class:`SegmentTap`."""
        config = watched.config
        width, height = config.size
        paste = watched.paste_plan(prepared_image)
        if paste is not None:
            width, height = paste.size
        tap = SegmentTap(segments, config.fps, prepared_audio.source, on_segment, crf=config.crf)
        sound = prepared_audio.source
        with VideoWriter(
            output_path, config.fps, width, height, audio=sound, overwrite=overwrite, crf=config.crf
        ) as out:

            def write(frames: torch.Tensor | np.ndarray) -> None:
                out.write(frames)
                tap.write(frames)

            watched.render_clips(
                prepared_image, prepared_audio, seed, write if paste is None else paste.streaming(write), progress
            )
            tap.finish()
        return output_path

    watched.render = render_tapped
    return watched.generate(image, audio, output, progress=progress, **more)
