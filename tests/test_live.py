"""The live segments of a render (memo/apps/live.py): >= 2 s pieces of the video with their slice of the sound,
handed out as they are written, which together are the whole video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from memo.apps.live import SegmentTap
from memo.io.audio import DecodedAudio
from memo.io.video import probe_video


def test_clips_gather_into_segments_of_two_seconds_with_their_sound(tmp_path):
    rate, fps = 48000, 30
    seconds = 5 * 16 / fps
    tone = np.sin(np.arange(round(seconds * rate)) / rate * 2 * np.pi * 440).astype(np.float32)[None] * 0.5
    audio = DecodedAudio(tone, rate, "mono", Path("tone.wav"))
    seen: list[tuple[Path, int, float, float]] = []
    tap = SegmentTap(tmp_path, fps, audio, lambda *segment: seen.append(segment))
    for clip in range(5):
        tap.write(torch.full((3, 16, 32, 32), clip / 4))  # clips of 16 frames, ~0.53 s
    assert [index for _, index, _, _ in seen] == [0]  # 4 clips make the first 2 s
    tap.finish()
    assert [(index, round(start * fps), round(length * fps)) for _, index, start, length in seen] == [
        (0, 0, 64),
        (1, 64, 16),
    ]
    for path, _, _, length in seen:
        info = probe_video(path)
        assert info.num_frames == round(length * fps) and info.has_audio and (info.width, info.height) == (32, 32)
    tap.finish()  # nothing left: no empty segment
    assert len(seen) == 2
