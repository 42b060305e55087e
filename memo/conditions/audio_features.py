"""Audio features of MEMO: wav2vec2 hidden states resampled to video frames and windowed around each frame.

The waveform (16 kHz mono) is normalised as a whole by the wav2vec2 feature extractor; the number of video
frames is ``ceil(seconds x fps)``, rounded up to whole clips by zero-padding the normalised waveform. The
convolutional features are resampled linearly to exactly one vector per video frame, then run through the
feature projection and the transformer; the hidden states of every transformer layer are stacked, and each
frame takes the window of frames i-2 ... i+2 (clamped at the ends).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

from memo.io.hub import resolve_model_dir

SAMPLE_RATE = 16000
WINDOW = 2
"""Each frame sees the features of WINDOW frames on either side."""


@dataclass
class AudioFeatures:
    """Windowed features (frames, 2*WINDOW+1, layers, dim) of a padded whole number of clips, and the number
    of frames the audio itself lasts (the length of the final video)."""

    windows: torch.Tensor
    num_frames: int


def video_frame_count(num_samples: int, fps: float) -> int:
    """Frames of a video at ``fps`` that covers ``num_samples`` samples at 16 kHz: ceil(duration x fps)."""
    return math.ceil(num_samples / SAMPLE_RATE * fps)


def frame_windows(hidden: torch.Tensor, radius: int = WINDOW) -> torch.Tensor:
    """(frames, layers, dim) -> (frames, 2*radius+1, layers, dim): each frame with its neighbours, clamped."""
    frames = hidden.shape[0]
    offsets = torch.arange(-radius, radius + 1, device=hidden.device)
    index = (torch.arange(frames, device=hidden.device)[:, None] + offsets).clamp(0, frames - 1)
    return hidden[index]


class Wav2VecAudioEncoder:
    """A transformers wav2vec2 model and its feature extractor, producing MEMO's per-frame audio features."""

    def __init__(self, model: Wav2Vec2Model, feature_extractor: Wav2Vec2FeatureExtractor):
        if model.config.do_stable_layer_norm:
            raise ValueError("Only post-norm wav2vec2 encoders (such as facebook/wav2vec2-base-960h) are supported.")
        self.model = model.eval().requires_grad_(False)
        self.feature_extractor = feature_extractor

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike = "facebook/wav2vec2-base-960h", **kwargs
    ) -> "Wav2VecAudioEncoder":
        """Load from a local directory or a hub repo id (only the files needed are fetched)."""
        directory = resolve_model_dir(
            name_or_path, ["config.json", "preprocessor_config.json", "*.safetensors"], **kwargs
        )
        return cls(Wav2Vec2Model.from_pretrained(directory), Wav2Vec2FeatureExtractor.from_pretrained(directory))

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def normalise(self, waveform: torch.Tensor) -> torch.Tensor:
        """The feature extractor's whole-waveform normalisation, (samples,) -> (samples,) float32."""
        values = self.feature_extractor(waveform.cpu().numpy(), sampling_rate=SAMPLE_RATE).input_values[0]
        return torch.as_tensor(values, dtype=torch.float32)

    @torch.no_grad()
    def hidden_states(self, normalised: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Every transformer layer's output at ``num_frames`` evenly resampled positions: (frames, layers, dim)."""
        model = self.model
        dtype = next(model.parameters()).dtype
        conv = model.feature_extractor(normalised.to(self.device, dtype)[None])  # (1, C, T)
        conv = F.interpolate(conv.float(), size=num_frames, mode="linear", align_corners=True).to(dtype)
        x, _ = model.feature_projection(conv.transpose(1, 2))
        encoder = model.encoder
        x = encoder.layer_norm(x + encoder.pos_conv_embed(x))
        layers = []
        for layer in encoder.layers:
            out = layer(x)
            x = out[0] if isinstance(out, tuple) else out
            layers.append(x[0])
        return torch.stack(layers, dim=1)

    def __call__(self, waveform: torch.Tensor, fps: float, frames_per_clip: int) -> AudioFeatures:
        """Features of a 16 kHz mono waveform for a video at ``fps`` made of clips of ``frames_per_clip``."""
        normalised = self.normalise(waveform)
        num_frames = video_frame_count(normalised.shape[0], fps)
        if num_frames == 0:
            raise ValueError("The audio is shorter than one video frame.")
        padded_frames = math.ceil(num_frames / frames_per_clip) * frames_per_clip
        missing = padded_frames - num_frames
        if missing:
            normalised = F.pad(normalised, (0, missing * (SAMPLE_RATE // int(fps))))
        windows = frame_windows(self.hidden_states(normalised, padded_frames))
        return AudioFeatures(windows=windows.cpu(), num_frames=num_frames)
