"""Random or hand-set stand-ins of the metric networks, in the published files' layouts and formats.

- ``weights-inception-2015-12-05-6726825d.pth``: a state dict of torch-fidelity's ``FeatureExtractorInceptionV3``
  with random variance-preserving weights (He-normal convolutions, identity batch norms), stored in float16;
  torch-fidelity loads it exactly as the real file.
- ``i3d_pretrained_400.pt``: a state dict of cd-fvd's ``InceptionI3d(400)``, random in the same way.
- ``syncnet_v2.model``: a SyncNet state dict of width 1 whose weights are set by hand so that it has a definite
  answer: the audio tower reports whether the sound is loud (MFCC log energy, coefficient 0, above that of a
  frame of RMS :data:`LOUD_RMS` of full scale) anywhere in the two video frames at the middle of its window, the
  lip tower whether either of the two middle frames of its window is bright (grey level above
  :data:`BRIGHT_LEVEL`), each as a number from 0 to 1. A clip whose brightness follows its loudness is in sync
  for it, and its offset is the shift between the two.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from memo.errors import EVAL_INSTALL
from memo.evaluation.models import I3D, INCEPTION, SYNCNET
from memo.models.syncnet import SyncNet

logger = logging.getLogger("memo")

LOUD_RMS = 0.15
"""RMS (fraction of full scale) above which the SyncNet stand-in hears sound (its ramp: 0.137 .. 0.183)."""
BRIGHT_LEVEL = 95.0
"""Mean grey level (0..255) of two frames above which the SyncNet stand-in sees an open mouth (ramp: 80 .. 110)."""
_C0_AT_1000 = 19.78
"""MFCC coefficient 0 (python_speech_features' log frame energy) of white noise of RMS 1000 on the int16 scale,
measured; it grows by 2 ln(ratio) with the RMS."""


def _log_energy(rms: float) -> float:
    return _C0_AT_1000 + 2.0 * math.log(rms * 32768.0 / 1000.0)


def _randomize(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                if layer.bias is not None:
                    layer.bias.zero_()
            elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.reset_parameters()
                layer.running_var.fill_(1.0 - layer.eps)
    return {k: v.half() if v.is_floating_point() else v for k, v in module.state_dict().items()}


def write_tiny_inception(path: Path, seed: int = 0) -> None:
    """torch-fidelity's Inception-v3 feature extractor with random weights, as a float16 state dict."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # The class loads its weights in __init__; build it without them, to write them.
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"), mock.patch("torch.load"):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    torch.save(_randomize(net, seed), path)


def write_tiny_i3d(path: Path, seed: int = 1) -> None:
    """cd-fvd's InceptionI3d (400 classes) with random weights, as a float16 state dict."""
    from cdfvd.third_party.i3d.pytorch_i3d import InceptionI3d

    torch.save(_randomize(InceptionI3d(400, in_channels=3), seed), path)


def _identity_norm(layer: nn.modules.batchnorm._BatchNorm) -> None:
    layer.reset_parameters()
    layer.running_var.fill_(1.0 - layer.eps)


def _ramp_head(head: nn.Sequential, low: float, high: float) -> None:
    """Make head(s) = clip((s - low) / (high - low), 0, 1) with two ReLU units."""
    gain = 1.0 / (high - low)
    head[0].weight.copy_(torch.tensor([[gain], [gain]]))
    head[0].bias.copy_(torch.tensor([-gain * low, -gain * low - 1.0]))
    _identity_norm(head[1])
    head[3].weight.copy_(torch.tensor([[1.0, -1.0]]))
    head[3].bias.zero_()


def tiny_syncnet() -> SyncNet:
    """The hand-set SyncNet stand-in described in the module docstring."""
    net = SyncNet((1,) * 6, (1,) * 6, (1, 2, 1))
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, (nn.Conv2d, nn.Conv3d)):
                layer.weight.zero_()
                layer.bias.zero_()
            elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
                _identity_norm(layer)
        audio, lip = net.netcnnaud, net.netcnnlip
        for i in (0, 4, 8, 11, 14):  # 3x3 identity taps: the MFCC image passes unchanged through the max pools
            audio[i].weight[0, 0, 1, 1] = 1.0
        # After the pools, position (0, 2) of the 5x4 map is the maximum over MFCC rows 0-4 and columns 8-14
        # of the 20-column window: coefficient 0 (the largest) in the two middle video frames.
        audio[18].weight[0, 0, 0, 2] = 1.0
        lip[0].weight[0, :, 2:4, 3, 3] = 1.0 / 6.0  # mean of the RGB values of the window's frames 2 and 3
        lip[4].weight[0, 0, 0, 2, 2] = 1.0
        for i in (8, 11, 14):
            lip[i].weight[0, 0, 0, 1, 1] = 1.0
        lip[18].weight[0, 0, 0, 2, 2] = 1.0
        _ramp_head(net.netfcaud, _log_energy(LOUD_RMS * 0.915), _log_energy(LOUD_RMS * 1.22))
        _ramp_head(net.netfclip, BRIGHT_LEVEL - 15.0, BRIGHT_LEVEL + 15.0)
    return net.eval()


def write_tiny_syncnet(path: Path) -> None:
    """The SyncNet stand-in as a state dict, the format of ``syncnet_v2.model``."""
    torch.save(tiny_syncnet().state_dict(), path)


def write_tiny_metric_models(folder: Path) -> None:
    """All three into ``folder`` (the model folder's ``metrics/``), under the published file names; the Inception
    and I3D ones only when torch-fidelity / cd-fvd (the ``eval`` extra) are installed, with a warning if not."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_syncnet(folder / SYNCNET.file)
    for write, weights, runtime in (
        (write_tiny_inception, INCEPTION, "torch_fidelity"),
        (write_tiny_i3d, I3D, "cdfvd"),
    ):
        if importlib.util.find_spec(runtime) is None:
            logger.warning("tiny pack: no %s stand-in (%s is not installed: %s)", weights.file, runtime, EVAL_INSTALL)
        else:
            write(folder / weights.file)
