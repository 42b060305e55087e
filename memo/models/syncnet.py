"""SyncNet (Chung & Zisserman, ACCV 2016 workshops), the lip-sync expert behind the Sync-C / Sync-D metrics.

The layout is that of ``syncnet_v2.model`` from the authors' release (VGG, Oxford): an audio tower on a window
of 20 MFCC frames (13 coefficients at 100 Hz, 0.2 s) and a lip tower on 5 video frames (224x224 RGB face crops
at 25 fps, raw 0..255 values), each ending in a 1024-d embedding; in sync, the two embeddings are close. The
module's key names are the file's, so the published state dict loads as it is. Layer widths are read from the
state dict, so a narrow stand-in in the same layout (the tiny pack's) loads through the same code.
"""

from __future__ import annotations

import torch
from torch import nn

MFCC_WINDOW = 20
"""MFCC frames per audio window (0.2 s at 100 Hz)."""
VIDEO_WINDOW = 5
"""Video frames per lip window (0.2 s at 25 fps)."""
FPS = 25
"""The frame rate SyncNet was trained on; other rates are resampled to it."""
MFCC_PER_FRAME = 4
"""MFCC frames per video frame (100 Hz / 25 fps)."""
CROP_SIZE = 224
"""Side of the face crop the lip tower takes."""


def _conv_bn(conv: nn.Module, width: int, dims: int) -> list[nn.Module]:
    batch_norm = nn.BatchNorm2d(width) if dims == 2 else nn.BatchNorm3d(width)
    return [conv, batch_norm, nn.ReLU()]


def _head(widths: tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(widths[0], widths[1]), nn.BatchNorm1d(widths[1]), nn.ReLU(), nn.Linear(widths[1], widths[2])
    )


class SyncNet(nn.Module):
    """The two SyncNet towers; ``audio_widths`` / ``lip_widths`` are the six conv widths of each, ``head`` the
    (in, hidden, out) sizes of each tower's fully connected head ((512, 512, 1024) in the published model)."""

    def __init__(
        self,
        audio_widths: tuple[int, ...] = (64, 192, 384, 256, 256, 512),
        lip_widths: tuple[int, ...] = (96, 256, 256, 256, 256, 512),
        head: tuple[int, int, int] = (512, 512, 1024),
    ) -> None:
        super().__init__()
        a = audio_widths
        self.netcnnaud = nn.Sequential(
            *_conv_bn(nn.Conv2d(1, a[0], 3, padding=1), a[0], 2),
            nn.MaxPool2d(1, 1),
            *_conv_bn(nn.Conv2d(a[0], a[1], 3, padding=1), a[1], 2),
            nn.MaxPool2d(3, stride=(1, 2)),
            *_conv_bn(nn.Conv2d(a[1], a[2], 3, padding=1), a[2], 2),
            *_conv_bn(nn.Conv2d(a[2], a[3], 3, padding=1), a[3], 2),
            *_conv_bn(nn.Conv2d(a[3], a[4], 3, padding=1), a[4], 2),
            nn.MaxPool2d(3, stride=2),
            *_conv_bn(nn.Conv2d(a[4], a[5], (5, 4)), a[5], 2),
        )
        v = lip_widths
        self.netcnnlip = nn.Sequential(
            *_conv_bn(nn.Conv3d(3, v[0], (5, 7, 7), stride=(1, 2, 2)), v[0], 3),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2)),
            *_conv_bn(nn.Conv3d(v[0], v[1], (1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), v[1], 3),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            *_conv_bn(nn.Conv3d(v[1], v[2], (1, 3, 3), padding=(0, 1, 1)), v[2], 3),
            *_conv_bn(nn.Conv3d(v[2], v[3], (1, 3, 3), padding=(0, 1, 1)), v[3], 3),
            *_conv_bn(nn.Conv3d(v[3], v[4], (1, 3, 3), padding=(0, 1, 1)), v[4], 3),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2)),
            *_conv_bn(nn.Conv3d(v[4], v[5], (1, 6, 6)), v[5], 3),
        )
        self.netfcaud = _head(head)
        self.netfclip = _head(head)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> SyncNet:
        """A SyncNet sized by ``state``'s weight shapes with ``state`` loaded; raises KeyError for a missing or
        unexpected tensor (a file saved before PyTorch 0.4.1 may lack the batch-norm counters, which is fine)."""
        conv_indices = (0, 4, 8, 11, 14, 18)
        audio = tuple(int(state[f"netcnnaud.{i}.weight"].shape[0]) for i in conv_indices)
        lip = tuple(int(state[f"netcnnlip.{i}.weight"].shape[0]) for i in conv_indices)
        first, last = state["netfcaud.0.weight"], state["netfcaud.3.weight"]
        net = cls(audio, lip, (int(first.shape[1]), int(first.shape[0]), int(last.shape[0])))
        result = net.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        missing = [key for key in result.missing_keys if not key.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            raise KeyError(f"not a SyncNet state dict: missing {missing}, unexpected {result.unexpected_keys}")
        return net.eval()

    def forward_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        """(N, 1, 13, 20) MFCC windows -> (N, E) audio embeddings."""
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def forward_lip(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, 5, 224, 224) face-crop windows, values 0..255 -> (N, E) lip embeddings."""
        return self.netfclip(self.netcnnlip(frames).flatten(1))
