"""inference.py on the tiny model pack: real image and speech in, a decoded mp4 out, and a clear message with
no traceback and no output for every kind of bad input.

The command line runs in this process (``memo.apps.cli.main``, as ``inference.py`` calls it); the tests marked
``e2e`` start the real program, and so does the ``--tiny`` test, the default tier's smoke test of it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from conftest import REPO, run_main
from PIL import Image

from memo.apps import cli
from memo.io.video import probe_video

EXAMPLE_IMAGE = REPO / "assets" / "examples" / "portrait.jpg"
EXAMPLE_AUDIO = REPO / "assets" / "examples" / "speech.wav"
SPEECH_SECONDS = 1.0
SPEECH_FRAMES = 30  # ceil(1 s x 30 fps): two clips of the pack's 16 frames
# Settings for the tests that are not about steps or guidance: one step, no guidance (a quarter of the work).
CHEAP = ("inference_steps=1", "cfg_scale=1")


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> Path:
    """1 s of real speech (the bundled example, cut: two clips, the second one conditioned on the first) as
    44.1 kHz stereo FLAC: any format, any rate."""
    audio, rate = soundfile.read(EXAMPLE_AUDIO, dtype="float32")
    path = tmp_path_factory.mktemp("audio") / "speech_cut.flac"
    clip = audio[: int(SPEECH_SECONDS * rate)]
    stereo = np.stack([clip, clip * 0.5], axis=1)
    upsampled = np.stack(
        [np.interp(np.arange(0, len(clip), rate / 44100), np.arange(len(clip)), ch) for ch in stereo.T], 1
    )
    soundfile.write(path, upsampled.astype(np.float32), 44100)
    return path


def run(pack: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The command line in this process."""
    return run_main(cli.main, ["--config", str(pack / "inference.yaml"), *args], cwd=cwd or REPO)


def run_program(pack: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``inference.py`` as a user starts it."""
    command = [sys.executable, str(REPO / "inference.py"), "--config", str(pack / "inference.yaml"), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd or REPO, timeout=600)


@pytest.fixture(params=["in_process", pytest.param("program", marks=pytest.mark.e2e)])
def runner(request):
    """The command line run in this process (default tier) and as the real program (e2e tier)."""
    return run if request.param == "in_process" else run_program


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_renders_a_video_with_the_input_audio(pack, speech, tmp_path, runner):
    result = runner(
        pack, "--input_image", str(EXAMPLE_IMAGE), "--input_audio", str(speech), "--output_dir", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    output = tmp_path / "portrait_speech_cut.mp4"
    info = probe_video(output)
    assert info.num_frames == SPEECH_FRAMES
    assert info.fps == 30 and (info.width, info.height) == (64, 64)
    assert info.video_codec == "h264" and info.has_audio and info.audio_codec == "aac"
    assert abs(info.audio_duration - SPEECH_SECONDS) < 0.05
    assert "MEMO" in info.metadata.get("comment", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name]
    import av

    with av.open(str(output)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == SPEECH_FRAMES and frames[0].shape == (64, 64, 3)
    assert np.std(np.stack(frames).astype(np.float32)) > 1.0  # generated pixels, not a blank video
    assert "memo: output:" in result.stderr
    # One progress bar, the render's (video time, speed, time left), not the pipeline's per-step bar as well.
    assert re.search(r"\d+ clips: 00:0\d\.\d / 00:0\d\.\d video, \d+\.\d\d s/frame, done", result.stderr), result.stderr
    assert "step/s" not in result.stderr and "s/step" not in result.stderr


def test_without_inputs_renders_the_bundled_example(pack, tmp_path):
    result = run(pack, "--output_dir", str(tmp_path), "fps=5", "vocal_separation=false", "emotion=happy", *CHEAP)
    assert result.returncode == 0, result.stderr
    info = probe_video(tmp_path / "portrait_speech.mp4")
    seconds = soundfile.info(EXAMPLE_AUDIO).duration
    assert info.num_frames == int(np.ceil(seconds * 5)) and info.fps == 5


def test_existing_output_is_kept_unless_overwrite(pack, speech, tmp_path):
    output = tmp_path / "portrait_speech_cut.mp4"
    output.write_bytes(b"precious")
    result = run(pack, "--input_image", str(EXAMPLE_IMAGE), "--input_audio", str(speech), "--output_dir", str(tmp_path))
    assert_user_error(result, "already exists", "--overwrite")
    assert output.read_bytes() == b"precious"
    result = run(
        pack,
        "--input_image",
        str(EXAMPLE_IMAGE),
        "--input_audio",
        str(speech),
        "--output_dir",
        str(tmp_path),
        "--overwrite",
        *CHEAP,
    )
    assert result.returncode == 0, result.stderr
    assert probe_video(output).num_frames == SPEECH_FRAMES


def _bad_image(kind: str, directory: Path) -> Path:
    path = directory / f"{kind}.png"
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).bytes(2000))
    elif kind == "tiny":
        Image.new("RGB", (32, 32), (128, 90, 70)).save(path)
    elif kind == "faceless":
        Image.new("RGB", (256, 256), (128, 128, 128)).save(path)
    return path


def _bad_audio(kind: str, directory: Path) -> Path:
    path = directory / f"{kind}.wav"
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(1).bytes(5000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "blip":
        soundfile.write(path, np.zeros(100, dtype=np.float32), 16000)
    return path


BAD_IMAGES = [
    ("missing", ["missing.png", "does not exist"]),
    ("corrupt", ["corrupt.png"]),
    ("tiny", ["tiny.png", "32"]),
    ("faceless", ["faceless.png", "face"]),
]


# Each kind in this process; the real program once, with the image refused last (after the face models load).
@pytest.mark.parametrize(
    "image_kind, fragments, where",
    [*((kind, fragments, "in_process") for kind, fragments in BAD_IMAGES),
     pytest.param(*BAD_IMAGES[-1], "program", marks=pytest.mark.e2e)],
)  # fmt: skip
def test_bad_image(pack, speech, tmp_path, image_kind, fragments, where):
    image = _bad_image(image_kind, tmp_path)
    out = tmp_path / "out"
    runner = run if where == "in_process" else run_program
    result = runner(pack, "--input_image", str(image), "--input_audio", str(speech), "--output_dir", str(out))
    assert_user_error(result, *fragments)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "audio_kind, fragments",
    [
        ("missing", ["missing.wav", "does not exist"]),
        ("corrupt", ["corrupt.wav"]),
        ("empty", ["empty.wav"]),
        ("blip", ["blip.wav", "shorter than one video frame"]),
    ],
)
def test_bad_audio(pack, tmp_path, audio_kind, fragments):
    audio = _bad_audio(audio_kind, tmp_path)
    out = tmp_path / "out"
    result = run(pack, "--input_image", str(EXAMPLE_IMAGE), "--input_audio", str(audio), "--output_dir", str(out))
    assert_user_error(result, *fragments)
    assert not out.exists() or not any(out.iterdir())


def test_silent_audio_warns_and_still_renders(pack, tmp_path):
    audio = tmp_path / "silence.wav"
    soundfile.write(audio, np.zeros(16000, dtype=np.float32), 16000)
    result = run(
        pack, "--input_image", str(EXAMPLE_IMAGE), "--input_audio", str(audio), "--output_dir", str(tmp_path), *CHEAP
    )
    assert result.returncode == 0, result.stderr
    assert "silent" in result.stderr
    assert probe_video(tmp_path / "portrait_silence.mp4").num_frames == 30


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("colour_grading=warm", ["Unknown setting 'colour_grading'"]),
        ("emotion=joyful", ["emotion", "joyful", "happy"]),
        ("resolution=100", ["multiple of 64"]),
        pytest.param(
            "device=cuda",
            ["device=cuda", "no CUDA GPU"],
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA"),
        ),
    ],
)
def test_bad_settings(pack, speech, tmp_path, override, fragments):
    result = run(
        pack, "--input_image", str(EXAMPLE_IMAGE), "--input_audio", str(speech), "--output_dir", str(tmp_path), override
    )
    assert_user_error(result, *fragments)
    assert not any(tmp_path.iterdir())


def test_out_of_gpu_memory_names_settings_that_fit(pack, speech, tmp_path, monkeypatch):
    from memo.generator import GpuMemoryError, MemoGenerator
    from memo.pipeline import MemoPipeline
    from memo.settings.inference import load_config

    generator = MemoGenerator(load_config(pack / "inference.yaml"))

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(MemoPipeline, "__call__", exhausted)  # the pipeline runs out of memory when called
    with pytest.raises(GpuMemoryError, match="vae_batch_size=1"):
        generator.generate(EXAMPLE_IMAGE, speech, tmp_path / "oom.mp4")
    # no video, no partial: only the render's progress folder, kept to be resumed (memo.io.job_state)
    assert [path.name for path in tmp_path.iterdir()] == [".oom.mp4.resume"]


def test_python_api_renders_many_pairs_with_one_load(pack, speech, tmp_path):
    from memo.generator import MemoGenerator
    from memo.settings.inference import load_config

    generator = MemoGenerator(load_config(pack / "inference.yaml", list(CHEAP)))
    first = generator.generate(EXAMPLE_IMAGE, speech, tmp_path / "a.mp4", emotion="sad")
    second = generator.generate(EXAMPLE_IMAGE, speech, tmp_path / "b.mp4", seed=7, emotion="auto")
    assert probe_video(first).num_frames == probe_video(second).num_frames == SPEECH_FRAMES


@pytest.mark.e2e
def test_first_run_offline_lists_the_missing_models_once(tmp_path):
    """``python inference.py`` as a new user runs it (defaults, the bundled example), offline with an empty cache:
    one short block naming each missing model once, the command that downloads them all, and local folders."""
    import os

    import memo.io.hub

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_cache")}
    result = subprocess.run(
        [sys.executable, str(REPO / "inference.py"), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "huggingface-cli" not in result.stderr
    block = result.stderr[result.stderr.index("error: ") :].splitlines()
    assert block[0] == "error: 4 models are not available:"
    for setting, repo in (
        ("model_name_or_path", "memoavatar/memo"),
        ("vae", "stabilityai/sd-vae-ft-mse"),
        ("wav2vec", "facebook/wav2vec2-base-960h"),
        ("emotion2vec", "emotion2vec/emotion2vec_plus_large"),
    ):
        assert sum(line.startswith(f"  - {setting}={repo} ") for line in block) == 1, block
        assert result.stderr.count(repo) == 1, result.stderr
    assert memo.io.hub.DOWNLOAD_COMMAND in block[5] and "model_name_or_path=DIR" in block[6]
    assert len(block) == 7, block
    assert not (tmp_path / "out").exists()


def test_offline_without_the_models_lists_what_is_missing_in_process(pack, speech, tmp_path, monkeypatch):
    """The same refusal with the hub cut off here: every download ends as the hub's offline mode ends it."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    import memo.io.hub

    def offline(**kwargs):
        raise LocalEntryNotFoundError(f"{kwargs['repo_id']} is not in the cache")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(memo.io.hub, "snapshot_download", offline)
    result = run(
        pack, "--input_image", str(EXAMPLE_IMAGE), "--input_audio", str(speech), "--output_dir", str(tmp_path / "out"),
        "model_name_or_path=memoavatar/memo", "wav2vec=facebook/wav2vec2-base-960h", "emotion=auto",
        "emotion2vec=emotion2vec/emotion2vec_plus_large",
    )  # fmt: skip
    assert_user_error(result, "models are not available", "memoavatar/memo", "facebook/wav2vec2-base-960h")
    assert "emotion2vec/emotion2vec_plus_large" in result.stderr and "scripts/download_models.py" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_tiny_flag_builds_the_random_pack_and_says_so(tmp_path):
    """``inference.py --tiny``, the README's offline check, started as a user starts it (the default tier's one
    run of the real program): the pack is built in the cache under the user's home on first use, the bundled
    example renders with it, and the screen says twice that the weights are random. Nothing is left in TMPDIR
    (torch.compile's cache folder goes to the project's cache, onnxruntime's telemetry files are not written)
    nor in the home outside the project's cache."""
    import memo.tiny.pack
    from memo.environment import library_defaults

    out, tmpdir, home = tmp_path / "out", tmp_path / "tmp", tmp_path / "home"
    tmpdir.mkdir()
    args = ["--tiny", "--output_dir", str(out), "fps=5", "vocal_separation=false", "emotion=happy", *CHEAP]
    env = {name: value for name, value in os.environ.items() if name not in {*library_defaults(), "XDG_CACHE_HOME"}}
    env |= {"HOME": str(home), "TMPDIR": str(tmpdir)}
    command = [sys.executable, str(REPO / "inference.py"), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    cache = home / ".cache" / "memo"
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("RANDOM") == 2 and "not a MEMO result" in result.stderr, result.stderr
    info = probe_video(out / "portrait_speech_tiny.mp4")
    assert info.num_frames == int(np.ceil(soundfile.info(EXAMPLE_AUDIO).duration * 5)) and info.has_audio
    assert sorted(os.listdir(tmpdir)) == []  # was torchinductor_<user> and onnxruntime's .ses
    assert sorted(os.listdir(home / ".cache")) == ["memo"]  # was also Microsoft/DeveloperTools/.onnxruntime
    [pack] = [folder for folder in cache.iterdir() if folder.name != "torchinductor"]  # one complete pack
    assert pack.name.startswith("tiny-pack-") and (pack / "inference.yaml").is_file()
    built = (pack / "inference.yaml").stat().st_mtime_ns
    assert memo.tiny.pack.cached_tiny_pack(cache) == pack / "inference.yaml"  # reused, not built again
    assert (pack / "inference.yaml").stat().st_mtime_ns == built


def test_without_tiny_the_published_weights_are_asked_for(tmp_path, monkeypatch):
    """No silent fallback: without --tiny and without the hub, the run stops and names the published models."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    import memo.io.hub

    def offline(**kwargs):
        raise LocalEntryNotFoundError(f"{kwargs['repo_id']} is not in the cache")

    monkeypatch.setattr(memo.io.hub, "snapshot_download", offline)
    result = run_main(cli.main, ["--output_dir", str(tmp_path / "out"), "vocal_separation=false"], cwd=REPO)
    assert_user_error(result, "not available", "memoavatar/memo")
    assert "RANDOM" not in result.stderr and not (tmp_path / "out").exists()
