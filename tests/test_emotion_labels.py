"""MEMO's per-frame emotion labels: batched labelling equals the original's window-by-window loop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memo.conditions.emotion import audio_emotion_labels, emotion_windows, forced_emotion_labels
from memo.constants import EMOTION_NAMES, SAMPLE_RATE
from memo.models.emotion2vec import Emotion2VecEncoder
from memo.models.emotion_classifier import AudioEmotionClassifierModel

REFERENCE = Path(
    os.environ.get("MEMO_EMOTION2VEC_REFERENCE", Path(__file__).resolve().parents[2] / "shared/reference/emotion2vec")
)
CLASSIFIER = Path(__file__).resolve().parents[2] / "shared/reference/checkpoint/misc/audio_emotion_classifier"

requires_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"no emotion2vec reference at {REFERENCE}")


@pytest.fixture(scope="module")
def encoder() -> Emotion2VecEncoder:
    return Emotion2VecEncoder.from_pretrained(REFERENCE / "checkpoint")


@pytest.fixture(scope="module")
def classifier(encoder: Emotion2VecEncoder) -> AudioEmotionClassifierModel:
    """The tiny published classifier if it fits the tiny encoder's width, else a seeded random one that does.

    The random one is centred on the features of a calibration signal (fc1's bias cancels their mean) and
    scaled up, so that its labels depend on how windows differ and vary over time.
    """
    if CLASSIFIER.is_dir():
        tiny = AudioEmotionClassifierModel.from_pretrained(CLASSIFIER)
        if tiny.layers.fc1.in_features == encoder.embed_dim:
            return tiny.eval()
    torch.manual_seed(0)
    model = AudioEmotionClassifierModel(num_classifier_layers=2, num_classifier_channels=8, input_dim=encoder.embed_dim)
    calibration = _speechlike(6.0, seed=1).view(3, -1)
    with torch.inference_mode():
        centre = encoder.utterance_features(calibration).mean(dim=0)
    with torch.no_grad():
        model.layers.fc1.weight.mul_(20.0)
        model.layers.fc1.bias.copy_(-model.layers.fc1.weight @ centre)
    return model.eval()


def _reference_labels(wav, encoder, classifier, num_frames: int) -> torch.Tensor:
    """The original's loop, one window at a time, with Python slicing."""
    sr = SAMPLE_RATE

    def label(x: torch.Tensor) -> int:
        x = F.layer_norm(x, x.shape).view(1, -1)
        return int(classifier(encoder(x).mean(dim=1)).argmax(dim=-1))

    lab = torch.full_like(wav, -1, dtype=torch.int32)
    with torch.inference_mode():
        lab[:sr] = label(wav[: 2 * sr])
        for i in range(sr, len(wav) - sr, sr):
            lab[i : i + sr] = label(wav[i - sr : i + 2 * sr])
        lab[-sr:] = label(wav[-2 * sr :])
    return F.interpolate(lab[None, None].float(), size=num_frames, mode="nearest")[0, 0].long()


def _speechlike(seconds: float, seed: int) -> torch.Tensor:
    """Noise under a slowly varying envelope and pitch, so windows differ from each other."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    envelope = 0.5 + 0.5 * torch.sin(2 * torch.pi * 0.7 * t) ** 2
    tone = torch.sin(2 * torch.pi * (150 + 80 * torch.sin(2 * torch.pi * 0.3 * t)) * t)
    noise = torch.randn(t.shape, generator=generator) * torch.linspace(0.05, 1.0, t.numel())
    return envelope * (tone + noise)


@requires_reference
@pytest.mark.parametrize("seconds", [7.3, 2.5, 1.5, 0.6, 2.0, 3.0])
def test_batched_labels_equal_window_by_window(seconds: float, encoder, classifier) -> None:
    wav = _speechlike(seconds, seed=int(seconds * 10))
    num_frames = round(seconds * 25)
    ours = audio_emotion_labels(wav, encoder, classifier, num_frames, batch_size=4)
    reference = _reference_labels(wav, encoder, classifier, num_frames)
    assert ours.shape == (num_frames,)
    assert ours.dtype == torch.long
    assert ((ours >= 0) & (ours < len(EMOTION_NAMES))).all()
    assert torch.equal(ours, reference)


@requires_reference
def test_labels_vary_and_follow_frame_count(encoder, classifier) -> None:
    """The test signal really exercises several labels, and any frame count is honoured."""
    wav = _speechlike(7.3, seed=73)
    labels = audio_emotion_labels(wav, encoder, classifier, num_frames=219)
    assert labels.unique().numel() > 1
    for num_frames in (1, 30, 1000):
        assert audio_emotion_labels(wav, encoder, classifier, num_frames).shape == (num_frames,)


def test_windows_cover_every_sample_like_python_slicing() -> None:
    sr = SAMPLE_RATE
    for num_samples in (1, sr // 2, sr, sr + 1, 2 * sr - 1, 2 * sr, 2 * sr + 1, 3 * sr, int(7.3 * sr), 60 * sr):
        windows = emotion_windows(num_samples)
        covered = torch.zeros(num_samples, dtype=torch.bool)
        for w in windows:
            covered[w.label_start : w.label_stop] = True
            assert 0 <= w.start < w.stop <= num_samples
            assert w.stop - w.start in {min(num_samples, 2 * sr)} | set(range(2 * sr + 1, 3 * sr + 1))
        assert covered.all(), num_samples
    assert len(emotion_windows(60 * sr)) == 60


@requires_reference
def test_bad_inputs_are_refused(encoder, classifier) -> None:
    with pytest.raises(ValueError, match="mono"):
        audio_emotion_labels(torch.zeros(2, SAMPLE_RATE), encoder, classifier, num_frames=25)
    with pytest.raises(ValueError, match="empty"):
        audio_emotion_labels(torch.zeros(0), encoder, classifier, num_frames=25)
    with pytest.raises(ValueError, match="shorter than the encoder's minimum"):
        audio_emotion_labels(torch.randn(100), encoder, classifier, num_frames=25)


def test_forced_emotion() -> None:
    labels = forced_emotion_labels("happy", 40)
    assert labels.shape == (40,) and labels.dtype == torch.long
    assert (labels == EMOTION_NAMES.index("happy")).all()
    for class_id, name in enumerate(EMOTION_NAMES):
        assert forced_emotion_labels(name.upper(), 3).tolist() == [class_id] * 3
    with pytest.raises(ValueError) as error:
        forced_emotion_labels("ecstatic", 10)
    assert "ecstatic" in str(error.value)
    assert all(name in str(error.value) for name in EMOTION_NAMES)


def test_labels_as_text_spans_and_edited_back():
    from memo.conditions.emotion import (
        EmotionOverrideError,
        apply_emotion_overrides,
        emotion_spans,
        format_emotion_spans,
    )

    labels = torch.tensor([4] * SAMPLE_RATE + [3] * (SAMPLE_RATE // 2))  # 1 s neutral, then 0.5 s happy
    text = format_emotion_spans(emotion_spans(labels))
    assert text == "0.00-1.00 s: neutral\n1.00-1.50 s: happy"
    assert torch.equal(apply_emotion_overrides(torch.zeros_like(labels), text), labels)

    edited = apply_emotion_overrides(labels, "# edited by hand\n0.25-0.5: Sad\n\n  # the end\n1.2-end s: angry")
    assert format_emotion_spans(emotion_spans(edited)) == (
        "0.00-0.25 s: neutral\n0.25-0.50 s: sad\n0.50-1.00 s: neutral\n1.00-1.20 s: happy\n1.20-1.50 s: angry"
    )
    assert torch.equal(labels, torch.tensor([4] * SAMPLE_RATE + [3] * (SAMPLE_RATE // 2)))  # a copy was edited
    for line, message in [
        ("one: happy", "line 1 .* must look like"),
        ("0-1: glad", "line 1: unknown emotion 'glad'"),
        ("2-3: happy", "inside the audio"),
        ("1-0.5: happy", "inside the audio"),
    ]:
        with pytest.raises(EmotionOverrideError, match=message):
            apply_emotion_overrides(labels, line)
