"""Guidance-parallel generation on two CPU processes (gloo): the frames of one process bit for bit, the same
video through the real program, a killed process stops the other with one line, misuse is refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import av
import numpy as np
import pytest
import soundfile
from conftest import REPO

from memo.io.video import probe_video
from memo.settings.inference import ConfigError, load_config

IMAGE = REPO / "assets" / "examples" / "portrait.jpg"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_processes(*args: str, launcher: str = "torchrun") -> list[str]:
    if launcher == "accelerate":  # --multi_gpu: on CPUs accelerate would otherwise start one process
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", str(free_port()), *args]  # fmt: skip
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            *args]  # fmt: skip


def speech(tmp_path, seconds: float):
    samples, rate = soundfile.read(REPO / "assets" / "examples" / "speech.wav", dtype="float32")
    path = tmp_path / "speech.wav"
    soundfile.write(path, samples[: int(rate * seconds)], rate)
    return path


def inference(pack, audio, out, *overrides: str) -> list[str]:
    return [str(REPO / "inference.py"), "--config", str(pack / "inference.yaml"), "--input_image", str(IMAGE),
            "--input_audio", str(audio), "--output_dir", str(out), "inference_steps=3", *overrides]  # fmt: skip


def frames_and_sound(path):
    with av.open(str(path)) as container:
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    with av.open(str(path)) as container:
        sound = np.concatenate([frame.to_ndarray() for frame in container.decode(audio=0)], axis=-1)
    return frames, sound


# (offload, steps, guidance_end, deep_cache_interval, solver): exact; speed=fast's settings under offload=model
# (row-chunked feed-forward); group. One launch compares them all: the processes start and join once.
SPLIT_SETTINGS = [("none", 2, 1.0, 1, "euler"), ("model", 4, 0.25, 2, "unipc"), ("group", 2, 1.0, 1, "euler")]


@pytest.mark.e2e
def test_two_processes_compute_the_frames_of_one(tiny_checkpoint):
    settings = [",".join(map(str, setting)) for setting in SPLIT_SETTINGS]
    command = two_processes(str(REPO / "tests" / "parallel_ranks.py"), str(tiny_checkpoint), *settings)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.strip().splitlines() if line.startswith("{")]
    assert [report["offload"] for report in reports] == [setting[0] for setting in SPLIT_SETTINGS], result.stdout
    for (_, steps, guidance_end, _, _), report in zip(SPLIT_SETTINGS, reports):
        assert report["equal"] and report["max_difference"] == 0.0, report
        assert report["memory_halved"], report  # each process holds its half of the temporal memory
        clips, frames_per_clip, latent = 2, 4, 8 * 8  # the test inputs: 64x64, two clips of 4 frames
        batched = sum(1 for i in range(steps) if i < guidance_end * steps or i == 0)
        assert report["steps"] == clips * steps, report  # one collective per step
        # Rank 0 sends its half's prediction in each batched step, (1, 4, frames, 8, 8) float32, nothing else.
        assert report["bytes_sent"] == clips * batched * 4 * frames_per_clip * latent * 4, report


@pytest.mark.e2e
def test_inference_on_two_processes_writes_the_video_of_one(pack, tmp_path):
    """One process's video, then the same from two processes under each launcher (torchrun, accelerate).
    speed=fast (4 steps, 3 of them conditional alone): both kinds of exchange, batched and conditional-only."""
    audio = speech(tmp_path, 1.0)
    settings = ["speed=fast", "inference_steps=10"]
    # As many threads as each launched process has (torch.distributed.run sets 1): CPU kernels split their sums
    # by thread, so the thread count is part of what makes two runs round alike.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *inference(pack, audio, tmp_path / "one", *settings)],
                         capture_output=True, text=True, cwd=REPO, timeout=600, env=env)  # fmt: skip
    assert one.returncode == 0, one.stderr
    expected = probe_video(tmp_path / "one" / "portrait_speech.mp4")
    frames_one, sound_one = frames_and_sound(tmp_path / "one" / "portrait_speech.mp4")
    for launcher in ("torchrun", "accelerate"):
        out = tmp_path / launcher
        command = two_processes(*inference(pack, audio, out, "parallel=guidance", *settings), launcher=launcher)
        two = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
        assert two.returncode == 0, two.stderr[-3000:]
        assert two.stderr.count("memo: output:") == 1, launcher  # rank 0 writes, rank 1 says nothing of it
        assert two.stderr.count("memo: generate:") == 1, launcher
        written = probe_video(out / "portrait_speech.mp4")
        assert written.num_frames == expected.num_frames == 30 and written.fps == expected.fps and written.has_audio
        frames_two, sound_two = frames_and_sound(out / "portrait_speech.mp4")
        assert np.array_equal(frames_one, frames_two) and np.array_equal(sound_one, sound_two), launcher


@pytest.mark.e2e
def test_a_killed_process_stops_the_other_with_one_line(pack, tmp_path):
    audio, out = speech(tmp_path, 8.0), tmp_path / "out"  # 15 clips: long enough to be killed mid-video
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    command = [sys.executable, *inference(pack, audio, out, "parallel=guidance", "inference_steps=4")]
    ranks = [
        subprocess.Popen(
            command,
            cwd=REPO,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in (0, 1)
    ]
    try:
        seen = ""
        while "memo: generate:" not in seen:  # rank 0 logs this line as the video starts
            line = ranks[0].stderr.readline()
            assert line, f"rank 0 ended before generating: {seen}"
            seen += line
        time.sleep(1.0)
        ranks[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, rest = ranks[0].communicate(timeout=60)
        waited = time.monotonic() - killed
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    # The error line follows the progress bar's last, unfinished line.
    errors = [line[line.index("error:") :] for line in rest.replace("\r", "\n").splitlines() if "error:" in line]
    assert ranks[0].returncode == 2 and waited < 20, (waited, rest)
    assert len(errors) == 1 and "rank 1" in errors[0] and "stopped" in errors[0], rest
    assert "Traceback" not in rest
    # No video, no partial file: only the render's progress folder, kept to be resumed (memo.io.job_state).
    assert not out.exists() or [path.name for path in out.iterdir()] == [".portrait_speech.mp4.resume"]


@pytest.mark.e2e
def test_processes_given_different_settings_stop_with_one_line(pack, tmp_path):
    audio, out = speech(tmp_path, 1.0), tmp_path / "out"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, *inference(pack, audio, out, "parallel=guidance", f"cfg_scale={scale}")],
            cwd=REPO,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r, scale in ((0, 3.5), (1, 2.0))
    ]
    try:
        outputs = [rank.communicate(timeout=300)[1] for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    assert [rank.returncode for rank in ranks] == [2, 2], outputs
    errors = [line for line in outputs[0].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cfg_scale=3.5 on rank 0, 2.0 on rank 1" in errors[0], outputs[0]
    assert "error:" not in outputs[1] and "Traceback" not in outputs[0] + outputs[1]
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.e2e
def test_parallel_guidance_in_one_process_is_refused(pack, tmp_path):
    result = subprocess.run([sys.executable, *inference(pack, speech(tmp_path, 1.0), tmp_path, "parallel=guidance")],
                            capture_output=True, text=True, cwd=REPO, timeout=600)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: parallel=guidance needs exactly 2 processes")
    assert result.stderr.count("error:") == 1 and not list(tmp_path.glob("*.mp4"))


def test_parallel_settings_are_validated():
    assert load_config(None, ["parallel=guidance"]).parallel == "guidance"
    with pytest.raises(ConfigError, match="parallel must be one of none, guidance, got 'tensor'"):
        load_config(None, ["parallel=tensor"])
    with pytest.raises(ConfigError, match="cfg_scale=1.0 runs without guidance"):
        load_config(None, ["parallel=guidance", "cfg_scale=1.0"])
    with pytest.raises(ConfigError, match="even num_generated_frames_per_clip"):
        load_config(None, ["parallel=guidance", "num_generated_frames_per_clip=15"])


def start_ranks(command: list[str], extra_env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """The two processes of ``command`` (an inference.py command line), launched as a launcher would (``RANK``,
    ``WORLD_SIZE``...), one thread each as torchrun sets it."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    env.update({"OMP_NUM_THREADS": "1", **(extra_env or {})})
    return [
        subprocess.Popen(
            [sys.executable, *command],
            cwd=REPO,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]


def finish(ranks: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    """Both processes' stderr once they end (killed if they outlive ``timeout``)."""
    try:
        return [rank.communicate(timeout=timeout)[1] for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()


def wait_for_file(ranks: list[subprocess.Popen], path) -> None:
    deadline = time.monotonic() + 600
    while not path.exists():
        assert all(rank.poll() is None for rank in ranks), finish(ranks, 60)
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.e2e
def test_two_processes_resume_a_stopped_render_to_the_video_of_one(pack, tmp_path):
    """Issue 27 on two processes: SIGTERM to both part-way, then kill -9 of rank 1 later, then a rerun while
    another run holds the progress (refused by both at once, one line), then the rerun that finishes: the
    video is the one-process video, frames and sound. Rank 0 owns the progress folder and hands rank 1 the
    resume point; every finished clip's memory update is replayed on both."""
    from memo.io.job_state import JobState, state_folder

    audio = speech(tmp_path, 2.2)  # 5 clips of 16 frames at 30 fps
    settings = ["inference_steps=2", "vocal_separation=false", "emotion=neutral"]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # as each launched process runs
    alone = subprocess.run([sys.executable, *inference(pack, audio, tmp_path / "one", *settings)], cwd=REPO,
                           capture_output=True, text=True, timeout=600, env=one_thread)  # fmt: skip
    assert alone.returncode == 0, alone.stderr
    expected = frames_and_sound(tmp_path / "one" / "portrait_speech.mp4")

    out = tmp_path / "two"
    output, command = out / "portrait_speech.mp4", inference(pack, audio, out, "parallel=guidance", *settings)
    folder = state_folder(output)
    # 1. SIGTERM to both (a scheduler's time limit) after the second clip: both stop with the shell's status.
    ranks = start_ranks(command)
    wait_for_file(ranks, folder / "clip-00001.pt")
    for rank in ranks:
        rank.send_signal(signal.SIGTERM)
    logs = finish(ranks, 120)
    assert ranks[0].returncode == 143 and ranks[1].returncode in (2, 143), logs
    assert f"the progress is kept in {folder}" in logs[0] and "Traceback" not in logs[0] + logs[1], logs
    assert not output.exists()
    # 2. The rerun resumes (rank 0 says where, once); rank 1 is killed (-9) two clips later, rank 0 stops on it.
    ranks = start_ranks(command)
    wait_for_file(ranks, folder / "clip-00003.pt")
    ranks[1].kill()
    logs = finish(ranks, 120)
    assert ranks[0].returncode == 2 and "rank 1" in logs[0] and "Traceback" not in logs[0], logs
    assert logs[0].count("memo: resuming at 00:0") == 1 and "memo: resuming" not in logs[1], logs
    # 3. Another run holds the progress: rank 0 refuses with one line, rank 1 stops with it (not at a timeout).
    with JobState(output, JobState(output, {}).saved()).open():
        started = time.monotonic()
        ranks = start_ranks(command)
        logs = finish(ranks, 300)
    assert [rank.returncode for rank in ranks] == [2, 2] and time.monotonic() - started < 240, logs
    assert [line.startswith("error: Another run is rendering") for line in logs[0].splitlines()].count(True) == 1
    assert "error:" not in logs[1] and "Traceback" not in logs[0] + logs[1], logs
    # 4. The last rerun finishes the video of one process, frame for frame, and the same sound.
    ranks = start_ranks(command)
    logs = finish(ranks)
    assert [rank.returncode for rank in ranks] == [0, 0], logs
    assert "resuming at 00:" in logs[0] and "resuming" not in logs[1], logs
    frames, sound = frames_and_sound(output)
    assert np.array_equal(frames, expected[0]) and np.array_equal(sound, expected[1])
    assert [path.name for path in out.iterdir()] == ["portrait_speech.mp4"]
