"""scripts/calculate_durations.py and scripts/prepare_data.py on real mp4 files with real speech and the tiny
model pack: every output file and field, the failures and their reasons, a killed run resumed without redoing
finished videos, and two shards merged into what a single run gives.

The scripts run in this process (their ``main``); the runs that need processes of their own (a killed run, two
shards at once, the README's workflow through finetune.py) are the ``e2e`` tier.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from conftest import REPO, load_program, run_main
from PIL import Image
from safetensors.torch import load_file

from memo.data.store import KINDS, shard_of, video_ids
from memo.io.audio import decode_audio
from memo.io.video_writer import VideoWriter

SPEECH = REPO / "assets" / "examples" / "speech.wav"
FACE_BOX = (slice(11, 41), slice(20, 44))
"""Rows and columns of the tiny detector's large face in a 64x64 image: texture there alone is one face."""
SECOND_FACE_BOX = (slice(44, 60), slice(42, 54))
"""... and of its small face, found only where flat ground surrounds it."""

USABLE = {"talk_a": 48, "clips__talk_b": 60, "clips__talk_c": 45}
"""id -> frames of the videos that become training data."""
FAILING = {
    "broken": "Invalid data",
    "crowd": "2 faces in the first frame",
    "faceless": "no face in the first frame",
    "mute": "no audio stream",
    "pal": "25 fps, not the training 30 fps",
}
"""id -> a fragment of the reason each other video is rejected with."""
ENTRY_KEYS = {"id", "video", "fps", "num_frames", "width", "height", *KINDS}


def frames(count: int, kind: str, seed: int) -> np.ndarray:
    """64x64 frames: noise in the face box ("face"), also in the small face's box on flat grey ("crowd": both
    tiny faces) or flat grey."""
    rng = np.random.default_rng(seed)
    video = np.full((count, 64, 64, 3), 128, np.uint8)
    if kind in ("face", "crowd"):
        rows, cols = FACE_BOX
        video[:, rows, cols] = rng.integers(0, 256, (count, 30, 24, 3), dtype=np.uint8)
    if kind == "crowd":
        rows, cols = SECOND_FACE_BOX
        video[:, rows, cols] = rng.integers(0, 256, (count, 16, 12, 3), dtype=np.uint8)
    return video


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """H.264 + AAC mp4s cut from the bundled speech, three usable and five that each fail differently."""
    base = tmp_path_factory.mktemp("dataset")
    root = base / "video"
    speech, rate = soundfile.read(SPEECH, dtype="float32")

    def make(name: str, seconds: float, fps: int, kind: str, start: float, seed: int, sound: bool = True) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        count = round(seconds * fps)
        audio = None
        if sound:
            first = int(start * rate)
            soundfile.write(base / f"{seed}.wav", speech[first : first + round(count / fps * rate)], rate)
            audio = decode_audio(base / f"{seed}.wav")
        with VideoWriter(path, fps, 64, 64, audio=audio) as writer:
            writer.write(frames(count, kind, seed))

    make("talk_a.mp4", 1.6, 30, "face", 0.0, 1)
    make("clips/talk_b.mp4", 2.0, 30, "face", 2.0, 2)
    make("clips/talk_c.mp4", 1.5, 30, "face", 4.5, 3)
    make("faceless.mp4", 1.0, 30, "grey", 6.0, 4)
    make("crowd.mp4", 1.0, 30, "crowd", 7.0, 5)
    make("pal.mp4", 1.2, 25, "face", 8.0, 6)
    make("mute.mp4", 1.0, 30, "face", 0.0, 7, sound=False)
    (root / "broken.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (root / "notes.txt").write_text("not a video")
    return root


def prepare_command(pack: Path, videos: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--input_dir", str(videos), "--output_dir", str(out),
        "--config", str(pack / "inference.yaml"), "--misc_model_dir", str(pack), *extra,
    ]  # fmt: skip


def run(command: list[str]) -> subprocess.CompletedProcess:
    """A script started as a program: ``[python, scripts/NAME.py, *args]``."""
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mtimes(out: Path, video_id: str) -> dict[str, int]:
    return {kind: (out / kind / f"{video_id}.safetensors").stat().st_mtime_ns for kind in KINDS}


def run_in_process(command: list[str]) -> subprocess.CompletedProcess:
    """The same command, ``[python, scripts/NAME.py, *args]``, through the script's ``main`` in this process."""
    script = load_program(str(Path(command[1]).relative_to(REPO) if Path(command[1]).is_absolute() else command[1]))
    result = run_main(script.main, command[2:], cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def prepared(pack, videos, tmp_path_factory) -> Path:
    """One whole run in this process (vocal separation off): its output folder."""
    out = tmp_path_factory.mktemp("prepared")
    run_in_process(prepare_command(pack, videos, out, "vocal_separation=false"))
    return out


@pytest.fixture(scope="module")
def single_run(pack, videos, tmp_path_factory) -> dict:
    """A run killed right after its first video is done, then run again to the end (vocal separation off)."""
    out = tmp_path_factory.mktemp("single")
    log = out.parent / "killed.log"
    with open(log, "w") as stderr:
        command = prepare_command(pack, videos, out, "vocal_separation=false")
        process = subprocess.Popen(command, cwd=REPO, stdout=stderr, stderr=stderr)
        metadata = out / "metadata.jsonl"
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if metadata.is_file() and metadata.read_text().count("\n") >= 1:
                process.kill()
                break
            time.sleep(0.02)
        process.wait()
    killed = read_jsonl(metadata)
    before = {entry["id"]: mtimes(out, entry["id"]) for entry in killed}
    leftover = out / "audio_emb" / ".clips__talk_c.safetensors.99999-0123abcd.partial.safetensors"  # as a kill
    leftover.write_bytes(b"half a file")  # while writing leaves it (memo.io.partial): nobody holds its lock
    rerun = run(prepare_command(pack, videos, out, "vocal_separation=false"))
    return {
        "out": out,
        "returncode": process.returncode,
        "killed": killed,
        "before": before,
        "rerun": rerun,
        "leftover": leftover,
    }


@pytest.fixture(scope="module")
def sharded_run(pack, videos, tmp_path_factory) -> dict:
    """Two shards run at once (vocal separation on); the last to finish merges them."""
    out = tmp_path_factory.mktemp("sharded")
    commands = [prepare_command(pack, videos, out, "--shard", str(i), "--num_shards", "2") for i in (0, 1)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    processes = [subprocess.Popen(command, cwd=REPO, **pipes) for command in commands]
    logs = [process.communicate(timeout=600)[1] for process in processes]
    for process, stderr in zip(processes, logs):
        assert process.returncode == 0, stderr
    return {"out": out, "logs": logs}


def test_ids_are_unique_filesystem_safe_and_stable(tmp_path):
    names = ["a.mp4", "sub/a.mp4", "A.MOV", "x y#.mp4", ".hidden/b.mp4", "c" * 200 + ".mp4", "d.e.mkv"]
    paths = [tmp_path / name for name in names]
    ids = video_ids(paths, tmp_path)
    assert [ids[tmp_path / name] for name in ("sub/a.mp4", "x y#.mp4", "d.e.mkv")] == ["sub__a", "x_y_", "d.e"]
    assert ids[tmp_path / ".hidden/b.mp4"] == "_hidden__b"
    assert ids[tmp_path / "a.mp4"].startswith("a-") and ids[tmp_path / "A.MOV"].startswith("A-")  # same but for case
    assert len({value.casefold() for value in ids.values()}) == len(names)
    assert all(len(value) <= 160 and not value.startswith(".") and "/" not in value for value in ids.values())
    assert video_ids(reversed(paths), tmp_path) == ids


def test_shards_split_the_videos_stably():
    ids = [f"video_{i}" for i in range(200)]
    shards = [shard_of(video_id, 3) for video_id in ids]
    assert set(shards) == {0, 1, 2} and min(shards.count(i) for i in range(3)) > 40
    assert shards == [shard_of(video_id, 3) for video_id in ids]


def test_calculate_durations(videos, tmp_path):
    report = tmp_path / "durations.json"
    command = [sys.executable, str(REPO / "scripts" / "calculate_durations.py"), str(videos), "--json", str(report)]
    result = run_in_process(command)
    expected = {"talk_a.mp4": 1.6, "clips/talk_b.mp4": 2.0, "clips/talk_c.mp4": 1.5, "faceless.mp4": 1.0}
    expected.update({"crowd.mp4": 1.0, "pal.mp4": 1.2, "mute.mp4": 1.0})
    data = json.loads(report.read_text())
    assert data["durations"].keys() == expected.keys()
    for name, seconds in expected.items():
        assert abs(data["durations"][name] - seconds) < 0.1, name
    assert abs(data["total_seconds"] - sum(expected.values())) < 0.3
    assert list(data["unreadable"]) == ["broken.mp4"]
    assert "Found 8 video files" in result.stdout and "in 7 videos" in result.stdout
    assert "median 1.20" in result.stdout and "max 2.00" in result.stdout
    assert result.stdout.index("Unreadable (1)") < result.stdout.index("broken.mp4")


def test_every_usable_video_is_prepared(prepared, videos):
    check_prepared(prepared, videos)


@pytest.mark.e2e
def test_a_killed_and_resumed_run_prepares_every_usable_video(single_run, videos):
    check_prepared(single_run["out"], videos)


def check_prepared(out: Path, videos: Path) -> None:
    """Every usable video's entry and files, every other one's failure, no leftovers."""
    entries = read_jsonl(out / "metadata.jsonl")
    assert sorted(entry["id"] for entry in entries) == sorted(USABLE)
    embeddings = []
    for entry in entries:
        video_id, count = entry["id"], USABLE[entry["id"]]
        assert set(entry) == ENTRY_KEYS
        relative = video_id.replace("__", "/") + ".mp4"
        assert entry["video"] == str(videos / relative) and Path(entry["video"]).is_absolute()
        assert (entry["fps"], entry["num_frames"], entry["width"], entry["height"]) == (30.0, count, 64, 64)
        assert {kind: entry[kind] for kind in KINDS} == {kind: f"{kind}/{video_id}.safetensors" for kind in KINDS}

        audio = load_file(out / entry["audio_emb"])
        assert list(audio) == ["audio_emb"]
        windows = audio["audio_emb"]
        assert windows.dtype == torch.float32 and windows.shape == (count, 5, 2, 16)  # tiny wav2vec2: 2 layers x 16
        assert torch.equal(windows[1:, 1], windows[:-1, 2]) and torch.equal(windows[0, 0], windows[0, 2])
        face = load_file(out / entry["face_emb"])["face_emb"]
        assert face.dtype == torch.float32 and face.shape == (512,) and face.abs().sum() > 0
        embeddings.append(face)
        emotion = load_file(out / entry["audio_emotion"])["emotion"]
        assert emotion.dtype == torch.int64 and emotion.shape == (count,) and 0 <= emotion.min() <= emotion.max() < 9
        vocals = load_file(out / entry["vocals"])["vocals"]
        assert vocals.dtype == torch.float32 and vocals.shape == (count * 16000 // 30,) and vocals.abs().max() > 0
    assert not torch.allclose(embeddings[0], embeddings[1])

    failures = {entry["id"]: entry for entry in read_jsonl(out / "failures.jsonl")}
    assert failures.keys() == FAILING.keys()
    for video_id, fragment in FAILING.items():
        assert fragment in failures[video_id]["reason"], failures[video_id]
        assert failures[video_id]["video"] == str(videos / f"{video_id}.mp4")
    assert not [path for path in out.rglob(".*") if path.name != ".merge.lock"]


@pytest.mark.e2e
def test_a_killed_run_resumes_without_redoing_finished_videos(single_run):
    assert single_run["returncode"] == -signal.SIGKILL
    killed = single_run["killed"]
    assert 1 <= len(killed) < len(USABLE)
    stderr = single_run["rerun"].stderr
    assert not single_run["leftover"].exists() and "removed 1 partial file(s)" in stderr
    assert f"{len(killed)} skipped as already prepared" in stderr
    assert f"done: {len(USABLE) - len(killed)} prepared, {len(killed)} skipped, {len(FAILING)} failed" in stderr
    for video_id, before in single_run["before"].items():
        assert mtimes(single_run["out"], video_id) == before
        assert f"prepared {video_id}:" not in stderr


def test_shards_one_after_the_other_merge_into_a_single_runs_data(prepared, pack, videos, tmp_path):
    out = tmp_path / "sharded"
    logs = [
        run_in_process(
            prepare_command(pack, videos, out, "--shard", str(i), "--num_shards", "2", "vocal_separation=false")
        )
        for i in (0, 1)
    ]
    assert "merged the 2 shards: 3 videos, 5 failures" in logs[1].stderr
    merged = read_jsonl(out / "metadata.jsonl")
    assert [entry["id"] for entry in merged] == sorted(USABLE)
    again = run_in_process([sys.executable, "scripts/prepare_data.py", "--merge", "--output_dir", str(out)])
    assert read_jsonl(out / "metadata.jsonl") == merged and "merged: 3 videos, 5 failures" in again.stderr
    for entry in merged:
        name = f"{entry['id']}.safetensors"
        for kind in KINDS:
            assert load_file(out / kind / name).keys() == load_file(prepared / kind / name).keys()
            for key, value in load_file(out / kind / name).items():
                assert torch.equal(value, load_file(prepared / kind / name)[key]), (kind, name)


@pytest.mark.e2e
def test_two_shards_merge_into_a_single_runs_videos(sharded_run, single_run, videos, pack):
    out = sharded_run["out"]
    shard_ids = [{entry["id"] for entry in read_jsonl(out / f"metadata.shard-{i}-of-2.jsonl")} for i in (0, 1)]
    assert not shard_ids[0] & shard_ids[1]
    assert all(shard_of(video_id, 2) == i for i in (0, 1) for video_id in shard_ids[i])
    merged = read_jsonl(out / "metadata.jsonl")
    assert [entry["id"] for entry in merged] == sorted(USABLE)
    assert {entry["id"] for entry in read_jsonl(out / "failures.jsonl")} == FAILING.keys()
    assert any("merged the 2 shards: 3 videos, 5 failures" in log for log in sharded_run["logs"])

    again = run([sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--merge", "--output_dir", str(out)])
    assert read_jsonl(out / "metadata.jsonl") == merged and "merged: 3 videos, 5 failures" in again.stderr

    from memo.conditions.audio_features import Wav2VecAudioEncoder
    from memo.data.prepare import fit_to_frames
    from memo.io.audio import load_audio

    encoder = Wav2VecAudioEncoder.from_pretrained(pack / "wav2vec2")
    single = single_run["out"]
    for entry in merged:
        count, name = entry["num_frames"], f"{entry['id']}.safetensors"
        audio = fit_to_frames(load_audio(entry["video"]), count, 30)
        assert torch.equal(load_file(single / "vocals" / name)["vocals"], audio)  # vocal_separation=false: the audio
        expected = encoder.for_frames(audio, count).windows  # inference's own features of the audio
        torch.testing.assert_close(load_file(single / "audio_emb" / name)["audio_emb"], expected)
        vocals = load_file(out / "vocals" / name)["vocals"]
        assert vocals.shape == audio.shape and not torch.equal(vocals, audio)  # separated in the sharded run
        for kind, key in (("face_emb", "face_emb"), ("audio_emotion", "emotion")):
            assert torch.equal(load_file(out / kind / name)[key], load_file(single / kind / name)[key])


def test_frame_counts_match_the_training_decoder(prepared):
    decord = pytest.importorskip("decord")
    for entry in read_jsonl(prepared / "metadata.jsonl"):
        assert len(decord.VideoReader(entry["video"])) == entry["num_frames"]


def talking_head(path: Path, seconds: float, start: float, seed: int, size: int = 128) -> None:
    """An ordinary talking-head mp4: the example portrait, gently moving (pan and zoom) as a speaker does in
    front of a camera, with the example speech as its sound (H.264 + AAC at 30 fps)."""
    from memo.io.image import load_image

    portrait = load_image(REPO / "assets" / "examples" / "portrait.jpg")
    width, height = portrait.size
    count = round(seconds * 30)
    speech, rate = soundfile.read(SPEECH, dtype="float32")
    first = int(start * rate)
    soundfile.write(path.with_suffix(".wav"), speech[first : first + round(seconds * rate)], rate)
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi)
    video = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        t = i / 30
        zoom = 0.92 + 0.03 * np.sin(2 * np.pi * 0.4 * t + phase)
        dx, dy = 0.02 * width * np.sin(2 * np.pi * 0.7 * t + phase), 0.015 * height * np.cos(2 * np.pi * 0.5 * t)
        half_w, half_h = zoom * width / 2, zoom * height / 2
        box = (width / 2 + dx - half_w, height / 2 + dy - half_h, width / 2 + dx + half_w, height / 2 + dy + half_h)
        video[i] = np.asarray(portrait.resize((size, size), Image.Resampling.BILINEAR, box=box))
    with VideoWriter(path, 30, size, size, audio=decode_audio(path.with_suffix(".wav"))) as writer:
        writer.write(video)
    path.with_suffix(".wav").unlink()


@pytest.mark.e2e
def test_readme_finetuning_workflow_on_ordinary_talking_head_videos(pack, tmp_path):
    """calculate_durations -> prepare_data -> finetune.py, as the README gives them, on one's own talking-head
    videos with the tiny pack: every video is usable (one face each, as the real detector finds) and trains."""
    pytest.importorskip("decord")
    from test_finetune import launch, read_metrics, tiny_config

    videos = tmp_path / "video"
    videos.mkdir()
    talking_head(videos / "interview.mp4", 2.0, 0.5, seed=1)
    talking_head(videos / "vlog.mp4", 1.6, 3.0, seed=2)

    durations = run([sys.executable, str(REPO / "scripts" / "calculate_durations.py"), str(videos)])
    assert "Found 2 video files" in durations.stdout and "in 2 videos" in durations.stdout

    prepared = tmp_path / "embedding"
    run(prepare_command(pack, videos, prepared, "vocal_separation=false"))
    entries = {entry["id"]: entry for entry in read_jsonl(prepared / "metadata.jsonl")}
    assert set(entries) == {"interview", "vlog"}
    assert [entries[name]["num_frames"] for name in ("interview", "vlog")] == [60, 48]
    assert not (prepared / "failures.jsonl").exists() or not (prepared / "failures.jsonl").read_text().strip()

    config = tiny_config(
        tmp_path, prepared, model_name_or_path=str(pack), vae=str(pack / "vae"), max_train_steps=2,
        checkpointing_steps=2,
    )  # fmt: skip
    launch(config, "own_videos")
    metrics = read_metrics(tmp_path / "outputs" / "own_videos")
    losses = [row["loss"] for row in metrics if "loss" in row]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (tmp_path / "outputs" / "own_videos" / "checkpoint-2").is_dir()
