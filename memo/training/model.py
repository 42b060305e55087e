"""The four MEMO networks as one trainable module: one call predicts the velocity of a batch of clips.

The conditioning is built by :mod:`memo.sampling.conditioning`, as the pipeline builds it, with the training's
conditioning dropout as its arguments. Per sample: the face embedding becomes image tokens; the reference image
and past frames run through the reference net at timestep 0, each with its own sample's image tokens; the audio
windows become audio tokens; and the diffusion net denoises the clip with a fresh temporal memory that it first
fills from that sample's past frames (``update_memory=True`` on an empty memory), as the pipeline does for
each clip.

The diffusion net takes one timestep per call, so the samples of a batch go through it one after the
other; the reference net and the projections run on the whole batch at once.
"""

from __future__ import annotations

import torch
from torch import nn

from memo.io.hub import NETWORK_FOLDERS
from memo.models.conditions import DiffusionConditions
from memo.models.diffusion_net import DiffusionNet
from memo.models.projections import AudioProjModel, ImageProjModel
from memo.models.reference_net import ReferenceFeatures, ReferenceNet
from memo.models.temporal_memory import TemporalMemory
from memo.sampling.conditioning import drop_emotion, encode_audio_tokens, encode_image_tokens, encode_reference
from memo.training.conditioning import ConditionDropout, DroppedConditions

NETWORK_NAMES = NETWORK_FOLDERS


def select_sample(features: ReferenceFeatures, index: int, rows: int) -> ReferenceFeatures:
    """The reference features of batch item ``index`` out of a batch whose items have ``rows`` rows each."""
    part = slice(index * rows, (index + 1) * rows)
    return ReferenceFeatures(
        down=[[feature[part] for feature in block] for block in features.down],
        mid=[feature[part] for feature in features.mid],
        up=[[feature[part] for feature in block] for block in features.up],
    )


class MemoTrainingModel(nn.Module):
    """reference_net + diffusion_net + image_proj + audio_proj, with the conditioning dropout of training."""

    def __init__(
        self,
        reference_net: ReferenceNet,
        diffusion_net: DiffusionNet,
        image_proj: ImageProjModel,
        audio_proj: AudioProjModel,
        dropout: ConditionDropout | None = None,
    ):
        super().__init__()
        self.reference_net = reference_net
        self.diffusion_net = diffusion_net
        self.image_proj = image_proj
        self.audio_proj = audio_proj
        self.dropout = dropout or ConditionDropout(0.0, 0.0, 0.0)

    def networks(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in NETWORK_NAMES}

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        reference_latents: torch.Tensor,
        face_emb: torch.Tensor,
        audio_emb: torch.Tensor,
        emotion: torch.Tensor,
        dropped: DroppedConditions | None = None,
    ) -> torch.Tensor:
        """Predict the velocity of each clip.

        Args:
            noisy_latents: (batch, 4, frames, h, w) noised clip latents.
            timesteps: (batch,) flow-matching timesteps (0..1000).
            reference_latents: (batch * (1 + past), 4, h, w): per sample, its reference image then its past frames.
            face_emb: (batch, 512) face embeddings.
            audio_emb: (batch, frames, window, layers, dim) audio windows of the clip's frames.
            emotion: (batch,) clip emotion labels.
            dropped: the samples trained without image / audio / emotion (none when not given).
        """
        batch, device = noisy_latents.shape[0], noisy_latents.device
        rows = reference_latents.shape[0] // batch
        dtype = self.diffusion_net.dtype
        if dropped is None:
            none = torch.zeros(batch, dtype=torch.bool, device=device)
            dropped = DroppedConditions(none, none, none)
        image_mode, audio_mode = self.dropout.image_mode, self.dropout.audio_mode
        drop_image = image_mode == "drop_reference"

        image_tokens = encode_image_tokens(self, face_emb, False, device, drop=dropped.image if drop_image else None)
        reference = encode_reference(
            self,
            reference_latents.to(dtype),
            image_tokens,
            own_tokens=True,  # the samples of a batch are different videos
            drop=None if drop_image else dropped.image,
        )
        audio_tokens = encode_audio_tokens(
            self, audio_emb, device, drop=dropped.audio, drop_features=audio_mode == "zero_features"
        )
        emotion = drop_emotion(emotion.long(), dropped.emotion)
        drop_reference = dropped.image if drop_image and bool(dropped.image.any()) else None

        predictions = []
        for i in range(batch):
            one = slice(i, i + 1)
            conditions = DiffusionConditions(
                reference=reference if batch == 1 else select_sample(reference, i, rows),
                image_tokens=image_tokens[one],
                audio_tokens=audio_tokens[one],
                emotion=emotion[one],
                memory=TemporalMemory(),
                drop_reference=None if drop_reference is None else (bool(drop_reference[i]),),
                update_memory=True,
            )
            predictions.append(self.diffusion_net(noisy_latents[one].to(dtype), timesteps[i], conditions))
        return torch.cat(predictions)
