"""Resuming as a hostile user would meet it (issue 27), through inference.py on the tiny pack, in one chain of
runs of one job that ends in the uninterrupted video: another job's progress is discarded with one line naming the
setting that differs; a setting that changes no frame keeps the progress; a memory snapshot that cannot be written
(the file system refuses it, as a full disk does) leaves the render going with one warning; ``kill -9`` just after
the last clip, before the mp4 is assembled, leaves a rerun only the remux to do."""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import REPO, decoded_video

from memo.io.job_state import state_folder

EXAMPLE_IMAGE = REPO / "assets" / "examples" / "portrait.jpg"
SETTINGS = ("inference_steps=1", "vocal_separation=false", "emotion=neutral")
NAME = "portrait_talk.mp4"
SNAPSHOT_LIMIT = 1024**2
"""Bytes a file may have in the run whose snapshots fail: the tiny pack's memory snapshot is about 2 MB, a clip's
segment and record about 40 kB and 25 kB."""

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and limits")]


def command(pack: Path, audio: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "inference.py"), "--config", str(pack / "inference.yaml"), "--input_image",
            str(EXAMPLE_IMAGE), "--input_audio", str(audio), "--output_dir", str(out), *SETTINGS, *extra]  # fmt: skip


def files_up_to(limit: int):
    """For ``preexec_fn``: writes past ``limit`` bytes in a file fail with EFBIG (SIGXFSZ ignored), as on a
    full disk the write of the largest file fails first."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def stop_at(args: list[str], path: Path, stop: signal.Signals, preexec=None) -> tuple[int, str]:
    """Run ``args`` until ``path`` appears, then send ``stop``; returns the exit status and the log."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               preexec_fn=preexec)  # fmt: skip
    deadline = time.monotonic() + 600
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
        time.sleep(0.02)
    process.send_signal(stop)
    _, log = process.communicate(timeout=300)
    assert "Traceback" not in log, log
    return process.returncode, log


def test_a_hostile_chain_of_stops_and_reruns_ends_in_the_uninterrupted_video(pack, tmp_path):
    samples, rate = soundfile.read(REPO / "assets" / "examples" / "speech.wav", dtype="float32")
    audio = tmp_path / "talk.wav"
    soundfile.write(audio, samples[: round(2.2 * rate)], rate)  # 5 clips of 16 frames at 30 fps
    whole = subprocess.run(command(pack, audio, tmp_path / "whole"), capture_output=True, text=True, cwd=REPO)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "out"
    folder = state_folder(out / NAME)
    # 1. Another job's progress (a different guidance scale), killed after two clips.
    status, _ = stop_at(command(pack, audio, out, "cfg_scale=2.5"), folder / "clip-00001.pt", signal.SIGKILL)
    assert status == -signal.SIGKILL
    # 2. This job discards it, naming the setting; its snapshots (every clip) fail with one warning each and the
    #    render goes on; SIGTERM after three clips: the snapshot on the way out fails too, the clips are kept.
    status, log = stop_at(
        command(pack, audio, out, "resume_snapshot_minutes=0"),
        folder / "clip-00002.pt",
        signal.SIGTERM,
        files_up_to(SNAPSHOT_LIMIT),
    )
    assert status == 143, log
    discarded = [line for line in log.splitlines() if "discarded" in line]
    assert len(discarded) == 1 and "cfg_scale differs (3.5, was 2.5); starting over" in discarded[0], log
    warnings = [line for line in log.splitlines() if "the memory snapshot was not written" in line]
    assert len(warnings) >= 2 and "the render goes on" in warnings[0], log
    assert "the progress is kept in" in log.splitlines()[-1] and not (folder / "memory.pt").exists(), log
    # 3. A setting that changes no frame (the snapshot interval) keeps the progress; kill -9 once the last clip is
    #    done, as the mp4 is assembled (or just before, or after: the remux of 5 tiny clips is quick).
    status, log = stop_at(
        command(pack, audio, out, "resume_snapshot_minutes=5"), folder / "clip-00004.pt", signal.SIGKILL
    )
    assert log.count("memo: resuming at 00:0") == 1 and "discarded" not in log, log
    if (out / NAME).exists():  # killed after publishing: the video is whole; at most the clips' small files left
        assert not (folder / "memory.pt").exists()
        shutil.rmtree(folder, ignore_errors=True)
    else:  # 4. The rerun has only the mp4 to assemble.
        again = subprocess.run(command(pack, audio, out), capture_output=True, text=True, cwd=REPO)
        assert again.returncode == 0, again.stderr
        assert "memo: generate:" not in again.stderr and "discarded" not in again.stderr, again.stderr
    frames, sound = decoded_video(out / NAME)
    expected_frames, expected_sound = decoded_video(tmp_path / "whole" / NAME)
    assert np.array_equal(frames, expected_frames) and np.array_equal(sound, expected_sound)
    assert [path.name for path in out.iterdir()] == [NAME]
