"""The live segments of a render (memo/apps/live.py): >= 2 s pieces of the video with their slice of the sound,
handed out as they are written, which together are the whole video."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from memo.io.video import probe_video


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
