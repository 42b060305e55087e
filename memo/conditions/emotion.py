"""Per-frame emotion labels for MEMO, from the speech (emotion2vec + MEMO's classifier) or forced by name.

MEMO labels every second of audio with the emotion of a window around it (2 s at the ends, 3 s inside),
then resamples the per-sample labels to the video's frame count. The windows are classified in batches of
equal length, which gives the same labels as the original's one-window-at-a-time loop, much faster.

The labels can be read and edited as text, one span of seconds per line (``0.00-2.00 s: happy``): what
:func:`format_emotion_spans` writes, :func:`apply_emotion_overrides` reads back over existing labels.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from memo.constants import EMOTION_NAMES, SAMPLE_RATE
from memo.errors import UserError
from memo.models.emotion2vec import Emotion2VecEncoder
from memo.models.emotion_classifier import AudioEmotionClassifierModel


@dataclass(frozen=True)
class EmotionWindow:
    """Audio samples [start, stop) are classified; the label goes to samples [label_start, label_stop)."""

    start: int
    stop: int
    label_start: int
    label_stop: int


def emotion_windows(num_samples: int, sample_rate: int = SAMPLE_RATE) -> list[EmotionWindow]:
    """MEMO's windows, in the order their labels are written (later ones overwrite earlier ones).

    Bounds follow Python slicing of the original (``wav[:2*sr]``, ``wav[i-sr:i+2*sr]``, ``wav[-2*sr:]``,
    ``lab[:sr]``, ``lab[i:i+sr]``, ``lab[-sr:]``), clamped to the audio, so short audio behaves the same.
    """
    sr = sample_rate
    windows = [EmotionWindow(0, min(2 * sr, num_samples), 0, min(sr, num_samples))]
    for i in range(sr, num_samples - sr, sr):
        windows.append(EmotionWindow(i - sr, min(i + 2 * sr, num_samples), i, min(i + sr, num_samples)))
    windows.append(EmotionWindow(max(num_samples - 2 * sr, 0), num_samples, max(num_samples - sr, 0), num_samples))
    return windows


@torch.inference_mode()
def classify_windows(
    wav: torch.Tensor,
    spans: Sequence[tuple[int, int]],
    encoder: Emotion2VecEncoder,
    classifier: AudioEmotionClassifierModel,
    batch_size: int = 16,
    progress: bool | None = None,
) -> dict[tuple[int, int], int]:
    """Emotion class id of each ``wav[start:stop]``, each window standardised on its own.

    Windows of equal length are stacked into batches (the encoder has no padding mask, so lengths are
    never mixed); only one batch is on the device at a time, which bounds memory for long audio.
    """
    unique = list(dict.fromkeys(spans))
    by_length: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for span in unique:
        by_length[span[1] - span[0]].append(span)
    show = len(unique) > 4 * batch_size if progress is None else progress
    classifier_param = next(classifier.parameters())
    labels: dict[tuple[int, int], int] = {}
    with tqdm(total=len(unique), desc="emotion labels", unit="window", disable=not show) as bar:
        for group in by_length.values():
            for first in range(0, len(group), batch_size):
                batch = group[first : first + batch_size]
                windows = torch.stack([wav[start:stop] for start, stop in batch])
                features = encoder.mean_features(encoder.normalize_waveform(windows))
                probabilities = classifier(features.to(device=classifier_param.device, dtype=classifier_param.dtype))
                for span, label in zip(batch, probabilities.argmax(dim=-1).tolist()):
                    labels[span] = label
                bar.update(len(batch))
    return labels


def sample_emotion_labels(
    wav: torch.Tensor | np.ndarray,
    encoder: Emotion2VecEncoder,
    classifier: AudioEmotionClassifierModel,
    batch_size: int = 16,
    progress: bool | None = None,
) -> torch.Tensor:
    """Emotion class id of every sample (samples,) int64 of a mono 16 kHz waveform, as MEMO labels it.

    Each second takes the label of a window around it (see :func:`emotion_windows`). ``progress`` None shows
    a progress bar only when there are many windows.
    """
    wav = torch.as_tensor(wav, dtype=torch.float32).detach().cpu()
    if wav.dim() != 1:
        raise ValueError(f"expected a mono waveform of shape (samples,), got {tuple(wav.shape)}; mix or pick a channel")
    if wav.numel() == 0:
        raise ValueError("cannot label the emotion of empty audio")
    windows = emotion_windows(wav.numel())
    labels = classify_windows(
        wav, [(w.start, w.stop) for w in windows], encoder, classifier, batch_size=batch_size, progress=progress
    )
    per_sample = torch.full((wav.numel(),), -1, dtype=torch.long)
    for window in windows:
        per_sample[window.label_start : window.label_stop] = labels[(window.start, window.stop)]
    return per_sample


def frame_emotion_labels(per_sample: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Per-sample labels resampled to ``num_frames`` video frames with nearest interpolation: (num_frames,) int64."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    return F.interpolate(per_sample[None, None].float(), size=num_frames, mode="nearest")[0, 0].long()


def audio_emotion_labels(
    wav: torch.Tensor | np.ndarray,
    encoder: Emotion2VecEncoder,
    classifier: AudioEmotionClassifierModel,
    num_frames: int,
    batch_size: int = 16,
    progress: bool | None = None,
) -> torch.Tensor:
    """Per-frame emotion class ids (``num_frames``, int64) of a mono 16 kHz waveform, as MEMO computes them.

    ``num_frames`` is the video's frame count; per-sample labels are resampled to it with nearest
    interpolation. ``progress`` None shows a progress bar only when there are many windows.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    per_sample = sample_emotion_labels(wav, encoder, classifier, batch_size=batch_size, progress=progress)
    return frame_emotion_labels(per_sample, num_frames)


def emotion_id(name: str) -> int:
    """Class id of an emotion name (case-insensitive); ValueError listing the valid names otherwise."""
    key = name.strip().lower()
    if key not in EMOTION_NAMES:
        raise ValueError(f"unknown emotion {name!r}; valid emotions: {', '.join(EMOTION_NAMES)}")
    return EMOTION_NAMES.index(key)


def forced_emotion_labels(name: str, num_frames: int) -> torch.Tensor:
    """The same emotion for every frame: (``num_frames``,) int64 filled with the class id of ``name``."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    return torch.full((num_frames,), emotion_id(name), dtype=torch.long)


class EmotionOverrideError(UserError, ValueError):
    """An emotion override line cannot be read."""


@dataclass(frozen=True)
class EmotionSpan:
    """Seconds [start, stop) of the audio that share one emotion."""

    start: float
    stop: float
    emotion: str


def emotion_spans(per_sample: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> list[EmotionSpan]:
    """Runs of equal per-sample labels (samples,) as spans of seconds, in order."""
    labels = per_sample.detach().cpu().long()
    if labels.numel() == 0:
        return []
    change = torch.nonzero(labels[1:] != labels[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), labels.numel()]
    return [
        EmotionSpan(start / sample_rate, stop / sample_rate, EMOTION_NAMES[int(labels[start])])
        for start, stop in zip(bounds[:-1], bounds[1:])
    ]


def format_emotion_spans(spans: Sequence[EmotionSpan]) -> str:
    """One line per span, ``START-STOP s: emotion`` with seconds to two decimals."""
    return "\n".join(f"{span.start:.2f}-{span.stop:.2f} s: {span.emotion}" for span in spans)


def apply_emotion_overrides(per_sample: torch.Tensor, text: str, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Per-sample labels with the spans of ``text`` written over them (later lines win); a copy.

    Blank lines and ``#`` comment lines are skipped. Each other line is ``START-STOP: emotion`` or
    ``START-STOP s: emotion`` in seconds, as :func:`format_emotion_spans` writes; STOP may be ``end``. Raises
    :class:`EmotionOverrideError` naming the line when it cannot be read, names an unknown emotion, or lies
    outside the audio.
    """
    labels = per_sample.detach().cpu().long().clone()
    seconds = labels.numel() / sample_rate
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        span, _, name = line.partition(":")
        start, _, stop = span.strip().removesuffix("s").strip().partition("-")
        try:
            first = float(start)
            last = seconds if stop.strip().lower() == "end" else float(stop)
        except ValueError:
            raise EmotionOverrideError(
                f"Emotion line {number} ({line.strip()!r}) must look like '1.5-3: happy' (seconds, then an emotion)."
            ) from None
        try:
            label = emotion_id(name.strip())
        except ValueError as error:
            raise EmotionOverrideError(f"Emotion line {number}: {error}.") from None
        if not 0 <= first < last or first >= seconds:
            raise EmotionOverrideError(
                f"Emotion line {number} ({line.strip()!r}) must span seconds inside the audio (0-{seconds:.2f} s)."
            )
        labels[round(first * sample_rate) : round(min(last, seconds) * sample_rate)] = label
    return labels
