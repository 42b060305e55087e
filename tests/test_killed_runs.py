"""Runs that are stopped: SIGTERM and SIGHUP act like Ctrl-C (the partial output is removed, exit 128 + the
signal, one line), and what ``kill -9`` leaves behind is removed by the next run into that folder, never the
partial of a job still running (memo.io.partial, used by every writer of the project).

The fast tests drive the mechanism with real processes (a child holding a partial, killed or not); the e2e
test does it with the batch runner on the tiny pack. ``inference.py`` itself, stopped by SIGTERM, SIGHUP and
``kill -9`` (with a second run into the same folder meanwhile, and one into the same output refused), is
tests/test_resume_e2e.py's, which also resumes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import REPO

from memo.io.job_state import state_folder
from memo.io.partial import PARTIAL_PATTERN, Partial, remove_abandoned, write_atomically
from memo.io.video import probe_video
from memo.io.video_writer import VideoWriter

EXAMPLE_IMAGE = REPO / "assets" / "examples" / "portrait.jpg"
EXAMPLE_AUDIO = REPO / "assets" / "examples" / "speech.wav"
FAST = ("inference_steps=1", "cfg_scale=1", "vocal_separation=false", "emotion=neutral")

HOLDER = textwrap.dedent(
    """
    import sys, time
    from memo.apps.cli import report_stop
    from memo.errors import stop_on_signals
    from memo.io.partial import Partial
    target, directory = sys.argv[1], sys.argv[2] == "dir"
    try:
        with stop_on_signals(), Partial(target, directory=directory) as partial:
            if not directory:
                partial.path.write_bytes(b"half a file")
            print(partial.path, flush=True)
            time.sleep(120)
    except KeyboardInterrupt as stop:
        sys.exit(report_stop(stop, "the partial is removed."))
    """
)


def hold(target: Path, directory: bool = False) -> tuple[subprocess.Popen, Path]:
    """A real process holding a partial for ``target`` (as a render in progress does); returns it and the path."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(target), "dir" if directory else "file"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline().strip()
    assert line, process.stderr.read()
    return process, Path(line)


def partials(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if PARTIAL_PATTERN.match(path.name))


@pytest.mark.parametrize("directory", [False, True], ids=["file", "folder"])
def test_the_partial_of_a_killed_process_is_removed_and_a_running_ones_kept(tmp_path, directory):
    killed, dead_partial = hold(tmp_path / "a.mp4", directory)
    running, live_partial = hold(tmp_path / "b.mp4", directory)
    try:
        killed.kill()
        killed.wait(timeout=30)
        assert dead_partial.exists() and live_partial.exists()  # kill -9: no handler ran
        (tmp_path / ".notes.txt").write_text("not a partial")
        assert remove_abandoned(tmp_path) == [dead_partial]
        assert partials(tmp_path) == [live_partial.name] and (tmp_path / ".notes.txt").exists()
        with Partial(tmp_path / "c.txt") as own:  # a new writer in the folder cleans up too, and keeps b's
            assert partials(tmp_path) == sorted([live_partial.name, own.path.name])
    finally:
        running.kill()
        running.wait(timeout=30)
    assert remove_abandoned(tmp_path) == [live_partial] and partials(tmp_path) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_handled_signal_removes_the_partial_and_exits_with_its_status(tmp_path, signum):
    process, partial = hold(tmp_path / "a.mp4")
    process.send_signal(signum)
    assert process.wait(timeout=30) == 128 + signum, process.stderr.read()
    assert not partial.exists() and partials(tmp_path) == []


def test_publish_replaces_atomically_and_a_failure_leaves_nothing(tmp_path):
    target = tmp_path / "summary.json"
    write_atomically(target, json.dumps({"done": 1}))
    with pytest.raises(RuntimeError), Partial(target) as partial:
        partial.path.write_text("half")
        raise RuntimeError("the writer failed")
    assert json.loads(target.read_text()) == {"done": 1} and partials(tmp_path) == []
    folder = tmp_path / "checkpoint-2"
    for content in ("first", "second"):  # a checkpoint saved again at the same step replaces the old one
        with Partial(folder, directory=True) as partial:
            (partial.path / "weights").write_text(content)
            partial.publish()
    assert (folder / "weights").read_text() == "second" and partials(tmp_path) == []
    with Partial(tmp_path / "other.json") as partial:
        (tmp_path / "other.json").write_text("written by someone else meanwhile")
        with pytest.raises(FileExistsError):
            partial.publish(replace=False)
    assert partials(tmp_path) == []


def test_video_writer_and_prepared_store_clean_up_after_killed_runs(tmp_path):
    from memo.data.store import PreparedStore

    killed, left = hold(tmp_path / "talk.mp4")
    killed.kill()
    killed.wait(timeout=30)
    with VideoWriter(tmp_path / "other.mp4", fps=25, width=16, height=16) as writer:
        assert not left.exists()  # removed when the writer started, before the first frame
        writer.write(np.zeros((2, 16, 16, 3), np.uint8))
    assert probe_video(tmp_path / "other.mp4").num_frames == 2

    store = tmp_path / "prepared"
    (store / "audio_emb").mkdir(parents=True)
    killed, left = hold(store / "audio_emb" / "a.safetensors")
    running, kept = hold(store / "audio_emb" / "b.safetensors")  # another shard still at work
    try:
        killed.kill()
        killed.wait(timeout=30)
        PreparedStore(store).open()
        assert not left.exists() and kept.exists()
    finally:
        running.kill()
        running.wait(timeout=30)


# -- through inference.py ---------------------------------------------------------------------------


def wait_for_partial(process: subprocess.Popen, folder: Path, name: str) -> Path:
    """Wait until the render of ``name`` into ``folder`` has finished its first clip; returns its progress folder
    (memo.io.job_state: the video is made there, segment by segment, and remuxed onto ``name`` at the end)."""
    progress = state_folder(folder / name)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if (progress / "clip-00000.pt").exists():
            return progress
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.1)
    raise AssertionError(f"no finished clip of {name} appeared in {progress}")


def speech(folder: Path, name: str, seconds: float) -> Path:
    samples, rate = soundfile.read(EXAMPLE_AUDIO, dtype="float32")
    soundfile.write(folder / name, samples[: round(seconds * rate)], rate)
    return folder / name


@pytest.mark.e2e
def test_batch_terminated_mid_job_resumes_it(pack, tmp_path):
    """The batch runner had no handler at all (a traceback on Ctrl-C); now SIGTERM is one line, exit 143, and
    the job being rendered keeps its progress, which a rerun takes up (memo.io.job_state)."""
    speech(tmp_path, "talk.wav", 3.0)
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(f"image,audio\n{EXAMPLE_IMAGE},talk.wav\n")
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "scripts" / "batch_inference.py"), "--manifest", str(manifest)]
    command += ["--output_dir", str(out), "--config", str(pack / "inference.yaml"), *FAST]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    progress = wait_for_partial(process, out, "portrait_talk.mp4")
    process.send_signal(signal.SIGTERM)
    _, log = process.communicate(timeout=120)
    assert process.returncode == 143, log
    assert "stopped by SIGTERM; finished videos are kept" in log, log
    assert "Traceback" not in log and os.listdir(out) == [progress.name]
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert again.returncode == 0, again.stderr
    assert "resuming at 00:0" in again.stderr, again.stderr
    assert probe_video(out / "portrait_talk.mp4").num_frames == 90 and not progress.exists()
