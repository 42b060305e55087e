"""Spatial transformer of the diffusion net: self-attention joined by the reference image, then image cross-attention.

Each frame's tokens attend to themselves and to the reference image's tokens (the reference net's features
of the same layer); the unconditional half of a guidance batch attends to itself only. Cross-attention
then reads the face-identity tokens of the image projection.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from memo.models.temporal_memory import chunked_feed_forward


class SpatialBlock(nn.Module):
    """One transformer block: reference-joined self-attention, image cross-attention, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(query_dim=dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(
            query_dim=dim, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=dim_head, dropout=dropout
        )
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn="geglu")
        self.ff_chunks = 1

    def forward(
        self,
        x: torch.Tensor,
        reference: torch.Tensor,
        image_tokens: torch.Tensor,
        batch: int,
        drop_reference: tuple[bool, ...] | None,
    ) -> torch.Tensor:
        """x: (batch*frames, tokens, dim); reference: (items, tokens, dim) reference-frame features, row i of
        x joined by reference i mod items (items = batch, or 2 for one guidance item computed alone);
        image_tokens: (batch, n, cross_dim); drop_reference: one flag per batch item, True for those that do
        not see the reference. The flags are plain Python bools, so which rows attend to what is known when
        the network is traced (no data-dependent branch, no host synchronisation).
        """
        rows = x.shape[0]
        normed = self.norm1(x)
        # Row i of the frame batch is joined by reference i mod items (the reference is tiled, as published).
        tiles = -(-rows // reference.shape[0])
        joined = torch.cat([normed, reference.repeat(tiles, 1, 1)[:rows]], dim=1)
        if drop_reference is None or not any(drop_reference):
            attended = self.attn1(normed, encoder_hidden_states=joined)
        else:
            per_item = rows // batch
            attended = torch.cat(
                [
                    self.attn1(item) if dropped else self.attn1(item, encoder_hidden_states=item_joined)
                    for dropped, item, item_joined in zip(
                        drop_reference, normed.split(per_item), joined.split(per_item)
                    )
                ]
            )
        x = attended + x
        x = self.attn2(self.norm2(x), encoder_hidden_states=image_tokens.repeat_interleave(rows // batch, 0)) + x
        return chunked_feed_forward(self.ff, self.norm3(x), self.ff_chunks) + x


class SpatialTransformer(nn.Module):
    """Group norm, 1x1 projection into :class:`SpatialBlock` layers, and back out with a residual."""

    def __init__(
        self,
        channels: int,
        heads: int,
        cross_attention_dim: int,
        norm_num_groups: int,
        num_layers: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        dim_head = channels // heads
        inner = heads * dim_head
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            SpatialBlock(inner, heads, dim_head, cross_attention_dim, dropout) for _ in range(num_layers)
        )
        self.proj_out = nn.Conv2d(inner, channels, kernel_size=1)

    def forward(
        self,
        x: torch.Tensor,
        reference: torch.Tensor,
        image_tokens: torch.Tensor,
        batch: int,
        drop_reference: tuple[bool, ...] | None,
    ) -> torch.Tensor:
        """x: (batch*frames, C, H, W) -> same shape."""
        n, _, h, w = x.shape
        tokens = self.proj_in(self.norm(x))
        inner = tokens.shape[1]
        tokens = tokens.permute(0, 2, 3, 1).reshape(n, h * w, inner)
        for block in self.transformer_blocks:
            tokens = block(tokens, reference, image_tokens, batch, drop_reference)
        tokens = tokens.reshape(n, h, w, inner).permute(0, 3, 1, 2)
        return self.proj_out(tokens) + x
