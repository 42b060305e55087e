"""The temporal memory's arithmetic, checked against a direct transcription of its definition."""

from __future__ import annotations

import pytest
import torch

from memo.models.temporal_memory import MemoryLinearAttention, TemporalMemory


def test_absorb_weights_frames_and_decays_old_memory():
    g = torch.Generator().manual_seed(0)
    keys = torch.rand(3, 2, 4, 5, generator=g)
    values = torch.randn(3, 2, 4, 5, generator=g)
    memory = TemporalMemory(decay=0.9)
    memory.absorb("layer", keys, values)
    kv = sum(0.9 ** (3 - j) * keys[:, :, j, :, None] * 0.9 ** (3 - j) * values[:, :, j, None, :] for j in range(4))
    z = sum(0.9 ** (3 - j) * keys[:, :, j] for j in range(4))
    torch.testing.assert_close(memory.states["layer"][0], kv)
    torch.testing.assert_close(memory.states["layer"][1], z)
    memory.absorb("layer", keys, values)
    torch.testing.assert_close(memory.states["layer"][0], kv * 0.9**4 + kv)
    read_kv, read_z = memory.read("layer")
    torch.testing.assert_close(read_kv, (kv * 0.9**4 + kv) * 0.9)
    torch.testing.assert_close(read_z, (z * 0.9**4 + z) * 0.9)


def test_attention_output_is_normalised_linear_attention():
    torch.manual_seed(0)
    attention = MemoryLinearAttention(dim=8, heads=2, dim_head=4, positional_encoding=False)
    attention.memory_name = "a"
    memory = TemporalMemory()
    past, frames = torch.randn(3, 5, 8), torch.randn(3, 6, 8)
    attention.remember(past, memory)
    out = attention(frames, memory)

    def heads(x):
        return x.reshape(3, -1, 2, 4).transpose(1, 2)

    q = heads(attention.to_q(frames)).softmax(-1) * 4**-0.5
    k, v = heads(attention.to_k(frames)).softmax(-2), heads(attention.to_v(frames))
    pk, pv = heads(attention.to_k(past)).softmax(-2), heads(attention.to_v(past))
    w = torch.tensor([0.9 ** (4 - j) for j in range(5)])[:, None]
    kv = 0.9 * (pk * w).transpose(-1, -2) @ (pv * w) + k.transpose(-1, -2) @ v
    z = 0.9 * (pk * w).sum(-2) + k.sum(-2)
    expected = (q @ kv) / (q @ z[..., None]).clamp(min=1e-10)
    expected = attention.to_out[0](expected.transpose(1, 2).reshape(3, 6, 8))
    torch.testing.assert_close(out, expected)


def test_reading_an_empty_memory_is_an_error():
    with pytest.raises(RuntimeError, match="first denoising step"):
        TemporalMemory().read("nowhere")
