"""Exact resume through inference.py itself (issue 27), with real signals on the tiny pack: a stopped render,
rerun, finishes the video an uninterrupted render gives (decoded frames and sound equal); a changed job starts
over and says why; the live playlist plays the frames made so far; a run into the same folder leaves a stopped
render's progress alone, and a second run into its output is refused while it holds it.

Each way of stopping is one behaviour, run once: one render is stopped four times in a row (``kill -9`` before
any memory snapshot, so the next run replays every clip's memory update; SIGHUP, which saves the memory on the
way out; SIGTERM, the same from a resumed memory; ``kill -9`` after a snapshot every clip), each rerun taking
up what the last one left, and the last rerun's video is compared with the uninterrupted render's. The pipeline's
resume itself (every replay length, every snapshot point) is checked in process by tests/test_resume.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from conftest import REPO, decoded_video

from memo.io.job_state import JobState, state_folder
from memo.io.partial import PARTIAL_PATTERN
from memo.io.video import probe_video

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


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def wait_for(process: subprocess.Popen, path: Path) -> None:
    deadline = time.monotonic() + 600
    while not path.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def done_clips(folder: Path) -> int:
    """How many clips the progress folder holds finished (segment and record)."""
    clip = 0
    while (folder / f"clip-{clip:05d}.pt").is_file() and (folder / f"clip-{clip:05d}.ts").is_file():
        clip += 1
    return clip


def partials(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if PARTIAL_PATTERN.match(path.name))


def speech(folder: Path, name: str, seconds: float) -> Path:
    samples, rate = soundfile.read(EXAMPLE_AUDIO, dtype="float32")
    soundfile.write(folder / name, samples[: round(seconds * rate)], rate)
    return folder / name


@pytest.fixture(scope="module")
def talk(tmp_path_factory) -> Path:
    """3.7 s of the example speech: 7 clips of 16 frames at 30 fps (the last one short), enough for the four
    stops below (five clips) with clips left to render after the last."""
    return speech(tmp_path_factory.mktemp("talk"), "talk.wav", 3.7)


@pytest.fixture(scope="module")
def reference(pack, talk, tmp_path_factory) -> tuple[np.ndarray, np.ndarray]:
    """The uninterrupted render's decoded frames and sound. It is rendered into a folder holding the progress of
    another job (seed 7, killed after its first clip): that progress is discarded, with one line saying why, and
    nothing of it is taken up (the stopped-and-resumed render of the default seed must equal this one)."""
    out = tmp_path_factory.mktemp("reference")
    other = start(*command(pack, talk, out, "seed=7"))
    wait_for(other, state_folder(out / NAME) / "clip-00000.pt")
    other.kill()
    other.communicate(timeout=120)
    done = run(*command(pack, talk, out))
    assert done.returncode == 0, done.stderr
    assert "discarded: seed differs (42, was 7); starting over" in done.stderr, done.stderr
    assert "resuming" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == [NAME]  # the progress folder went with publishing
    return decoded_video(out / NAME)


def stop_after_next_clip(process: subprocess.Popen, folder: Path, stop: int, before=None, clips: int = 1) -> str:
    """Wait until ``process`` has finished ``clips`` clips of this run, send ``stop`` (after calling ``before``
    with the process frozen, if given) and return its log, checked: the signal's exit status, no traceback, no
    video and no partial file beside it, and for a handled signal the one line saying where the progress is."""
    wait_for(process, folder / f"clip-{done_clips(folder) + clips - 1:05d}.pt")
    if before is not None:
        process.send_signal(signal.SIGSTOP)
        try:
            before()
        finally:
            process.send_signal(stop)
            process.send_signal(signal.SIGCONT)
    else:
        process.send_signal(stop)
    _, log = process.communicate(timeout=300)
    assert process.returncode == (128 + stop if stop != signal.SIGKILL else -stop), log
    assert "Traceback" not in log and not (folder.parent / NAME).exists(), log
    assert partials(folder.parent) == []  # the mp4 is only written (remuxed) once every clip is done
    if stop != signal.SIGKILL:
        name = signal.Signals(stop).name
        assert f"stopped by {name}; no output was written; the progress is kept in {folder}" in log, log
    return log


def memory_clip(folder: Path) -> int:
    """The clip through which the saved temporal memory holds the past frames; -1 when none is saved."""
    return JobState(folder.parent / NAME, {}).load_memory()[0]


def assert_resumed(log: str) -> None:
    assert "resuming at 00:0" in log and "of rendering kept" in log, log


def test_a_render_stopped_every_way_resumes_to_the_same_video(pack, talk, reference, tmp_path):
    out = tmp_path / "out"
    folder = state_folder(out / NAME)

    # kill -9 after two clips, before any snapshot (every 10 minutes by default): the next run replays both
    # clips' memory updates
    stop_after_next_clip(start(*command(pack, talk, out)), folder, signal.SIGKILL, clips=2)
    assert memory_clip(folder) == -1 and done_clips(folder) >= 2

    # SIGHUP, sent while the run is frozen: meanwhile the live playlist plays the video so far (at least the two
    # clips the killed run left, listed when this run started), a short render into the same folder leaves this
    # one's progress alone, and a run into this one's output is refused while this one holds it
    def meanwhile() -> None:
        with av.open(str(folder / "live.m3u8"), options={"live_start_index": "0"}) as playlist:
            seen = np.stack([frame.to_ndarray(format="rgb24") for frame in playlist.decode(video=0)])
        assert len(seen) >= 2 * 16 and np.array_equal(seen, reference[0][: len(seen)])
        short = run(*command(pack, speech(tmp_path, "short.wav", 0.4), out))
        assert short.returncode == 0 and "removed" not in short.stderr, short.stderr
        assert probe_video(out / "portrait_short.mp4").num_frames == 12 and done_clips(folder) >= 3
        twin = run(*command(pack, talk, out))
        assert twin.returncode == 2 and f"Another run is rendering {out / NAME}" in twin.stderr, twin.stderr

    log = stop_after_next_clip(start(*command(pack, talk, out)), folder, signal.SIGHUP, before=meanwhile)
    assert_resumed(log)

    # SIGTERM: the run takes up what SIGHUP left (the memory it saved on the way out, unless the signal came
    # during a clip's memory update, when none is whole: then the update is replayed)
    log = stop_after_next_clip(start(*command(pack, talk, out)), folder, signal.SIGTERM)
    assert_resumed(log)

    # kill -9 with a snapshot after every clip (a job-neutral setting: the progress is still this job's), once the
    # second clip of the run is done: the first one's snapshot is saved, the second's perhaps not (then replayed)
    first = done_clips(folder)
    snapshots = start(*command(pack, talk, out, "resume_snapshot_minutes=0"))
    log = stop_after_next_clip(snapshots, folder, signal.SIGKILL, clips=2)
    assert_resumed(log)
    assert memory_clip(folder) >= first

    again = run(*command(pack, talk, out))
    assert again.returncode == 0, again.stderr
    assert_resumed(again.stderr)
    frames, sound = decoded_video(out / NAME)
    assert frames.shape == reference[0].shape and np.array_equal(frames, reference[0])
    assert np.array_equal(sound, reference[1])
    assert sorted(os.listdir(out)) == sorted([NAME, "portrait_short.mp4"])
