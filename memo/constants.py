"""The few facts the whole package shares, stated once.

Sources: the published MEMO release (``memoavatar/memo``: its audio models take 16 kHz mono; its emotion
classifier's nine labels, in the order of its output layer, are emotion2vec_plus_large's).
"""

from __future__ import annotations

import torch

SAMPLE_RATE = 16000
"""Hz: the sample rate of the audio the audio models (wav2vec2, emotion2vec, vocal separation's output) take."""

EMOTION_NAMES = ("angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised", "unknown")
"""MEMO's emotion labels, index = class id of the emotion classifier and of the audio module's label embedding."""

NUM_EMOTIONS = len(EMOTION_NAMES)
"""Emotion classes; label ``NUM_EMOTIONS`` is the dropped (unconditional) emotion."""

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""Weight dtype names accepted by every setting, and the torch dtype each stands for."""

SEED_MAX = 2**64 - 1
"""The largest seed ``torch.Generator.manual_seed`` takes (seeds are 0..SEED_MAX)."""
