"""Exact resume through inference.py itself (issue 27), with real signals on the tiny pack: a stopped render,
rerun, finishes the video an uninterrupted render gives (decoded frames and sound equal); a changed job starts
over and says why; the live playlist plays the frames made so far. One uninterrupted render is shared."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from conftest import REPO

from memo.io.job_state import state_folder

EXAMPLE_IMAGE = REPO / "assets" / "examples" / "portrait.jpg"
EXAMPLE_AUDIO = REPO / "assets" / "examples" / "speech.wav"
FAST = ("inference_steps=2", "cfg_scale=3.5", "vocal_separation=false", "emotion=neutral")
NAME = "portrait_talk.mp4"

pytestmark = pytest.mark.e2e


def command(pack: Path, audio: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "inference.py"),
        "--config",
        str(pack / "inference.yaml"),
        "--input_image",
        str(EXAMPLE_IMAGE),
        "--input_audio",
        str(audio),
        "--output_dir",
        str(output_dir),
        *FAST,
        *extra,
    ]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=REPO, timeout=900)


def decoded(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A video's frames (n, H, W, 3) and its sound's samples (channels, n), decoded."""
    with av.open(str(path)) as container:
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    with av.open(str(path)) as container:
        sound = np.concatenate([frame.to_ndarray() for frame in container.decode(audio=0)], axis=1)
    return frames, sound


def wait_for(process: subprocess.Popen, path: Path) -> None:
    deadline = time.monotonic() + 600
    while not path.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def talk(tmp_path_factory) -> Path:
    """2.2 s of the example speech: 5 clips of 16 frames at 30 fps."""
    folder = tmp_path_factory.mktemp("talk")
    samples, rate = soundfile.read(EXAMPLE_AUDIO, dtype="float32")
    soundfile.write(folder / "talk.wav", samples[: round(2.2 * rate)], rate)
    return folder / "talk.wav"


@pytest.fixture(scope="module")
def reference(pack, talk, tmp_path_factory) -> tuple[np.ndarray, np.ndarray]:
    """The uninterrupted render's decoded frames and sound."""
    out = tmp_path_factory.mktemp("reference")
    done = run(*command(pack, talk, out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [NAME]  # the progress folder went with publishing
    return decoded(out / NAME)


def assert_same_video(path: Path, reference: tuple[np.ndarray, np.ndarray]) -> None:
    frames, sound = decoded(path)
    assert frames.shape == reference[0].shape and np.array_equal(frames, reference[0])
    assert np.array_equal(sound, reference[1])


@pytest.mark.parametrize(
    ("stop", "when", "extra"),
    [
        (signal.SIGTERM, "clip-00001.pt", ()),  # between clips: the memory is saved on the way out
        (signal.SIGHUP, "clip-00000.ts", ()),  # during the second clip
        (signal.SIGKILL, "clip-00002.pt", ("resume_snapshot_minutes=0",)),  # snapshots every clip, then a replay
        (signal.SIGKILL, "clip-00002.pt", ()),  # no snapshot: every clip's memory update replayed
    ],
    ids=["sigterm-between-clips", "sighup-mid-clip", "kill9-snapshots", "kill9-replay-all"],
)
def test_a_stopped_render_resumes_to_the_same_video(pack, talk, reference, tmp_path, stop, when, extra):
    out = tmp_path / "out"
    process = subprocess.Popen(
        command(pack, talk, out, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    wait_for(process, state_folder(out / NAME) / when)
    process.send_signal(stop)
    _, log = process.communicate(timeout=300)
    assert process.returncode == (128 + stop if stop != signal.SIGKILL else -stop), log
    assert "Traceback" not in log and not (out / NAME).exists()
    if stop != signal.SIGKILL:
        assert f"the progress is kept in {state_folder(out / NAME)}" in log, log
    again = run(*command(pack, talk, out, *extra))
    assert again.returncode == 0, again.stderr
    assert "resuming at 00:0" in again.stderr and "of rendering kept" in again.stderr, again.stderr
    assert_same_video(out / NAME, reference)
    assert sorted(p.name for p in out.iterdir()) == [NAME]


def test_the_playlist_plays_the_frames_so_far_and_a_changed_job_starts_over(pack, talk, reference, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(
        command(pack, talk, out, "seed=7"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    folder = state_folder(out / NAME)
    wait_for(process, folder / "clip-00001.pt")
    process.send_signal(signal.SIGSTOP)
    try:
        with av.open(str(folder / "live.m3u8"), options={"live_start_index": "0"}) as playlist:
            seen = np.stack([frame.to_ndarray(format="rgb24") for frame in playlist.decode(video=0)])
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    assert len(seen) >= 32
    # seed=7's progress is another job's: the default seed's render discards it, says why, and leaves nothing of it
    again = run(*command(pack, talk, out))
    assert again.returncode == 0, again.stderr
    assert "discarded: seed differs (42, was 7); starting over" in again.stderr, again.stderr
    assert "resuming" not in again.stderr
    assert_same_video(out / NAME, reference)
    assert sorted(p.name for p in out.iterdir()) == [NAME]
    # what the playlist showed is seed 7's video: a render of it from scratch starts with those frames
    seven = run(*command(pack, talk, tmp_path / "seven", "seed=7", "--restart"))
    assert seven.returncode == 0, seven.stderr
    frames, _ = decoded(tmp_path / "seven" / NAME)
    assert np.array_equal(seen, frames[: len(seen)])
