"""Emotion-aware audio module: joint video-audio attention with emotion-conditioned adaptive layer norms.

Video tokens of each frame and that frame's audio tokens first attend within themselves, then jointly
(one attention over both sequences, as in SD3's joint blocks), each followed by a feed-forward. Every norm
before an attention is an adaptive layer norm whose shift and scale come from the clip's emotion label.
The audio tokens leave the module updated and flow on to the next audio module of the network. Each module
adds its input tokens to its output once more, so their magnitude doubles from module to module (about 2^16
by the end of the published network): the audio stream is therefore carried in float32 whatever the
network's dtype, or float16 would overflow.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.models.embeddings import LabelEmbedding
from diffusers.models.normalization import FP32LayerNorm
from torch import nn

from memo.constants import NUM_EMOTIONS
from memo.models.temporal_memory import chunked_feed_forward


class EmotionAdaLayerNorm(nn.Module):
    """Layer norm without affine whose shift and scale are predicted from an emotion label."""

    def __init__(self, dim: int, drop_rate: float):
        super().__init__()
        self.class_embedder = LabelEmbedding(NUM_EMOTIONS, dim, drop_rate)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-5)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, emotion: torch.Tensor) -> torch.Tensor:
        """x: (batch*frames, tokens, dim); emotion: (batch,) labels, one per guidance batch."""
        shift, scale = self.adaLN_modulation(self.class_embedder(emotion)).chunk(2, dim=-1)
        rows = x.shape[0] // emotion.shape[0]
        shift = shift.repeat_interleave(rows, 0).unsqueeze(1)
        scale = scale.repeat_interleave(rows, 0).unsqueeze(1)
        return self.norm(x) * (1 + scale) + shift


class JointAudioBlock(nn.Module):
    """Self-attention of video and of audio tokens, their joint attention, and a feed-forward for each.

    The last block of the network (``is_final``) returns no audio tokens and has no audio output layers.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, audio_dim: int, drop_rate: float, is_final: bool):
        super().__init__()
        self.is_final = is_final
        self.norm1 = EmotionAdaLayerNorm(dim, drop_rate)
        self.attn1 = Attention(query_dim=dim, heads=heads, dim_head=dim_head)
        self.audio_norm1 = EmotionAdaLayerNorm(audio_dim, drop_rate)
        self.audio_attn1 = Attention(query_dim=audio_dim, heads=heads, dim_head=dim_head)
        self.norm2 = EmotionAdaLayerNorm(dim, drop_rate)
        self.audio_norm2 = EmotionAdaLayerNorm(audio_dim, drop_rate)
        self.attn2 = Attention(
            query_dim=dim,
            cross_attention_dim=dim,
            added_kv_proj_dim=audio_dim,
            heads=heads,
            dim_head=dim_head,
            out_dim=dim,
            out_context_dim=audio_dim,
            context_pre_only=is_final,
            processor=JointAttnProcessor2_0(),
        )
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_chunks = 1
        self.norm3 = nn.LayerNorm(dim)
        if not is_final:
            self.audio_ff = FeedForward(audio_dim, activation_fn="geglu")
            self.audio_norm3 = FP32LayerNorm(audio_dim)

    def forward(
        self, x: torch.Tensor, audio: torch.Tensor, emotion: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (batch*frames, tokens, dim); audio: (batch*frames, audio_tokens, audio_dim) in float32."""
        dtype = x.dtype
        x = self.attn1(self.norm1(x, emotion)) + x
        audio = self.audio_attn1(self.audio_norm1(audio, emotion).to(dtype)) + audio
        joint_x, joint_audio = self.attn2(self.norm2(x, emotion), self.audio_norm2(audio, emotion).to(dtype))
        x = joint_x + x
        x = chunked_feed_forward(self.ff, self.norm3(x), self.ff_chunks) + x
        if self.is_final:
            return x, None
        audio = joint_audio + audio
        return x, self.audio_ff(self.audio_norm3(audio).to(dtype)) + audio


class AudioModule(nn.Module):
    """Group norm and 1x1 projection into :class:`JointAudioBlock` layers, and back out with residuals.

    ``inner_channels`` (heads x head width) may differ from ``channels``: the published network sizes the
    up blocks' audio modules by the channels of their skip input.
    """

    def __init__(
        self,
        channels: int,
        inner_channels: int,
        heads: int,
        audio_dim: int,
        norm_num_groups: int,
        drop_rate: float,
        is_final: bool = False,
        num_layers: int = 1,
    ):
        super().__init__()
        dim_head = inner_channels // heads
        inner_channels = heads * dim_head
        self.is_final = is_final
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            JointAudioBlock(
                inner_channels, heads, dim_head, audio_dim, drop_rate, is_final=is_final and i == num_layers - 1
            )
            for i in range(num_layers)
        )
        self.proj_out = nn.Conv2d(inner_channels, channels, kernel_size=1)

    def forward(
        self, x: torch.Tensor, audio: torch.Tensor, emotion: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (batch*frames, C, H, W); audio: (batch*frames, audio_tokens, audio_dim) -> (x, audio or None).

        The audio tokens are taken and returned in float32."""
        n, _, h, w = x.shape
        tokens = self.proj_in(self.norm(x))
        inner = tokens.shape[1]
        tokens = tokens.permute(0, 2, 3, 1).reshape(n, h * w, inner)
        audio_in = audio
        for block in self.transformer_blocks:
            tokens, audio = block(tokens, audio, emotion)
        tokens = tokens.reshape(n, h, w, inner).permute(0, 3, 1, 2)
        # As published, the module adds its input audio tokens once more on the way out.
        return self.proj_out(tokens) + x, None if self.is_final else audio + audio_in
