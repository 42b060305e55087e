"""A tiny random stand-in for MEMO's vocal separator, ``misc/vocal_separator/Kim_Vocal_2.onnx``.

Same ONNX contract as the real MDX-Net model (input named ``input``, spectrogram chunks
[batch, 4, dim_f, dim_t] in, the same shape out), a few hundred weights instead of 66 MB, and smaller
spectrogram settings so separation takes well under a second per ten seconds of audio on a CPU. Its
parameters go in ``Kim_Vocal_2.params.json`` beside it, where :class:`memo.conditions.vocals.VocalSeparator`
looks before UVR's hash-keyed table (which cannot know a random file).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from memo.io.hub import VOCAL_SEPARATOR_FILE
from memo.io.partial import write_atomically

MODEL_FILENAME = VOCAL_SEPARATOR_FILE

TINY_SEPARATOR_PARAMS = {
    "compensate": 1.0,
    "mdx_dim_f_set": 256,
    "mdx_dim_t_set": 6,
    "mdx_n_fft_scale_set": 2048,
    "primary_stem": "Vocals",
    "hop_length": 1024,
}
"""n_fft 2048 (dim_f 256 <= 1025 bins, hop 1024 <= n_fft) and dim_t 2^6 = 64 frames per chunk; the
segment size follows dim_t, so onnxruntime runs the model directly."""


class _TinyMask(nn.Module):
    """A soft mask over the spectrogram chunk, from two small convolutions: output = input * mask."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(4, hidden, 3, padding=1), nn.Tanh(), nn.Conv2d(hidden, 4, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.net(x))


def write_tiny_vocal_separator(directory: str | os.PathLike, seed: int = 0) -> None:
    """Write ``Kim_Vocal_2.onnx`` (seeded random weights) and ``Kim_Vocal_2.params.json`` into ``directory``
    (created if needed), e.g. ``<tiny MEMO>/misc/vocal_separator``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dim_f = TINY_SEPARATOR_PARAMS["mdx_dim_f_set"]
    dim_t = 2 ** TINY_SEPARATOR_PARAMS["mdx_dim_t_set"]

    generator = torch.Generator().manual_seed(seed)
    model = _TinyMask().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, not gone
        torch.onnx.export(
            model,
            (torch.zeros(1, 4, dim_f, dim_t),),
            buffer,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=13,
            dynamo=False,
        )
    write_atomically(directory / MODEL_FILENAME, buffer.getvalue())
    sidecar = directory / f"{Path(MODEL_FILENAME).stem}.params.json"
    write_atomically(sidecar, (json.dumps(TINY_SEPARATOR_PARAMS, indent=2) + "\n").encode())
