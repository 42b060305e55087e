"""Turn talking-head test videos into an evaluation set: portraits, audio, reference clips and a batch manifest.

For each video ``NAME.*`` of the input folder, ``OUT`` gets ``portraits/NAME.png`` (the first frame),
``audio/NAME.wav`` (its sound, 16 kHz mono), ``reference/NAME.mp4`` (the clip, centre-cropped square, at the
frame rate MEMO renders, with its sound) and ``reference/NAME.png`` (the portrait again, which CSIM compares
with), and ``manifest.csv`` lists every portrait/audio pair for ``scripts/batch_inference.py``. A video that
cannot be used is one line; the others are still written.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import cv2
import numpy as np
import soundfile
from PIL import Image

from memo.errors import UserError, as_path
from memo.evaluation.metrics import SYNC_SAMPLE_RATE, VideoReadError, read_video, resample_frames
from memo.evaluation.run import VIDEO_SUFFIXES
from memo.io.audio import audio_from_samples
from memo.io.video_writer import VideoWriter

DEFAULT_FPS = 30.0
"""MEMO's output frame rate (the published inference config's ``fps``), which the reference clips are set to."""
DEFAULT_SIZE = 512
"""Side of the square reference clips and portraits, MEMO's default resolution."""


def square(frames: np.ndarray, size: int) -> np.ndarray:
    """(T, size, size, 3): the centred square of each (T, H, W, 3) frame, resized (area filter)."""
    height, width = frames.shape[1:3]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    cropped = frames[:, top : top + side, left : left + side]
    return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in cropped])


def make_eval_set(
    videos: Path, out: Path, fps: float = DEFAULT_FPS, size: int = DEFAULT_SIZE, seconds: float | None = None
) -> tuple[int, list[str]]:
    """Write the set (see the module docstring); returns the number of videos written and one ``error:`` line
    per video left out. Raises UserError when ``videos`` is not a folder of videos or ``out`` already has a set."""
    if not videos.is_dir():
        raise UserError(f"{videos} is not a folder; give the folder of talking-head videos.")
    sources = sorted(p for p in videos.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not sources:
        raise UserError(f"{videos} holds no videos ({', '.join(VIDEO_SUFFIXES)}).")
    manifest = out / "manifest.csv"
    if manifest.exists():
        raise UserError(f"{manifest} already exists; choose an empty output folder.")
    rows, problems = [], []
    for source in sources:
        name = source.stem
        try:
            video = read_video(source)
        except VideoReadError as error:
            problems.append(f"error: {source.name}: {error} Left out.")
            continue
        if video.audio is None:
            problems.append(f"error: {source.name}: has no sound track, which the set needs as MEMO's input. Left out.")
            continue
        frames = square(resample_frames(video.frames, video.fps, fps), size)
        audio = video.audio
        if seconds is not None:
            frames = frames[: int(round(seconds * fps))]
            audio = audio[: int(round(seconds * SYNC_SAMPLE_RATE))]
        audio = audio[: int(round(len(frames) / fps * SYNC_SAMPLE_RATE))]
        for folder in ("portraits", "audio", "reference"):
            (out / folder).mkdir(parents=True, exist_ok=True)
        portrait = Image.fromarray(frames[0])
        portrait.save(out / "portraits" / f"{name}.png")
        portrait.save(out / "reference" / f"{name}.png")
        soundfile.write(out / "audio" / f"{name}.wav", audio, SYNC_SAMPLE_RATE, subtype="PCM_16")
        track = audio_from_samples(audio, SYNC_SAMPLE_RATE, name=f"the sound of {source.name}")
        with VideoWriter(out / "reference" / f"{name}.mp4", fps, size, size, audio=track, overwrite=True) as writer:
            writer.write(frames)
        rows.append({"image": f"portraits/{name}.png", "audio": f"audio/{name}.wav", "output": f"{name}.mp4"})
    if rows:
        with open(manifest, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["image", "audio", "output"])
            writer.writeheader()
            writer.writerows(rows)
    return len(rows), problems


def main(argv: list[str] | None = None) -> int:
    """The ``scripts/make_eval_set.py`` command; exit status 2 when any video was left out or none was usable."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("videos", help="folder of talking-head test videos (VoxCeleb2, HDTF or your own)")
    parser.add_argument("out", help="folder to write the set into")
    parser.add_argument("--fps", type=float, default=DEFAULT_FPS, help="frame rate of the reference clips (MEMO's)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="side in pixels of the square clips")
    parser.add_argument("--seconds", type=float, help="keep at most this many seconds of each video")
    args = parser.parse_args(argv)
    try:
        count, problems = make_eval_set(
            as_path(args.videos, "VIDEOS_DIR"), as_path(args.out, "OUT_DIR"), args.fps, args.size, args.seconds
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in problems:
        print(line, file=sys.stderr)
    out = Path(args.out)
    if count:
        print(
            f"Wrote {count} videos to {out}. Render them with: python scripts/batch_inference.py --manifest "
            f"{out / 'manifest.csv'} --output_dir GENERATED; then score them with: python scripts/evaluate.py "
            f"--generated GENERATED --reference {out / 'reference'} --audio {out / 'audio'}"
        )
    return 2 if problems or not count else 0
