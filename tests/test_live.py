"""The live segments of a render (memo/apps/live.py): >= 2 s pieces of the video with their slice of the sound,
handed out as they are written, which together are the whole video."""

from __future__ import annotations

from fractions import Fraction
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


def write_ts(path: Path, first_frame: int, frames: int, fps: int = 30) -> None:
    """An H.264 MPEG-TS segment whose timestamps go on from frame ``first_frame``, as the segment store writes."""
    import av

    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for n in range(first_frame, first_frame + frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), n * 5 % 256, np.uint8), format="rgb24")
            frame.pts = n
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_per_clip_store_segments_are_joined_into_two_second_pieces_without_encoding(tmp_path):
    from memo.apps.live import SegmentGroups

    seen: list[tuple[Path, int, float, float]] = []
    groups = SegmentGroups(tmp_path, lambda *piece: seen.append(piece), min_seconds=1.0)
    for clip in range(5):  # clips of 16 frames at 30 fps
        write_ts(tmp_path / f"clip_{clip}.ts", clip * 16, 16)
        groups.add(tmp_path / f"clip_{clip}.ts", clip, clip * 16 / 30, 16 / 30)
    groups.finish()
    assert [(index, round(start * 30), round(length * 30)) for _, index, start, length in seen] == [
        (0, 0, 32),
        (1, 32, 32),
        (2, 64, 16),
    ]
    assert seen[0][0].read_bytes() == (tmp_path / "clip_0.ts").read_bytes() + (tmp_path / "clip_1.ts").read_bytes()
    assert probe_video(seen[1][0]).num_frames == 32
