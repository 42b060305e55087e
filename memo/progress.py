"""Honest progress for long work: what is done of what there is, at what speed, and how long is left.

Two bars, one style, both on tqdm (stderr, log lines printed above them rather than through them):

- :class:`VideoProgress` for a render: video time done / total ("00:42.0 / 03:10.0 video"), the render speed in
  seconds per frame averaged over the clips this run finished, and the time left. A resumed render starts the
  bar where it stands (``start_frame``); the speed and the time left count only this run's work.
- :func:`work_bar` for a list of things (batch jobs, videos to prepare or evaluate): done / total, seconds per
  item averaged over this run, time left; items already done before this run (``initial``) count as done but
  not in the speed.

The text of the video bar (:meth:`VideoProgress.text`) is also what the web app's progress and ComfyUI show.
It imports nothing of ``memo``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

BAR_WIDTH = 20
"""Characters of the bar itself; the text beside it is what matters."""


def clock_text(seconds: float) -> str:
    """A point in the video as ``MM:SS.s`` (``H:MM:SS.s`` from an hour on), e.g. ``03:10.0``; seconds >= 0."""
    tenths = round(max(0.0, seconds) * 10)
    minutes, tenths = divmod(tenths, 600)
    hours, minutes = divmod(minutes, 60)
    text = f"{minutes:02d}:{tenths // 10:02d}.{tenths % 10}"
    return f"{hours}:{text}" if hours else text


def duration_text(seconds: float) -> str:
    """A span of waiting as a person says it: ``8 s``, ``4.5 min``, ``2 h 10 min``; seconds >= 0."""
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min"


class VideoProgress:
    """The progress of one render, clip by clip and step by step, as a tqdm bar and as text.

    Args:
        total_frames: frames of the whole video (> 0).
        fps: frames per second of the video (> 0), to show frames as video time.
        frames_per_clip: frames one clip makes (> 0); the last clip may show fewer.
        steps_per_clip: denoising steps of one clip (> 0), for the share of the clip being made.
        start_frame: frames already made before this run (a resumed render), 0..total_frames.
        bar: show a tqdm bar (on stderr); off for a process that is not the one reporting.
        clock: seconds as a monotonic float; ``time.perf_counter`` unless a test drives it.

    Raises:
        ValueError: for counts out of those ranges.
    """

    def __init__(
        self,
        total_frames: int,
        fps: float,
        frames_per_clip: int,
        steps_per_clip: int,
        *,
        start_frame: int = 0,
        bar: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if total_frames <= 0 or fps <= 0 or frames_per_clip <= 0 or steps_per_clip <= 0:
            raise ValueError(
                f"total_frames, fps, frames_per_clip and steps_per_clip must be > 0, got "
                f"{total_frames}, {fps}, {frames_per_clip}, {steps_per_clip}."
            )
        if not 0 <= start_frame <= total_frames:
            raise ValueError(f"start_frame must be within 0..{total_frames}, got {start_frame}.")
        self.total_frames, self.fps = total_frames, fps
        self.frames_per_clip, self.steps_per_clip = frames_per_clip, steps_per_clip
        self.start_frame = self.done_frames = start_frame
        self.clips = -(-total_frames // frames_per_clip)
        self.steps_done = 0  # of the clip being made
        self.clock = clock
        self.started = clock()
        self.finished_seconds = 0.0  # this run's time spent on its finished clips
        self.clip_started = self.started
        self._bar = None
        self._logs = contextlib.ExitStack()
        if bar:
            self._logs.enter_context(logging_redirect_tqdm())
            self._bar = tqdm(
                total=total_frames,
                initial=start_frame,
                unit="frame",
                leave=None,  # kept on its own, cleared when inside another bar (a batch's jobs)
                bar_format=f"{{percentage:3.0f}}%|{{bar:{BAR_WIDTH}}}| {{desc}}",
                dynamic_ncols=True,
            )
            self._bar.set_description_str(self.text(), refresh=True)

    @property
    def clip(self) -> int:
        """The index of the clip being made (0-based)."""
        return min(self.done_frames // self.frames_per_clip, self.clips - 1)

    @property
    def made_frames(self) -> float:
        """Frames done, counting the clip being made by its share of steps."""
        partial = self.steps_done / self.steps_per_clip * self.frames_per_clip
        return min(self.total_frames, self.done_frames + partial)

    @property
    def fraction(self) -> float:
        """Share of the video done, 0..1, the clip being made counted by its steps."""
        return self.made_frames / self.total_frames

    @property
    def seconds_per_frame(self) -> float | None:
        """This run's render time per frame over the clips it finished; None before the first."""
        frames = self.done_frames - self.start_frame
        return self.finished_seconds / frames if frames else None

    def seconds_left(self) -> float | None:
        """The time left: the frames still to make at the speed so far (from the steps of the first clip while
        no clip is finished); None before the first step."""
        rate = self.seconds_per_frame
        if rate is None:
            made = self.made_frames - self.start_frame
            if made <= 0:
                return None
            rate = (self.clock() - self.started) / made
        return (self.total_frames - self.made_frames) * rate

    def step(self, step: int) -> None:
        """Step ``step`` (0-based) of the clip being made has finished."""
        self.steps_done = min(step + 1, self.steps_per_clip)
        self._refresh()

    def clip_done(self, frames: int) -> None:
        """The clip being made has finished with ``frames`` frames of the video (the last may have fewer)."""
        now = self.clock()
        self.finished_seconds += now - self.clip_started
        self.clip_started = now
        self.done_frames = min(self.total_frames, self.done_frames + frames)
        self.steps_done = 0
        self._refresh()

    def text(self) -> str:
        """E.g. ``clip 3/120, step 5/25: 00:01.1 / 01:03.9 video, 0.42 s/frame, 13.2 min left``."""
        where = f"clip {self.clip + 1}/{self.clips}, step {min(self.steps_done + 1, self.steps_per_clip)}"
        where += f"/{self.steps_per_clip}"
        if self.done_frames >= self.total_frames:
            where = f"{self.clips} clips"
        video = f"{clock_text(self.made_frames / self.fps)} / {clock_text(self.total_frames / self.fps)} video"
        rate = self.seconds_per_frame
        speed = f"{rate:.2f} s/frame" if rate is not None else "s/frame after the first clip"
        left = self.seconds_left()
        if self.done_frames >= self.total_frames:
            remaining = "done"
        elif left is None:
            remaining = "estimating time left"
        else:
            remaining = f"{duration_text(left)} left"
        return f"{where}: {video}, {speed}, {remaining}"

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.n = self.made_frames
            self._bar.set_description_str(self.text(), refresh=True)

    def close(self) -> None:
        """Leave the bar as it stands, and log lines go back to their own handlers."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._logs.close()

    def __enter__(self) -> VideoProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def work_bar(
    items: Iterable | None = None,
    *,
    total: int | None = None,
    unit: str = "video",
    desc: str = "",
    initial: int = 0,
    disable: bool = False,
    leave: bool = True,
) -> tqdm:
    """A tqdm bar over ``items`` (or ``total`` of them, advanced with ``update``): ``desc: 3/10 videos,
    42.1 s/video, 04:55 left`` (and any ``set_postfix`` after it), the speed averaged over this run (``initial``
    items were done before it and do not count in it). Use it inside :func:`log_above_bars` so that log lines
    do not break it."""
    return tqdm(
        items,
        total=total,
        initial=initial,
        unit=unit,
        desc=desc,
        smoothing=0,  # the average over the run, not the last items
        disable=disable,
        leave=leave,
        dynamic_ncols=True,
        bar_format=f"{{desc}}: {{percentage:3.0f}}%|{{bar:{BAR_WIDTH}}}| {{n_fmt}}/{{total_fmt}} {{unit}}s, "
        "{rate_inv_fmt}, {remaining} left{postfix}",
    )


log_above_bars = logging_redirect_tqdm
"""Context manager: while it is open, log lines print above the bars instead of through them."""
