"""scripts/batch_inference.py on the tiny model pack: two CPU processes under ``accelerate launch`` share a
manifest, a bad job is reported while the others render, a rerun skips finished outputs, and a bad manifest is
refused before any work.

One process runs in this process (``memo.apps.batch.main``); two under ``accelerate launch`` are the ``e2e`` tier.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import REPO, decoded_video, run_main
from PIL import Image

import memo.apps.batch
from memo.apps.batch import main as batch_main
from memo.io.job_state import state_folder
from memo.io.video import probe_video

SCRIPT = REPO / "scripts" / "batch_inference.py"
CLIP_SECONDS = 1.0


@pytest.fixture
def inputs(tmp_path) -> Path:
    """A folder with the example portrait, 1 s of the example speech and a faceless grey image."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    shutil.copy(REPO / "assets" / "examples" / "portrait.jpg", folder / "portrait.jpg")
    audio, rate = soundfile.read(REPO / "assets" / "examples" / "speech.wav", dtype="float32")
    soundfile.write(folder / "speech.wav", audio[: int(CLIP_SECONDS * rate)], rate)
    Image.new("RGB", (256, 256), (128, 128, 128)).save(folder / "grey.png")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def batch_command(pack: Path, manifest: Path, output_dir: Path, processes: int = 1) -> list[str]:
    """The batch program's command line, as ``processes`` CPU processes."""
    arguments = ["--manifest", str(manifest), "--output_dir", str(output_dir)]
    arguments += ["--config", str(pack / "inference.yaml"), "inference_steps=1"]
    launcher = []
    if processes > 1:
        launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
        launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        launcher += ["--main_process_port", str(free_port())]
    return [sys.executable, *launcher, str(SCRIPT), *arguments]


BATCH_ENV = {**os.environ, "ACCELERATE_USE_CPU": "true"}


def batch(pack: Path, manifest: Path, output_dir: Path, processes: int = 0) -> subprocess.CompletedProcess:
    """The batch program: in this process (``processes=0``), or started as ``processes`` CPU processes."""
    if processes == 0:
        return run_main(batch_main, batch_command(pack, manifest, output_dir)[2:], cwd=REPO)
    command = batch_command(pack, manifest, output_dir, processes)
    return subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO, env=BATCH_ENV, timeout=900)


@pytest.mark.parametrize("processes", [0, pytest.param(2, marks=pytest.mark.e2e)])
def test_processes_share_the_manifest_and_a_rerun_skips_finished_jobs(pack, inputs, tmp_path, processes, monkeypatch):
    manifest = inputs / "jobs.csv"
    manifest.write_text(
        "image,audio,output,emotion,seed,cfg_scale\n"
        "portrait.jpg,speech.wav,happy,happy,1,\n"
        "portrait.jpg,speech.wav,talks/auto.mp4,,2,1\n"
        "grey.png,speech.wav,grey,,,\n"
    )
    out = tmp_path / "out"
    result = batch(pack, manifest, out, processes=processes)
    assert result.returncode == 1, result.stderr  # one job failed
    assert "Traceback" not in result.stdout
    outputs = [out / "happy.mp4", out / "talks" / "auto.mp4"]
    for output in outputs:
        info = probe_video(output)
        assert info.num_frames == math.ceil(CLIP_SECONDS * 30) and info.has_audio
    assert not (out / "grey.mp4").exists()
    summary = json.loads((out / "batch_summary.json").read_text())
    assert summary["processes"] == max(processes, 1)
    assert [job["line"] for job in summary["done"]] == [2, 3]
    if processes == 2:
        assert {job["process"] for job in summary["done"]} == {0, 1}  # line 2 on process 0, line 3 on process 1
    [failed] = summary["failed"]
    assert failed["line"] == 4 and "No face was found" in failed["reason"] and "grey.png" in failed["reason"]
    assert "1 failed" in result.stdout and "No face was found" in result.stdout

    written = {output: output.stat().st_mtime_ns for output in outputs}
    rerun = batch(pack, manifest, out)
    assert rerun.returncode == 1, rerun.stderr
    summary = json.loads((out / "batch_summary.json").read_text())
    assert [job["line"] for job in summary["skipped"]] == [2, 3] and not summary["done"]
    assert [job["line"] for job in summary["failed"]] == [4]
    assert {output: output.stat().st_mtime_ns for output in outputs} == written

    # a manifest whose every output exists loads no model at all
    finished = inputs / "finished.csv"
    finished.write_text("".join(manifest.read_text().splitlines(keepends=True)[:3]))
    monkeypatch.setattr(memo.apps.batch, "MemoGenerator", lambda *_: pytest.fail("the models were loaded"))
    done = batch(pack, finished, out)
    assert done.returncode == 0 and "0 done, 2 skipped, 0 failed (1 process)" in done.stdout, done.stdout


def test_a_bad_manifest_is_refused_before_any_work(pack, inputs, tmp_path):
    manifest = inputs / "jobs.jsonl"
    jobs = [
        {"image": "portrait.jpg", "audio": "speech.wav", "output": "same.mp4"},
        {"image": "portrait.jpg", "audio": "speech.wav", "output": "same", "seed": 3},
        {"image": "portrait.jpg", "audio": "speech.wav", "emotion": "joyful"},
        {"image": "portrait.jpg", "audio": "speech.wav", "colour": "warm"},
        {"image": "portrait.jpg", "audio": "speech.wav", "device": "cuda"},
        {"audio": "speech.wav"},
    ]
    manifest.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    out = tmp_path / "out"
    result = batch(pack, manifest, out)
    assert result.returncode == 2, result.stderr
    for fragment in (
        "lines 1, 2 write the same output",
        "line 3: Invalid settings: emotion must be 'auto' or one of",
        "line 4: column 'colour' is neither a file column nor a setting",
        "line 5: column 'device' chooses the models",
        "line 6: no image path",
    ):
        assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_parallel_guidance_is_refused_by_the_batch_runner(pack, inputs, tmp_path):
    # Each process renders its own videos: a video split over the two processes would leave the second
    # process's videos unrendered (yet counted done) or hang with a single job.
    manifest = inputs / "jobs.csv"
    manifest.write_text("image,audio\nportrait.jpg,speech.wav\n")
    arguments = ["--manifest", str(manifest), "--output_dir", str(tmp_path / "out")]
    result = run_main(batch_main, [*arguments, "--config", str(pack / "inference.yaml"), "parallel=guidance"], cwd=REPO)
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "parallel=guidance splits one video" in line and "Remove parallel=guidance" in line
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_per_job_settings_share_the_loaded_models(pack):
    from memo.generator import MemoGenerator
    from memo.settings.inference import ConfigError, load_config

    generator = MemoGenerator(load_config(pack / "inference.yaml"))
    job = generator.with_settings(resolution=128, emotion="sad", inference_steps=1)
    assert job.pipeline is generator.pipeline and job.conditions is generator.conditions
    assert job.config.size == (128, 128) and job.config.emotion == "sad"
    assert generator.config.size == (64, 64) and generator.config.emotion == "auto"
    assert job.conditions.emotion_encoder is generator.conditions.emotion_encoder  # loaded once for all copies
    with pytest.raises(ConfigError, match="weight_dtype cannot change per call"):
        generator.with_settings(weight_dtype="fp16")
    with pytest.raises(ConfigError, match="multiple of 64"):
        generator.with_settings(resolution=100)


@pytest.mark.e2e
def test_a_stopped_batch_resumes_the_job_it_was_rendering(pack, inputs, tmp_path):
    """Issue 27 for the batch runner: stopped (SIGTERM, then kill -9) during its second job, rerun: the first
    job is skipped, the second goes on from its saved clips (the screen says so), and both videos are the
    uninterrupted batch's, frame for frame, with the same sound."""
    audio, rate = soundfile.read(REPO / "assets" / "examples" / "speech.wav", dtype="float32")
    soundfile.write(inputs / "long.wav", audio[: round(2.2 * rate)], rate)  # 5 clips of 16 frames at 30 fps
    manifest = inputs / "jobs.csv"
    manifest.write_text("image,audio,output\nportrait.jpg,speech.wav,first\nportrait.jpg,long.wav,second\n")
    whole = batch(pack, manifest, tmp_path / "whole", processes=1)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "out"
    command = batch_command(pack, manifest, out)
    folder = state_folder(out / "second.mp4")

    def stopped_at(clip_record: str, stop: signal.Signals) -> str:
        process = subprocess.Popen(command, cwd=REPO, env=BATCH_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)  # fmt: skip
        deadline = time.monotonic() + 600
        while not (folder / clip_record).exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(stop)
        _, log = process.communicate(timeout=120)
        assert process.returncode == (128 + stop if stop != signal.SIGKILL else -stop), log
        assert "Traceback" not in log and not (out / "second.mp4").exists()
        return log

    log = stopped_at("clip-00001.pt", signal.SIGTERM)
    assert "the progress of the one being rendered" in log.splitlines()[-1], log
    first = (out / "first.mp4").stat().st_mtime_ns
    log = stopped_at("clip-00003.pt", signal.SIGKILL)
    assert "first.mp4 exists, skipped" in log and "resuming at 00:0" in log, log
    again = subprocess.run(command, cwd=REPO, env=BATCH_ENV, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert "first.mp4 exists, skipped" in again.stderr and "resuming at 00:0" in again.stderr, again.stderr
    assert "1 done, 1 skipped, 0 failed" in again.stdout, again.stdout
    assert (out / "first.mp4").stat().st_mtime_ns == first
    for name in ("first.mp4", "second.mp4"):
        frames, sound = decoded_video(out / name)
        expected_frames, expected_sound = decoded_video(tmp_path / "whole" / name)
        assert np.array_equal(frames, expected_frames) and np.array_equal(sound, expected_sound), name
    assert sorted(path.name for path in out.iterdir()) == ["batch_summary.json", "first.mp4", "second.mp4"]
