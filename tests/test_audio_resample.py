"""Audio already in memory (as a host program such as ComfyUI holds it) becomes the same 16 kHz mono waveform
that decoding a file gives."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import REPO

from memo.constants import SAMPLE_RATE
from memo.io.audio import AudioError, audio_from_samples, load_audio

SPEECH = REPO / "assets" / "examples" / "speech.wav"


def test_in_memory_audio_matches_the_decoded_file(tmp_path):
    speech, rate = sf.read(SPEECH, dtype="float32")
    clip = speech[: rate * 2]
    stereo = np.stack(
        [np.interp(np.arange(0, len(clip), rate / 44100), np.arange(len(clip)), clip * g) for g in (1.0, 0.4)]
    )
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo.T, 44100, subtype="FLOAT")

    resampled = audio_from_samples(torch.from_numpy(stereo), 44100).mono()
    decoded = load_audio(path)
    assert resampled.dtype == torch.float32 and resampled.shape == decoded.shape == (2 * SAMPLE_RATE,)
    assert torch.allclose(resampled, decoded, atol=1e-6)
    mono = torch.from_numpy(clip)
    assert torch.equal(audio_from_samples(mono, SAMPLE_RATE).mono(), mono)  # already 16 kHz mono: unchanged


def test_unusable_in_memory_audio_is_named():
    with pytest.raises(AudioError, match="The AUDIO input holds no audio samples"):
        audio_from_samples(torch.zeros(2, 0), 44100, "The AUDIO input")
    with pytest.raises(AudioError, match="NaN or infinite"):
        audio_from_samples(torch.tensor([[0.0, float("inf")]]), 44100)
