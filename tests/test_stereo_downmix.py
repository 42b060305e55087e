"""Stereo whose plain average loses the voice (memo.io.audio.choose_downmix): channels that cancel (one
phase-inverted), a dead channel, one channel a delayed copy of the other. Each takes the channels that keep
the voice, with a warning; ordinary stereo keeps the plain average of the original MEMO, sample for sample.

The model input (the 16 kHz mono copy) is compared on samples; the e2e test compares the frames two runs of
``inference.py`` render from (x, -x) and from mono x, and checks the sound track keeps both channels.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
from conftest import REPO

from memo.io.audio import audio_from_samples, choose_downmix, decode_audio

EXAMPLE_IMAGE = REPO / "assets" / "examples" / "portrait.jpg"
EXAMPLE_AUDIO = REPO / "assets" / "examples" / "speech.wav"
FAST = ("inference_steps=1", "cfg_scale=1", "vocal_separation=false", "emotion=neutral")


def voice(seconds: float = 3.0, rate: int = 16000) -> np.ndarray:
    """The example speech (16 kHz mono), ``seconds`` long, as float32 in [-0.9, 0.9]."""
    samples, source_rate = soundfile.read(EXAMPLE_AUDIO, dtype="float32")
    assert source_rate == rate and samples.ndim == 1
    samples = samples[: round(seconds * rate)]
    return (0.9 * samples / np.abs(samples).max()).astype(np.float32)


def delayed(samples: np.ndarray, seconds: float, rate: int = 16000) -> np.ndarray:
    shift = round(seconds * rate)
    return np.concatenate([np.zeros(shift, np.float32), samples[:-shift]])


def wav(path: Path, channels: list[np.ndarray], rate: int = 16000) -> Path:
    """16-bit PCM, the most common file; the int16 values of -x are exactly minus those of x."""
    soundfile.write(path, np.stack(channels, axis=1), rate, subtype="PCM_16")
    return path


def model_input(path: Path) -> torch.Tensor:
    return decode_audio(path).mono()


@pytest.mark.parametrize(
    ("fault", "warning"),
    [
        ("inverted", "channels cancel out when averaged"),
        ("inverted_quieter", "channels cancel out when averaged"),
        ("dead_right", "right channel is silent"),
        ("right_delayed_5ms", "right channel is the left one delayed by 5.0 ms"),
        ("left_delayed_20ms", "left channel is the right one delayed by 20.0 ms"),
    ],
)
def test_a_downmix_that_loses_the_voice_falls_back_to_the_channel_that_keeps_it(tmp_path, caplog, fault, warning):
    x = voice()
    wav(tmp_path / "mono.wav", [x])
    channels = {
        "inverted": [x, -x],
        "inverted_quieter": [x, -0.5 * x],
        "dead_right": [x, np.zeros_like(x)],
        "right_delayed_5ms": [x, delayed(x, 0.005)],
        "left_delayed_20ms": [delayed(x, 0.020), x],
    }[fault]
    wav(tmp_path / "faulty.wav", channels)
    with caplog.at_level(logging.WARNING, logger="memo"):
        faulty = model_input(tmp_path / "faulty.wav")
    assert torch.equal(faulty, model_input(tmp_path / "mono.wav"))  # the voice as a mono file gives it
    assert [record.getMessage() for record in caplog.records if warning in record.getMessage()], caplog.text
    if "delayed" not in fault:  # the plain average had lost most of the voice's level (a delay comb-filters it)
        plain = audio_from_samples(np.stack(channels).mean(axis=0), 16000).mono()
        assert faulty.pow(2).mean() > 2 * plain.pow(2).mean()


def test_the_same_fallback_for_audio_handed_over_in_memory(caplog):
    """ComfyUI's AUDIO and a notebook's array take the same path as a file."""
    x = voice(1.0)
    with caplog.at_level(logging.WARNING, logger="memo"):
        inverted = audio_from_samples(np.stack([x, -x]), 16000).mono(24000)
    assert torch.equal(inverted, audio_from_samples(x, 16000).mono(24000))
    assert "channels cancel out" in caplog.text


@pytest.mark.parametrize("kind", ["identical", "two_voices", "panned", "tones", "tiny_delay", "noisy_mics"])
def test_ordinary_stereo_keeps_the_plain_average(tmp_path, caplog, kind):
    """The original MEMO's (L+R)/2, sample for sample, and no warning."""
    x = voice()
    rng = np.random.default_rng(0)
    t = np.arange(x.shape[0]) / 16000
    channels = {
        "identical": [x, x],
        "two_voices": [x, 0.5 * x[::-1].copy()],
        "panned": [0.8 * x, 0.3 * x],
        "tones": [0.5 * np.sin(2 * np.pi * 440 * t), 0.4 * np.sin(2 * np.pi * 660 * t + 1)],
        "tiny_delay": [x, delayed(x, 0.0002)],  # 0.2 ms: a notch near 2.5 kHz... at 16 kHz, 3 samples
        "noisy_mics": [x + 0.2 * rng.standard_normal(x.shape), delayed(x, 0.003) + 0.2 * rng.standard_normal(x.shape)],
    }[kind]
    stereo = np.clip(np.stack(channels), -1, 1).astype(np.float32)
    assert choose_downmix(stereo, 16000, "stereo").channels == (0, 1)
    wav(tmp_path / "stereo.wav", list(stereo))
    decoded = decode_audio(tmp_path / "stereo.wav")
    with caplog.at_level(logging.WARNING, logger="memo"):
        mono = decoded.mono()
    assert not caplog.records, caplog.text
    assert torch.equal(mono, audio_from_samples(decoded.samples.mean(axis=0, dtype=np.float32), 16000).mono())


def test_surround_with_the_voice_in_the_centre_only():
    """5.1 dialogue with the other channels empty: the centre alone, not a sixth of it."""
    x = voice(1.0)
    channels = np.zeros((6, x.shape[0]), np.float32)
    channels[2] = x
    choice = choose_downmix(channels, 16000, "5.1")
    assert choice.channels == (2,) and "front left, front right, low frequency" in choice.reason


def frames(video: Path) -> np.ndarray:
    with av.open(str(video)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def sound(video: Path) -> np.ndarray:
    with av.open(str(video)) as container:
        return np.concatenate([frame.to_ndarray() for frame in container.decode(audio=0)], axis=1)


@pytest.mark.e2e
def test_inverted_stereo_renders_the_frames_of_its_voice(pack, tmp_path):
    x = voice(0.5)
    runs = {}
    for name, channels in (("voice", [x]), ("inverted", [x, -x])):
        audio = wav(tmp_path / f"{name}.wav", channels)
        command = [sys.executable, str(REPO / "inference.py"), "--config", str(pack / "inference.yaml")]
        command += ["--input_image", str(EXAMPLE_IMAGE), "--input_audio", str(audio)]
        command += ["--output_dir", str(tmp_path / "out"), *FAST]
        runs[name] = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900, check=False)
        assert runs[name].returncode == 0, runs[name].stderr
    assert "channels cancel out when averaged" in runs["inverted"].stderr
    assert "silent" not in runs["inverted"].stderr and "warning" not in runs["voice"].stderr.lower()
    voice_frames, inverted_frames = (
        frames(tmp_path / "out" / "portrait_voice.mp4"),
        frames(tmp_path / "out" / "portrait_inverted.mp4"),
    )
    assert voice_frames.shape[0] == 15 and np.array_equal(inverted_frames, voice_frames)
    track = sound(tmp_path / "out" / "portrait_inverted.mp4")  # the sound as given: both channels, opposite
    assert track.shape[0] == 2
    assert np.corrcoef(track[0], track[1])[0, 1] < -0.99 and np.abs(track[0]).max() > 0.5
