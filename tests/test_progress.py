"""The progress text of a render and of a list of jobs: video time done / total, seconds per frame over finished
clips, time left; a resumed render counts from where it stands. A fake clock drives the times."""

from __future__ import annotations

import pytest

from memo.progress import VideoProgress, clock_text, duration_text, work_bar


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_times_read_as_a_player_and_a_person_say_them():
    assert clock_text(0) == "00:00.0"
    assert clock_text(42.04) == "00:42.0"
    assert clock_text(190) == "03:10.0"
    assert clock_text(59.96) == "01:00.0"  # rounding carries into the minutes
    assert clock_text(3 * 3600 + 5.5) == "3:00:05.5"
    assert duration_text(0.2) == "1 s"
    assert duration_text(42) == "42 s"
    assert duration_text(270) == "4.5 min"
    assert duration_text(2 * 3600 + 600) == "2 h 10 min"


def test_video_time_speed_and_time_left_over_finished_clips():
    clock = Clock()
    # 100 frames at 25 fps (4 s of video), clips of 16 frames, 4 steps each
    meter = VideoProgress(100, 25, 16, 4, bar=False, clock=clock)
    assert meter.text() == "clip 1/7, step 1/4: 00:00.0 / 00:04.0 video, s/frame after the first clip, " + (
        "estimating time left"
    )
    clock.now += 8
    meter.step(1)  # half of the first clip in 8 s: 8 frames in 8 s, 92 frames left
    assert meter.fraction == pytest.approx(0.08)
    assert meter.seconds_left() == pytest.approx(92.0)
    assert meter.text().endswith("00:00.3 / 00:04.0 video, s/frame after the first clip, 1.5 min left")
    clock.now += 8
    meter.clip_done(16)  # 16 s for 16 frames
    clock.now += 100  # a slow step does not count until its clip is finished
    meter.step(0)
    assert meter.seconds_per_frame == pytest.approx(1.0)
    assert meter.text() == "clip 2/7, step 2/4: 00:00.8 / 00:04.0 video, 1.00 s/frame, 1.3 min left"
    meter.clip_done(16)  # 100 s more for 16 frames: (16 + 100) / 32
    assert meter.seconds_per_frame == pytest.approx(116 / 32)
    for _ in range(4):
        meter.clip_done(16)
    meter.clip_done(4)  # the last clip shows only 4 of its frames
    assert meter.fraction == 1
    assert meter.text() == "7 clips: 00:04.0 / 00:04.0 video, 1.16 s/frame, done"


def test_a_resumed_render_starts_where_it_stands_and_times_only_this_run():
    clock = Clock()
    meter = VideoProgress(300, 30, 15, 2, start_frame=150, bar=False, clock=clock)
    assert meter.fraction == 0.5
    assert meter.text().startswith("clip 11/20, step 1/2: 00:05.0 / 00:10.0 video, s/frame after the first clip")
    clock.now += 3
    meter.clip_done(15)  # this run: 3 s for 15 frames, whatever the earlier run took
    assert meter.seconds_per_frame == pytest.approx(0.2)
    assert meter.seconds_left() == pytest.approx(135 * 0.2)
    assert "00:05.5 / 00:10.0 video, 0.20 s/frame, 27 s left" in meter.text()
    with pytest.raises(ValueError, match="start_frame must be within 0..300"):
        VideoProgress(300, 30, 15, 2, start_frame=301, bar=False)


def test_the_bar_shows_the_same_text(capsys):
    meter = VideoProgress(32, 16, 16, 1, bar=True, clock=Clock())
    meter.clip_done(16)
    meter.close()
    err = capsys.readouterr().err
    assert " 50%|" in err and "clip 2/2, step 1/1: 00:01.0 / 00:02.0 video, 0.00 s/frame" in err


def test_work_bar_counts_earlier_items_as_done_but_not_in_the_speed(capsys):
    bar = work_bar(total=10, initial=4, unit="job", desc="batch")
    bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "batch:  50%" in err and "5/10 jobs" in err
    assert bar.format_dict["initial"] == 4
