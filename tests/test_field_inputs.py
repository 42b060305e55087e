"""Inputs from the wild (../shared/field, and other instances of the same kinds made here), through the programs
users run: each run renders the picture and the sound the user gave, or stops before any model loads with one
line, exit status 2, and nothing written.

The kinds: audio decoded once (damaged files, 24-bit WAV), the output location checked up front (a file in the
way, a read-only folder, no room), images as a person sees them (the pixel tests are in test_framing.py), empty
path arguments, missing optional runtimes, and batch inference and the web app reporting a failing job alike.

The programs run in this process (their ``main``); what needs a process of its own (a read-only mount, a
Python without a runtime) starts the real program and is in the ``e2e`` tier.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from conftest import REPO, run_main
from PIL import Image

from memo.apps import batch, cli
from memo.errors import INSIGHTFACE_INSTALL
from memo.io.audio import decode_audio
from memo.io.video import OutputLocationError, check_output_folder, probe_video

FIELD = REPO.parent / "shared" / "field"
EXAMPLE_IMAGE = REPO / "assets" / "examples" / "portrait.jpg"
EXAMPLE_AUDIO = REPO / "assets" / "examples" / "speech.wav"
FAST = ("inference_steps=1", "cfg_scale=1", "vocal_separation=false", "emotion=neutral")
MAGENTA = np.array([255, 0, 255])


def field(name: str) -> Path:
    path = FIELD / name
    if not path.is_file():
        pytest.skip(f"field case {path} not found")
    return path


def run(pack: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``inference.py``'s command line (no --verbose), in this process."""
    return run_main(cli.main, ["--config", str(pack / "inference.yaml"), *args], cwd=cwd or REPO)


def run_program(pack: Path, *args: str, cwd: Path | None = None, wrap: list[str] | None = None, env=None):
    """``inference.py`` as a user starts it (no --verbose), optionally inside a wrapper command."""
    command = [*(wrap or []), sys.executable, str(REPO / "inference.py"), "--config", str(pack / "inference.yaml")]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, cwd=cwd or REPO, timeout=600, env=env, check=False
    )


def assert_stopped_early(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, one ``error:`` line and nothing else, no model loaded; returns the line."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def speech_clip(seconds: float) -> tuple[np.ndarray, int]:
    audio, rate = soundfile.read(EXAMPLE_AUDIO, dtype="float32")
    return audio[: round(seconds * rate)], rate


def encode(path: Path, codec: str, samples: np.ndarray, rate: int, container_format: str | None = None) -> Path:
    """Encode mono float samples with PyAV, in 1024-sample frames with timestamps."""
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        for start in range(0, samples.shape[0], 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + 1024].copy(), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def damage(path: Path, at: float = 0.45, junk: int = 3000) -> Path:
    """``junk`` random bytes inserted at ``at`` of the file: a few frames lose their headers."""
    data = path.read_bytes()
    cut = int(len(data) * at)
    noise = np.random.default_rng(7).integers(0, 256, junk, dtype=np.uint8).tobytes()
    damaged = path.with_name(f"damaged_{path.name}")
    damaged.write_bytes(data[:cut] + noise + data[cut:])
    return damaged


def audio_case(kind: str, folder: Path) -> Path:
    samples, rate = speech_clip(2.5)
    if kind == "field_mp3":
        return field("a02_damaged.mp3")
    if kind == "damaged_mp3":
        return damage(encode(folder / "talk.mp3", "mp3", samples, rate))
    if kind == "damaged_aac":
        return damage(encode(folder / "talk.aac", "aac", samples, rate, "adts"), at=0.6)
    if kind == "wav24":  # 24-bit 48 kHz stereo, the two channels different
        upsampled = np.interp(np.arange(0, len(samples), rate / 48000), np.arange(len(samples)), samples)
        stereo = np.stack([upsampled, 0.5 * upsampled[::-1]], axis=1)
        soundfile.write(folder / "studio.wav", stereo, 48000, subtype="PCM_24")
        return folder / "studio.wav"
    raise ValueError(kind)


def sound_track(video: Path) -> tuple[np.ndarray, int]:
    """The mp4's sound as (channels, samples) float32, and its rate."""
    with av.open(str(video)) as container:
        stream = container.streams.audio[0]
        samples = np.concatenate([frame.to_ndarray() for frame in container.decode(stream)], axis=1)
        return samples, stream.rate


# -- the audio is decoded once ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["field_mp3", "damaged_mp3", "damaged_aac", "wav24"])
def test_audio_decoded_once_is_the_sound_track(pack, tmp_path, kind):
    audio = audio_case(kind, tmp_path)
    out = tmp_path / "out"
    result = run(
        pack, "--input_image", str(EXAMPLE_IMAGE), "--input_audio", str(audio), "--output_dir", str(out), *FAST,
        "fps=10",  # the sound is under test, not the frames: two clips rather than five
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    if kind != "wav24":  # the damage is reported without --verbose, with how much was lost
        assert f"{audio} is damaged" in result.stderr and "s of audio lost" in result.stderr, result.stderr
    decoded = decode_audio(audio)
    video = out / f"portrait_{audio.stem}.mp4"
    info = probe_video(video)
    assert info.num_frames == math.ceil(decoded.seconds * 10)
    assert abs(info.audio_duration - decoded.seconds) < 1 / 30, (info.audio_duration, decoded.seconds)
    track, rate = sound_track(video)
    assert rate == decoded.rate and track.shape[0] == decoded.channels  # the file's own rate and channels
    n = decoded.samples.shape[1]
    assert 0 <= track.shape[1] - n < 1024  # every decoded sample, and at most one AAC frame of padding
    for channel in range(decoded.channels):
        assert np.corrcoef(track[channel, :n], decoded.samples[channel])[0, 1] > 0.98


def test_the_sound_track_never_rereads_the_file(pack, tmp_path):
    """The audio file is gone once its conditions are made: the video still gets its sound, from memory."""
    from memo.generator import MemoGenerator
    from memo.settings.inference import load_config

    samples, rate = speech_clip(1.2)
    audio = tmp_path / "speech.wav"
    soundfile.write(audio, samples, rate)
    generator = MemoGenerator(load_config(pack / "inference.yaml", list(FAST)))
    image = generator.prepare_image(EXAMPLE_IMAGE)
    prepared = generator.prepare_audio(audio)
    audio.unlink()
    video = generator.render(image, prepared, tmp_path / "out.mp4", seed=0, overwrite=False)
    track, track_rate = sound_track(video)
    assert track_rate == rate and abs(track.shape[1] - samples.shape[0]) < 1024
    assert np.corrcoef(track[0, : samples.shape[0]], samples[: track.shape[1]])[0, 1] > 0.98


# -- images as a person sees them (pixels: test_framing.py) -----------------------------------------


@pytest.mark.parametrize(
    "name, shown",
    [
        ("i11_rgba_transparent.png", "transparent parts; they are shown on a white background"),
        ("i12_bad_exif.png", "has an unreadable EXIF block"),
        ("i14_grey16.png", "image: i14_grey16.png, 384x512"),
    ],
)
def test_field_images_render_and_say_what_was_done(pack, tmp_path, name, shown):
    samples, rate = speech_clip(1.0)
    soundfile.write(tmp_path / "speech.wav", samples, rate)
    out = tmp_path / "out"
    result = run(pack, "--input_image", str(field(name)), "--input_audio", str(tmp_path / "speech.wav"),
                 "--output_dir", str(out), *FAST)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert shown in result.stderr  # without --verbose
    assert probe_video(out / f"{Path(name).stem}_speech.mp4").num_frames == 30


# -- the output location is checked before any work -------------------------------------------------


def read_only(folder: Path) -> list[str] | None:
    """Make ``folder`` unwritable for the run: its permissions, or, for root (whom permissions do not stop), a
    read-only bind mount in a user namespace. Returns the wrapper command for the run (None: none needed)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return None
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: no way to make a folder read-only")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], check=False)
    if probe.returncode != 0:
        pytest.skip("user namespaces are not available for a read-only bind mount")
    mount = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, str(folder)]


@pytest.mark.parametrize(
    "where",
    ["a_file", "below_a_file", pytest.param("read_only", marks=pytest.mark.e2e),
     pytest.param("below_read_only", marks=pytest.mark.e2e)],
)  # fmt: skip
def test_unwritable_output_location_stops_before_any_model_loads(pack, tmp_path, where):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    samples, rate = speech_clip(1.0)
    soundfile.write(inputs / "speech.wav", samples, rate)
    area = tmp_path / "area"
    area.mkdir()
    wrap = None
    if where in ("a_file", "below_a_file"):
        (area / "notes.txt").write_text("a file, not a folder")
        output_dir = area / "notes.txt" / ("" if where == "a_file" else "videos")
        culprit = "notes.txt is a file, not a folder"
    else:
        wrap = read_only(area)
        output_dir = area / ("" if where == "read_only" else "new/videos")
        culprit = f"creating a file in {area}"
    before = listing(tmp_path)
    args = ["--input_image", str(EXAMPLE_IMAGE), "--input_audio", str(inputs / "speech.wav")]
    args += ["--output_dir", str(output_dir), *FAST]
    try:  # a read-only mount needs a process of its own
        result = run(pack, *args) if wrap is None else run_program(pack, *args, wrap=wrap)
    finally:
        area.chmod(0o755)
    line = assert_stopped_early(result, "Cannot write to the output folder", str(output_dir).rstrip("/"), culprit)
    assert "memo: models" not in result.stderr and "Traceback" not in result.stderr, line
    assert listing(tmp_path) == before


def test_too_little_free_space_is_refused(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(OutputLocationError, match="Not enough free space") as caught:
        check_output_folder(tmp_path / "new", min_free_bytes=free * 2)
    assert "MB free" in str(caught.value) and str(tmp_path / "new") in str(caught.value)
    assert check_output_folder(tmp_path / "new") == tmp_path / "new"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("bad", ["missing_image", "damaged_audio", "faceless_image"])
def test_a_rejected_run_creates_no_folder(pack, tmp_path, bad):
    """The field case ``--input_image missing.jpg --output_dir new/deeper``, and rejections found later."""
    samples, rate = speech_clip(1.0)
    soundfile.write(tmp_path / "speech.wav", samples, rate)
    image, audio = EXAMPLE_IMAGE, tmp_path / "speech.wav"
    if bad == "missing_image":
        image = tmp_path / "missing.jpg"
    elif bad == "damaged_audio":
        audio = tmp_path / "noise.mp3"
        audio.write_bytes(np.random.default_rng(0).bytes(4000))
    else:  # found only once the face models have run
        image = tmp_path / "grey.png"
        Image.new("RGB", (256, 256), (128, 128, 128)).save(image)
    out = tmp_path / "new" / "deeper"
    result = run(pack, "--input_image", str(image), "--input_audio", str(audio), "--output_dir", str(out), *FAST)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "new").exists()


# -- empty arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--input_image", "--input_audio", "--output_dir"])
def test_an_empty_path_argument_is_named(pack, tmp_path, option):
    given = {"--input_image": str(EXAMPLE_IMAGE), "--input_audio": str(EXAMPLE_AUDIO), "--output_dir": "out"}
    given[option] = ""
    args = [part for pair in given.items() for part in pair]
    result = run(pack, *args, *FAST, cwd=tmp_path)
    assert_stopped_early(result, f"{option} is empty")
    assert not any(tmp_path.iterdir())


def test_batch_empty_output_dir_is_named(pack, tmp_path):
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(f"image,audio\n{EXAMPLE_IMAGE},{EXAMPLE_AUDIO}\n")
    args = ["--manifest", str(manifest), "--output_dir", "", "--config", str(pack / "inference.yaml")]
    result = run_main(batch.main, args, cwd=tmp_path)
    assert_stopped_early(result, "--output_dir is empty")
    assert listing(tmp_path) == ["jobs.csv"]


# -- missing optional runtimes ----------------------------------------------------------------------

HIDER = """
import sys


class Hiding:
    \"\"\"Wraps an import finder so that it finds none of the hidden top-level modules, as in an install
    without them: ``importlib.util.find_spec`` gives None and ``import`` raises ModuleNotFoundError.\"\"\"

    hidden = {hidden!r}

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.hidden or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)


sys.meta_path[:] = [Hiding(finder) for finder in sys.meta_path]
"""


def hiding(tmp_path: Path, *modules: str) -> dict[str, str]:
    """An environment whose Python cannot import ``modules`` (a sitecustomize on PYTHONPATH)."""
    folder = tmp_path / "hide"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(HIDER.format(hidden=set(modules)))
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


MISSING_RUNTIMES = [
    ("onnxruntime", ['pip install -e ".[gpu]"', '".[cpu]"']),
    ("insightface", [INSIGHTFACE_INSTALL]),
    ("audio_separator", ['pip install -e ".[gpu]"', "vocal_separation=false"]),
]


# Each runtime in this process; the real program once, in a Python that cannot import onnxruntime (the same
# up-front check names each of them).
@pytest.mark.parametrize(
    "hidden, install, where",
    [*((hidden, install, "in_process") for hidden, install in MISSING_RUNTIMES),
     pytest.param(*MISSING_RUNTIMES[0], "program", marks=pytest.mark.e2e)],
)  # fmt: skip
def test_a_missing_runtime_is_one_line_naming_what_to_install(pack, tmp_path, monkeypatch, hidden, install, where):
    out = tmp_path / "out"
    args = ["--input_image", str(EXAMPLE_IMAGE), "--input_audio", str(EXAMPLE_AUDIO), "--output_dir", str(out)]
    args += ["inference_steps=1", "vocal_separation=true"]
    if where == "program":  # a Python that cannot import it
        result = run_program(pack, *args, env=hiding(tmp_path, hidden))
    else:  # the up-front check finds no such module
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *rest: None if name == hidden else find_spec(name, *rest)
        )
        result = run(pack, *args)
    assert_stopped_early(result, f"{hidden} is not installed", *install)
    assert not out.exists()


def test_the_python_api_names_the_missing_runtime_too(pack, tmp_path):
    """Without the programs' up-front check, loading the face models names the missing onnxruntime too."""
    code = (
        "from memo.conditions.face import FaceAnalyzer\n"
        "from memo.errors import MissingRuntimeError\n"
        "try:\n"
        f"    FaceAnalyzer.from_dir({str(pack / 'misc' / 'face_analysis' / 'models')!r})\n"
        "except MissingRuntimeError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=hiding(tmp_path, "onnxruntime")
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("onnxruntime is not installed") and 'pip install -e ".[gpu]"' in result.stdout


# -- batch inference and the web app report a failing job alike ------------------------------------


def test_batch_and_web_app_report_a_failing_job_with_the_same_message(pack, tmp_path):
    pytest.importorskip("gradio")
    import gradio as gr

    from memo.apps.batch import Job, run_jobs
    from memo.apps.web import WebApp
    from memo.generator import MemoGenerator
    from memo.settings.inference import load_config

    samples, rate = speech_clip(1.0)
    audio = tmp_path / "speech.wav"
    soundfile.write(audio, samples, rate)
    garbage = tmp_path / "holiday.png"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    grey = tmp_path / "grey.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(grey)
    generator = MemoGenerator(load_config(pack / "inference.yaml", list(FAST)))
    app = WebApp(generator, tmp_path / "web")
    for image in (garbage, grey):
        [result] = run_jobs(generator, [Job(2, image, audio, tmp_path / "batch" / "out.mp4")], process=0)
        assert result["status"] == "failed"
        with pytest.raises(gr.Error) as caught:
            list(  # the handler yields the live segments, then the video
                app.generate(
                    str(image),
                    str(audio),
                    "neutral",
                    "64x64",
                    1,
                    1.0,
                    0,
                    "crop",
                    "exact",
                    progress=lambda *a, **k: None,
                )
            )
        assert caught.value.message == result["reason"]
        assert image.name in result["reason"]
    assert not (tmp_path / "batch").exists() and not (tmp_path / "web").exists()
