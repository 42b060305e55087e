"""Memory-guided temporal module: linear attention over the frames of a clip plus a decaying memory of past frames.

At every spatial position the module attends across the clip's frames with linear attention. Its keys and
values are joined by a memory: the sums ``KV = sum k v^T`` and ``Z = sum k`` over the past frames fed by the
reference net, decayed by 0.9 per frame, and carried from clip to clip. The memory is an explicit
:class:`TemporalMemory` object owned by the caller (the pipeline), not state hidden in the layers.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention import FeedForward
from torch import nn


class TemporalMemory:
    """The memory of past frames of every temporal attention layer of a diffusion net.

    ``states`` maps a layer's name to ``(kv, z)``: ``kv`` of shape (positions, heads, d, d) and ``z`` of
    shape (positions, heads, d), where positions = guidance batch x height x width of that layer.
    Create one per video, :meth:`reset` it to start a new one.
    """

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.states: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset(self) -> None:
        """Forget every past frame."""
        self.states.clear()

    def restore(self, states: dict[str, tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> None:
        """Hold ``states`` (a snapshot of :attr:`states`, on any device) again, placed on ``device``."""
        self.states = {name: (kv.to(device), z.to(device)) for name, (kv, z) in states.items()}

    def __len__(self) -> int:
        return len(self.states)

    def view(self, states: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> TemporalMemory:
        """A memory placed as this one holding ``states`` (views of this one's, e.g. one guidance half)."""
        view = TemporalMemory(self.decay)
        view.states = states
        return view

    def item(self, index: int, items: int) -> TemporalMemory:
        """A read-only view of batch item ``index`` of the ``items`` whose positions this memory holds (one
        guidance half: ``items`` 2), without copying."""
        return self.view(
            {name: tuple(t.unflatten(0, (items, -1))[index] for t in state) for name, state in self.states.items()}
        )

    def absorb(self, name: str, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Fold the past frames' keys and values, (positions, heads, frames, d), into layer ``name``'s memory.

        Past frame j of n is weighted ``decay ** (n - 1 - j)`` (the newest weighs 1) in both its key and its
        value; memory already held decays by ``decay ** n`` first, as that many frames have passed.
        """
        frames = keys.shape[-2]
        exponents = torch.arange(frames - 1, -1, -1, device=keys.device, dtype=keys.dtype)
        weights = (self.decay**exponents)[:, None]
        keys, values = keys * weights, values * weights
        kv = torch.einsum("phfd,phfe->phde", keys, values)
        z = keys.sum(dim=-2)
        if name in self.states:
            old_kv, old_z = self.states[name]
            carried = self.decay**frames
            kv, z = old_kv * carried + kv, old_z * carried + z
        self.states[name] = (kv, z)

    def _entry(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.states:
            raise RuntimeError(
                f"Temporal memory has no entry for {name!r}: "
                "the first denoising step of a video must update the memory."
            )
        return self.states[name]

    def read(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory of layer ``name``, decayed by one frame as the current clip sees it."""
        kv, z = self._entry(name)
        return kv * self.decay, z * self.decay

    def add_to(self, name: str, kv: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv`` and ``z`` of the current frames with layer ``name``'s memory (as :meth:`read` gives it) added
        in place, without copying the memory."""
        memory_kv, memory_z = self._entry(name)
        return kv.add_(memory_kv, alpha=self.decay), z.add_(memory_z, alpha=self.decay)


def chunked_feed_forward(ff: nn.Module, x: torch.Tensor, chunks: int) -> torch.Tensor:
    """``ff(x)`` computed on ``chunks`` slices of the rows of ``x`` (dim 0) one after the other, so that its
    hidden layer (4x wider than ``x``, GEGLU's doubled) is never held whole; 1 runs it whole."""
    if chunks <= 1 or x.shape[0] < chunks:
        return ff(x)
    return torch.cat([ff(rows) for rows in x.chunk(chunks)])


def set_feed_forward_chunks(network: nn.Module, chunks: int) -> None:
    """Run every feed-forward layer of ``network`` in ``chunks`` row chunks (:func:`chunked_feed_forward`)."""
    for module in network.modules():
        if hasattr(module, "ff_chunks"):
            module.ff_chunks = chunks


class PositionalEncoding(nn.Module):
    """Sinusoidal frame-position encoding; the table is a checkpoint buffer (``pe``)."""

    def __init__(self, dim: int, max_len: int = 32):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(position * div_term)
        pe[0, :, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, frames, dim) -> the same with each frame's position added."""
        if x.shape[1] > self.pe.shape[1]:
            raise ValueError(f"{x.shape[1]} frames exceed the positional table of {self.pe.shape[1]}.")
        return x + self.pe[:, : x.shape[1]].to(x.dtype)


class MemoryLinearAttention(nn.Module):
    """Linear attention across frames whose keys and values are extended by a :class:`TemporalMemory`.

    Queries are softmax-normalised over channels and keys over frames; the output is
    ``q (KV_mem + sum k v^T) / max(q (Z_mem + sum k), 1e-10)``.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, max_len: int = 32, positional_encoding: bool = True):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.pos_encoder = PositionalEncoding(dim, max_len) if positional_encoding else None
        self.memory_name = ""

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(positions, frames, inner) -> (positions, heads, frames, d)."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def remember(self, past: torch.Tensor, memory: TemporalMemory) -> None:
        """Add the past frames (positions, past_frames, dim), already normalised, to the memory."""
        keys = self._heads(self.to_k(past)).softmax(dim=-2)
        values = self._heads(self.to_v(past))
        memory.absorb(self.memory_name, keys, values)

    def forward(self, x: torch.Tensor, memory: TemporalMemory) -> torch.Tensor:
        """(positions, frames, dim) normalised frames -> attention output of the same shape."""
        if self.pos_encoder is not None:
            x = self.pos_encoder(x)
        q = self._heads(self.to_q(x)).softmax(dim=-1) * self.scale
        k = self._heads(self.to_k(x)).softmax(dim=-2)
        v = self._heads(self.to_v(x))
        kv, z = memory.add_to(self.memory_name, torch.einsum("phfd,phfe->phde", k, v), k.sum(dim=-2))
        numerator = torch.einsum("phfd,phde->phfe", q, kv)
        denominator = torch.einsum("phfd,phd->phf", q, z).unsqueeze(-1)
        out = (numerator / denominator.clamp(min=1e-10)).transpose(1, 2).flatten(2)
        return self.to_out[1](self.to_out[0](out))


class TemporalTransformerBlock(nn.Module):
    """Pre-norm memory attention layers, then a GEGLU feed-forward, each with a residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, num_attention_blocks: int, max_len: int, pos_enc: bool):
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            MemoryLinearAttention(dim, heads, dim_head, max_len, pos_enc) for _ in range(num_attention_blocks)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_attention_blocks))
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)
        self.ff_chunks = 1

    def forward(self, x: torch.Tensor, past: torch.Tensor | None, memory: TemporalMemory) -> torch.Tensor:
        """x: (positions, frames, dim); past: (positions, past_frames, dim) when the memory is to be updated."""
        for attention, norm in zip(self.attention_blocks, self.norms):
            if past is not None:
                attention.remember(norm(past), memory)
            x = attention(norm(x), memory) + x
        return chunked_feed_forward(self.ff, self.ff_norm(x), self.ff_chunks) + x


class TemporalTransformer(nn.Module):
    """Group norm and projection into the temporal blocks, and back out with a residual."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        num_layers: int,
        num_attention_blocks: int,
        max_len: int,
        pos_enc: bool,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(inner, heads, dim_head, num_attention_blocks, max_len, pos_enc)
            for _ in range(num_layers)
        )
        self.proj_out = nn.Linear(inner, channels)

    def _tokens(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """(batch*frames, C, H, W) -> normalised, projected (batch*H*W, frames, inner)."""
        n, c, h, w = x.shape
        x = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(n, h * w, c))
        # contiguous: a batch of one would otherwise stay a strided view, and the kernels that follow round
        # differently on it than on the copy a larger batch makes (guidance-parallel generation is exact).
        return x.unflatten(0, (batch, n // batch)).transpose(1, 2).flatten(0, 1).contiguous()

    def forward(
        self, x: torch.Tensor, batch: int, past_frames: torch.Tensor | None, memory: TemporalMemory
    ) -> torch.Tensor:
        """x: (batch*frames, C, H, W); past_frames: (batch*past, C, H, W) or None when the memory is not updated."""
        n, c, h, w = x.shape
        tokens = self._tokens(x, batch)
        past = self._tokens(past_frames, batch) if past_frames is not None else None
        for block in self.transformer_blocks:
            tokens = block(tokens, past, memory)
        tokens = self.proj_out(tokens).unflatten(0, (batch, h * w)).transpose(1, 2)
        return tokens.reshape(n, h, w, c).contiguous().permute(0, 3, 1, 2) + x  # contiguous: as in _tokens


class TemporalMemoryModule(nn.Module):
    """The motion module of one diffusion-net layer (checkpoint prefix ``temporal_transformer``)."""

    def __init__(
        self,
        in_channels: int,
        num_attention_heads: int = 8,
        num_transformer_block: int = 1,
        attention_block_types: tuple[str, ...] = ("Temporal_Self", "Temporal_Self"),
        temporal_position_encoding: bool = True,
        temporal_position_encoding_max_len: int = 32,
        temporal_attention_dim_div: int = 1,
    ):
        super().__init__()
        unsupported = [kind for kind in attention_block_types if kind != "Temporal_Self"]
        if unsupported:
            raise ValueError(f"Unsupported temporal attention block types {unsupported}; only 'Temporal_Self' exists.")
        self.temporal_transformer = TemporalTransformer(
            channels=in_channels,
            heads=num_attention_heads,
            dim_head=in_channels // num_attention_heads // temporal_attention_dim_div,
            num_layers=num_transformer_block,
            num_attention_blocks=len(attention_block_types),
            max_len=temporal_position_encoding_max_len,
            pos_enc=temporal_position_encoding,
        )

    def forward(
        self, x: torch.Tensor, batch: int, past_frames: torch.Tensor | None, memory: TemporalMemory
    ) -> torch.Tensor:
        return self.temporal_transformer(x, batch, past_frames, memory)
