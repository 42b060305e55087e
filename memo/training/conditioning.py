"""Conditioning dropout for classifier-free guidance: which samples of a batch train without which condition.

Each sample independently loses, with its own probability:

* the image: in ``zero_reference`` mode (the original's training) the latents of its reference image and
  past frames are replaced by zeros before the reference net, the face tokens being kept; in
  ``drop_reference`` mode (what the pipeline's unconditional branch sees) its frames do not attend to the
  reference image and its face tokens are those of a zero face embedding;
* the audio: in ``zero_features`` mode (the original's training) the audio projection sees zero wav2vec2
  features; in ``zero_tokens`` mode (the pipeline's unconditional branch) the audio tokens are zeros;
* the emotion: its label becomes 9, the unconditional label. The original trains no such per-sample drop
  (probability 0 by default); it relies on the diffusion net's own label dropout (``emo_drop_rate`` in its
  config, 5% per adaptive norm), which is active in training mode either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memo.settings.training import AudioDropMode, DropoutSettings, ImageDropMode


@dataclass
class DroppedConditions:
    """(batch,) bool masks: the samples trained without image, audio or emotion conditioning."""

    image: torch.Tensor
    audio: torch.Tensor
    emotion: torch.Tensor


@dataclass
class ConditionDropout:
    """Probabilities and modes of the three condition dropouts (see the module docstring)."""

    image_ratio: float = 0.05
    audio_ratio: float = 0.05
    emotion_ratio: float = 0.0
    image_mode: ImageDropMode = "zero_reference"
    audio_mode: AudioDropMode = "zero_features"

    @classmethod
    def from_settings(cls, settings: DropoutSettings) -> ConditionDropout:
        """The dropout as the ``dropout`` settings say (checked when they loaded)."""
        return cls(
            image_ratio=settings.uncond_img_ratio,
            audio_ratio=settings.uncond_audio_ratio,
            emotion_ratio=settings.uncond_emotion_ratio,
            image_mode=settings.uncond_img_mode,
            audio_mode=settings.uncond_audio_mode,
        )

    def sample(self, batch: int, device: torch.device | str = "cpu") -> DroppedConditions:
        """Draw which samples lose which condition (from torch's global generator)."""
        draws = torch.rand(3, batch)
        masks = draws < torch.tensor([self.image_ratio, self.audio_ratio, self.emotion_ratio])[:, None]
        masks = masks.to(device)
        return DroppedConditions(image=masks[0], audio=masks[1], emotion=masks[2])
