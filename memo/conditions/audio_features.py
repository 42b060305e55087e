"""Audio features of MEMO: wav2vec2 hidden states resampled to video frames and windowed around each frame.

The waveform (16 kHz mono) is normalised as a whole by the wav2vec2 feature extractor; the number of video
frames is ``ceil(seconds x fps)``, rounded up to whole clips by zero-padding the normalised waveform. The
convolutional features are resampled linearly to exactly one vector per video frame, then run through the
feature projection and the transformer; the hidden states of every transformer layer are stacked, and each
frame takes the window of frames i-2 ... i+2 (clamped at the ends).

Memory stays bounded however long the audio is: the convolutions run over chunks of the waveform (with
the first layer's group norm taken over the whole sequence in a first pass, so the result is exact), and
the transformer runs over chunks of frames with context on both sides once the audio is longer than
``chunk_seconds`` (the original attends over the whole audio at once and runs out of memory on long files).
Windows are built per clip on request instead of materialising five copies of every frame.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

from memo.constants import SAMPLE_RATE
from memo.io.hub import WAV2VEC_FILES, WAV2VEC_REPO, resolve_model_dir
from memo.io.model_files import ModelFolder
from memo.io.model_load import ModelSpec, load_model, model_boundary, pretrained_spec

PREPROCESSOR_FILE = "preprocessor_config.json"

WINDOW = 2
"""Each frame sees the features of WINDOW frames on either side."""


@dataclass
class AudioFeatures:
    """Per-frame wav2vec2 hidden states (frames, layers, dim) for a whole number of clips, and the number of
    frames the audio itself lasts (the length of the final video). Slicing gives windowed features:
    ``features[a:b]`` is (b - a, 2*WINDOW+1, layers, dim)."""

    hidden: torch.Tensor
    num_frames: int

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, frames: slice) -> torch.Tensor:
        start, stop, step = frames.indices(len(self))
        return frame_windows(self.hidden, torch.arange(start, stop, step))

    @property
    def windows(self) -> torch.Tensor:
        """All windows at once, (frames, 2*WINDOW+1, layers, dim)."""
        return self[:]


def video_frame_count(num_samples: int, fps: float) -> int:
    """Frames of a video at ``fps`` that covers ``num_samples`` samples at 16 kHz: ceil(duration x fps)."""
    return math.ceil(num_samples / SAMPLE_RATE * fps)


def frame_windows(hidden: torch.Tensor, frames: torch.Tensor | None = None, radius: int = WINDOW) -> torch.Tensor:
    """(frames, layers, dim) -> (n, 2*radius+1, layers, dim): the given frames (default all) with their
    neighbours, indices clamped to the sequence."""
    total = hidden.shape[0]
    frames = torch.arange(total) if frames is None else frames
    offsets = torch.arange(-radius, radius + 1)
    index = (frames[:, None] + offsets).clamp(0, total - 1)
    return hidden[index.to(hidden.device)]


def wav2vec_spec(model: ModelFolder) -> ModelSpec[Wav2Vec2Model]:
    """How the wav2vec2 model of ``model.folder`` is checked and loaded (:mod:`memo.io.model_load`)."""
    return pretrained_spec(Wav2Vec2Model, model, extra=[PREPROCESSOR_FILE])


class Wav2VecAudioEncoder:
    """A transformers wav2vec2 model and its feature extractor, producing MEMO's per-frame audio features."""

    def __init__(
        self,
        model: Wav2Vec2Model,
        feature_extractor: Wav2Vec2FeatureExtractor,
        chunk_seconds: float = 60.0,
        context_seconds: float = 10.0,
    ):
        if model.config.do_stable_layer_norm:
            raise ValueError(f"Only post-norm wav2vec2 encoders (such as {WAV2VEC_REPO}) are supported.")
        self.model = model.eval().requires_grad_(False)
        self.feature_extractor = feature_extractor
        self.chunk_seconds = chunk_seconds
        self.context_seconds = context_seconds

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = WAV2VEC_REPO, **kwargs) -> Wav2VecAudioEncoder:
        """Load from a local directory or a hub repo id (only the files needed are fetched).

        ``chunk_seconds`` and ``context_seconds`` are passed on; the rest goes to the hub. Raises
        :class:`~memo.io.model_files.DamagedModelError` (one line) when a file is damaged or does not fit.
        """
        options = {k: kwargs.pop(k) for k in ("chunk_seconds", "context_seconds") if k in kwargs}
        directory = resolve_model_dir(name_or_path, list(WAV2VEC_FILES), **{"setting": "wav2vec", **kwargs})
        folder = ModelFolder("wav2vec", str(name_or_path), directory, ())
        model = load_model(wav2vec_spec(folder))
        with model_boundary(folder, [PREPROCESSOR_FILE]):
            extractor = Wav2Vec2FeatureExtractor.from_pretrained(directory)
        return cls(model, extractor, **options)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Wav2VecAudioEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.feature_extractor.conv_layers[0].conv.weight.device

    def normalise(self, waveform: torch.Tensor) -> torch.Tensor:
        """The feature extractor's whole-waveform normalisation, (samples,) -> (samples,) float32."""
        values = self.feature_extractor(waveform.cpu().numpy(), sampling_rate=SAMPLE_RATE).input_values[0]
        return torch.as_tensor(values, dtype=torch.float32)

    def conv_features(self, normalised: torch.Tensor, chunk_frames: int = 4096) -> torch.Tensor:
        """The convolutional feature encoder over a long waveform, chunk by chunk: (samples,) -> (T, C)."""
        layers = self.model.feature_extractor.conv_layers
        kernels = [layer.conv.kernel_size[0] for layer in layers]
        strides = [layer.conv.stride[0] for layer in layers]
        stride = math.prod(strides)
        field = kernels[-1]
        for k, s in zip(reversed(kernels[:-1]), reversed(strides[:-1])):
            field = (field - 1) * s + k
        total = (normalised.shape[0] - field) // stride + 1
        if total < 1:
            raise ValueError("The audio is too short for the wav2vec2 feature encoder.")
        dtype = next(self.model.parameters()).dtype
        first = layers[0]
        group_norm = getattr(first, "layer_norm", None)
        whole_sequence_norm = isinstance(group_norm, torch.nn.GroupNorm)
        stats = (
            self._first_layer_stats(normalised, first.conv, stride, field, chunk_frames)
            if whole_sequence_norm
            else None
        )
        outputs = []
        for start in range(0, total, chunk_frames):
            stop = min(start + chunk_frames, total)
            piece = normalised[start * stride : (stop - 1) * stride + field].to(self.device, dtype)[None, None]
            x = first.conv(piece)
            if stats is not None:
                mean, std = stats
                x = (x - mean) / std * group_norm.weight[:, None] + group_norm.bias[:, None]
            elif group_norm is not None:
                x = group_norm(x.transpose(-2, -1)).transpose(-2, -1)
            x = first.activation(x)
            for layer in layers[1:]:
                x = layer(x)
            outputs.append(x[0].transpose(0, 1).float().cpu())
        return torch.cat(outputs)

    def _first_layer_stats(
        self, normalised: torch.Tensor, conv: torch.nn.Conv1d, stride: int, field: int, chunk_frames: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the first convolution over the whole waveform (its group norm's
        statistics), accumulated chunk by chunk in float64."""
        kernel, step = conv.kernel_size[0], conv.stride[0]
        total = (normalised.shape[0] - kernel) // step + 1
        chunk = chunk_frames * (stride // step)
        dtype = conv.weight.dtype
        count, sums, squares = 0, 0.0, 0.0
        for start in range(0, total, chunk):
            stop = min(start + chunk, total)
            piece = normalised[start * step : (stop - 1) * step + kernel].to(self.device, dtype)[None, None]
            out = conv(piece)[0].double()
            count += out.shape[-1]
            sums = sums + out.sum(-1)
            squares = squares + (out * out).sum(-1)
        mean = sums / count
        var = (squares / count - mean * mean).clamp(min=0)
        eps = self.model.feature_extractor.conv_layers[0].layer_norm.eps
        return mean[:, None].to(dtype), (var + eps).sqrt()[:, None].to(dtype)

    @torch.no_grad()
    def hidden_states(self, normalised: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Every transformer layer's output at ``num_frames`` evenly resampled positions: (frames, layers, dim)."""
        model = self.model
        dtype = next(model.parameters()).dtype
        conv = self.conv_features(normalised).T[None]  # (1, C, T)
        conv = F.interpolate(conv, size=num_frames, mode="linear", align_corners=True)[0].T
        projected, _ = model.feature_projection(conv.to(self.device, dtype)[None])
        fps = num_frames / (normalised.shape[0] / SAMPLE_RATE)
        chunk = max(1, round(self.chunk_seconds * fps))
        context = round(self.context_seconds * fps)
        outputs = []
        for start in range(0, num_frames, chunk):
            stop = min(start + chunk, num_frames)
            lo, hi = (
                (0, num_frames) if chunk >= num_frames else (max(0, start - context), min(num_frames, stop + context))
            )
            outputs.append(self._encode(projected[:, lo:hi])[start - lo : stop - lo].cpu())
        return torch.cat(outputs)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer over (1, frames, dim) projected features -> (frames, layers, dim)."""
        encoder = self.model.encoder
        x = encoder.layer_norm(x + encoder.pos_conv_embed(x))
        layers = []
        for layer in encoder.layers:
            out = layer(x)
            x = out[0] if isinstance(out, tuple) else out
            layers.append(x[0].float())
        return torch.stack(layers, dim=1)

    def for_frames(self, waveform: torch.Tensor, num_frames: int) -> AudioFeatures:
        """Features of a 16 kHz waveform at exactly ``num_frames`` evenly spaced frames (no clip padding),
        e.g. one per frame of an existing video."""
        return AudioFeatures(hidden=self.hidden_states(self.normalise(waveform), num_frames), num_frames=num_frames)

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
        return AudioFeatures(hidden=self.hidden_states(normalised, padded_frames), num_frames=num_frames)
