"""Condition projections: face embedding -> image tokens, windowed wav2vec2 features -> audio tokens per frame."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class ImageProjModel(ModelMixin, ConfigMixin):
    """A 512-d face-recognition embedding projected to ``clip_extra_context_tokens`` layer-normed tokens."""

    @register_to_config
    def __init__(
        self, cross_attention_dim: int = 768, clip_embeddings_dim: int = 512, clip_extra_context_tokens: int = 4
    ):
        super().__init__()
        self.proj = nn.Linear(clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, face_embeds: torch.Tensor) -> torch.Tensor:
        """(batch, clip_embeddings_dim) -> (batch, tokens, cross_attention_dim)."""
        tokens = self.proj(face_embeds).reshape(
            -1, self.config.clip_extra_context_tokens, self.config.cross_attention_dim
        )
        return self.norm(tokens)


class AudioProjModel(ModelMixin, ConfigMixin):
    """Each frame's window of wav2vec2 hidden states (``seq_len`` frames x ``blocks`` layers x ``channels``)
    through a three-layer MLP to ``context_tokens`` layer-normed audio tokens."""

    @register_to_config
    def __init__(
        self,
        seq_len: int = 5,
        blocks: int = 12,
        channels: int = 768,
        intermediate_dim: int = 512,
        output_dim: int = 768,
        context_tokens: int = 32,
    ):
        super().__init__()
        self.proj1 = nn.Linear(seq_len * blocks * channels, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, audio_embeds: torch.Tensor) -> torch.Tensor:
        """(batch, frames, seq_len, blocks, channels) -> (batch, frames, context_tokens, output_dim)."""
        batch, frames = audio_embeds.shape[:2]
        x = audio_embeds.reshape(batch * frames, -1)
        x = torch.relu(self.proj2(torch.relu(self.proj1(x))))
        tokens = self.proj3(x).reshape(batch, frames, self.config.context_tokens, self.config.output_dim)
        return self.norm(tokens)
