"""The independent field pass (docs/field-tests.md): inputs a reviewer made, through the programs users run.

What it found and these tests hold: float WAVs with NaN or infinite samples (silenced, with a warning, so
neither the features nor the sound track turn into NaN), audio files cut short (an unfinished download or
recording: said, with how much is missing, instead of a silently shorter video), and NaN or infinite
settings (refused like any other out-of-range value; ``nan`` passed every range check before).
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import REPO, run_main
from test_field_inputs import EXAMPLE_IMAGE, FAST, assert_stopped_early, encode, listing, sound_track, speech_clip

from memo.apps import batch, cli
from memo.io.audio import decode_audio
from memo.io.video import probe_video


def run(pack: Path, *args: str) -> object:
    return run_main(cli.main, ["--config", str(pack / "inference.yaml"), *args], cwd=REPO)


def cut(path: Path, share: float) -> Path:
    """The first ``share`` of the file's bytes, as an interrupted download leaves it."""
    data = path.read_bytes()
    short = path.with_name(f"cut_{path.name}")
    short.write_bytes(data[: int(len(data) * share)])
    return short


# -- audio ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nan_float_wav", "cut_wav"])
def test_broken_audio_renders_what_it_holds_and_says_so(pack, tmp_path, kind):
    samples, rate = speech_clip(1.0)
    if kind == "nan_float_wav":  # a faulty effect's export: 300 NaN and 20 infinite samples
        broken = samples.copy()
        broken[4000:4300], broken[9000:9020] = np.nan, np.inf
        audio = tmp_path / "nan.wav"
        soundfile.write(audio, broken, rate, subtype="FLOAT")
        expected, said = samples.copy(), "holds 320 sample(s) that are not numbers"
        expected[4000:4300] = expected[9000:9020] = 0.0
    else:
        soundfile.write(tmp_path / "speech.wav", samples, rate)
        audio = cut(tmp_path / "speech.wav", 0.5)
        expected, said = (
            samples[: (audio.stat().st_size - 44) // 2],
            "less than its header gives: the file is likely cut",
        )
    out = tmp_path / "out"
    result = run(
        pack, "--input_image", str(EXAMPLE_IMAGE), "--input_audio", str(audio), "--output_dir", str(out), *FAST
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert said in result.stderr  # shown without --verbose
    video = out / f"portrait_{audio.stem}.mp4"
    info = probe_video(video)
    seconds = expected.shape[0] / rate
    assert info.num_frames == math.ceil(seconds * 30)
    assert abs(info.audio_duration - seconds) < 1 / 30
    decoded = decode_audio(audio).samples[0]
    np.testing.assert_allclose(decoded, expected, atol=1 / 32768)  # what drives the face and the sound alike
    track, _ = sound_track(video)
    assert np.isfinite(track).all()
    assert np.corrcoef(track[0, : expected.shape[0]], expected)[0, 1] > 0.98


def test_cut_short_is_said_only_for_files_cut_short(tmp_path):
    """Decoding alone (no render): cut MP3, FLAC and WAV files are reported with what is missing; whole files,
    and a streaming WAV whose header declares no length, are not."""
    import logging

    samples, rate = speech_clip(2.0)
    whole = [
        encode(tmp_path / "talk.mp3", "libmp3lame", samples, rate),
        encode(tmp_path / "talk.flac", "flac", samples, rate),
        encode(tmp_path / "talk.m4a", "aac", samples, rate),
    ]
    soundfile.write(tmp_path / "talk.wav", samples, rate)
    streaming = bytearray((tmp_path / "talk.wav").read_bytes())
    streaming[4:8] = struct.pack("<I", 0xFFFFFFFF)
    at = streaming.find(b"data")
    streaming[at + 4 : at + 8] = struct.pack("<I", 0xFFFFFFFF)
    (tmp_path / "streaming.wav").write_bytes(bytes(streaming))
    whole += [tmp_path / "talk.wav", tmp_path / "streaming.wav"]

    class Seen(logging.Handler):
        messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    seen = Seen()
    logging.getLogger("memo").addHandler(seen)
    try:
        for path in whole:
            seen.messages.clear()
            assert abs(decode_audio(path).seconds - 2.0) < 0.1, path
            assert not seen.messages, (path, seen.messages)
        for path in (tmp_path / "talk.mp3", tmp_path / "talk.flac", tmp_path / "talk.wav"):
            seen.messages.clear()
            decoded = decode_audio(cut(path, 0.6))
            assert decoded.seconds < 1.6 and decoded.lost_seconds > 0.4, path
            assert len(seen.messages) == 1, (path, seen.messages)
            assert "cut short" in seen.messages[0] or "s of audio lost" in seen.messages[0], seen.messages
    finally:
        logging.getLogger("memo").removeHandler(seen)


# -- settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["cfg_scale=nan", "guidance_end=inf", "audio_chunk_seconds=inf"])
def test_non_finite_settings_are_refused_before_any_work(pack, tmp_path, setting):
    samples, rate = speech_clip(1.0)
    soundfile.write(tmp_path / "speech.wav", samples, rate)
    before = listing(tmp_path)
    out = tmp_path / "out"
    args = ["--input_image", str(EXAMPLE_IMAGE), "--input_audio", str(tmp_path / "speech.wav")]
    result = run(pack, *args, "--output_dir", str(out), setting)
    key = setting.split("=")[0]
    assert_stopped_early(result, f"{key} must be a finite number")
    assert listing(tmp_path) == before


def test_a_non_finite_manifest_cell_stops_the_batch(pack, tmp_path):
    samples, rate = speech_clip(1.0)
    soundfile.write(tmp_path / "speech.wav", samples, rate)
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(f"image,audio,cfg_scale\n{EXAMPLE_IMAGE},speech.wav,nan\n")
    before = listing(tmp_path)
    args = [
        "--manifest",
        str(manifest),
        "--output_dir",
        str(tmp_path / "out"),
        "--config",
        str(pack / "inference.yaml"),
    ]
    result = run_main(batch.main, args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "line 2: Invalid settings: cfg_scale must be a finite number, got nan" in result.stderr
    assert listing(tmp_path) == before


# -- the web app ------------------------------------------------------------------------------------


def test_the_web_app_refuses_non_finite_and_fractional_numbers(pack, tmp_path, caplog):
    """The page's API takes any JSON number: NaN or a fraction for a whole-number field was an 'unexpected
    ValueError' with a traceback in the log, or silently cut (2.5 steps ran as 2)."""
    import gradio as gr

    from memo.apps.web import WebApp
    from memo.generator import MemoGenerator
    from memo.settings.inference import load_config

    samples, rate = speech_clip(1.0)
    soundfile.write(tmp_path / "speech.wav", samples, rate)
    app = WebApp(MemoGenerator(load_config(pack / "inference.yaml")), tmp_path / "web")
    image, audio = str(EXAMPLE_IMAGE), str(tmp_path / "speech.wav")
    cases = [
        (2, 3.5, math.nan, "seed must be a whole number, got nan"),
        (2.5, 3.5, 7, "inference_steps must be a whole"),
    ]
    cases += [
        (2, math.nan, 7, "cfg_scale must be a finite number, got nan"),
        (2, 3.5, math.inf, "seed must be a whole"),
    ]
    for steps, cfg_scale, seed, message in cases:
        with pytest.raises(gr.Error) as caught:
            list(  # the handler yields the live segments, then the video
                app.generate(
                    image, audio, "auto", "64x64", steps, cfg_scale, seed, "crop", "fast", progress=lambda *a, **k: None
                )
            )
        assert message in caught.value.message
    assert "Traceback" not in caplog.text and "unexpected" not in caplog.text
    assert not (tmp_path / "web").exists()


# -- output names -----------------------------------------------------------------------------------


def test_an_output_name_too_long_for_the_file_system_is_one_line(pack, tmp_path):
    """``<image>_<audio>.mp4`` over 255 bytes was an OSError traceback (exit 1) from the output check."""
    samples, rate = speech_clip(1.0)
    audio = tmp_path / f"{'interview-take-' * 10}.wav"  # each name fits; together, 267 bytes
    soundfile.write(audio, samples, rate)
    image = tmp_path / f"{'studio-portrait-' * 7}.jpg"
    image.write_bytes(EXAMPLE_IMAGE.read_bytes())
    before = listing(tmp_path)
    args = ["--input_image", str(image), "--input_audio", str(audio), "--output_dir", str(tmp_path / "out")]
    result = run(pack, *args)
    assert_stopped_early(result, "The output name 'studio-portrait-", "is 267 bytes long; a file name may have at most")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("name", ["y" * 251 + ".mp4", "é" * 125 + ".mp4"])
def test_an_output_name_that_fits_is_written_however_long(tmp_path, name):
    """A name that fits (255 bytes at most) failed with 'File name too long' for its longer hidden partial name,
    after the whole render. The writer the programs use, with a name of 255 bytes (ASCII, and 2-byte UTF-8)."""
    from memo.io.audio import audio_from_samples
    from memo.io.video import check_output_path
    from memo.io.video_writer import VideoWriter

    output = check_output_path(tmp_path / name, overwrite=False)
    with VideoWriter(output, 30, 64, 64, audio=audio_from_samples(np.zeros(1600, np.float32), 16000)) as writer:
        writer.write(np.zeros((3, 3, 64, 64), np.float32))
    assert probe_video(output).num_frames == 3
    assert listing(tmp_path) == [name]
