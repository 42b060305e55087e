"""What the MEMO nodes take from ComfyUI: its model folder, its devices and memory, its progress bar and its
stop button; and the conversions between ComfyUI's IMAGE and AUDIO values and what MEMO takes.

The contract was read from ComfyUI's sources (files and commits in the README's ComfyUI section):

- IMAGE: a float32 tensor (batch, height, width, channels) in [0, 1] (``LoadImage``).
- AUDIO: ``{"waveform": (batch, channels, samples) float tensor, "sample_rate": int}`` (``LoadAudio``).
- ``comfy.model_management.free_memory(bytes, device)`` unloads ComfyUI's own models until that much is
  free; models outside ComfyUI's model patcher are moved to the device for the work and back to
  ``unet_offload_device()`` afterwards, as ComfyUI's upscale-model node does.
- ``comfy.model_management.throw_exception_if_processing_interrupted()`` raises when the user presses stop.
- ``comfy.utils.ProgressBar(total).update_absolute(value, total, preview)`` drives the bar under the running node;
  ``preview``, ``("JPEG", PIL image, comfy.cli_args.args.preview_size)``, is the image shown under it, as the
  samplers' ``latent_preview.prepare_callback`` sends it.
- ``folder_paths.models_dir``, ``add_model_folder_path`` and ``get_folder_paths`` list model folders
  (``models/memo`` and any ``memo:`` entry of ``extra_model_paths.yaml``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import comfy.cli_args
import comfy.model_management
import comfy.utils
import folder_paths
import numpy as np
import torch
from PIL import Image

from memo.errors import UserError
from memo.generator import MemoGenerator
from memo.io.audio import DecodedAudio, audio_from_samples
from memo.loading import pick_device
from memo.settings.inference import load_config

logger = logging.getLogger("memo")

MODEL_FOLDER = "memo"
"""ComfyUI model folder type of MEMO's models: ``ComfyUI/models/memo`` unless configured otherwise."""

PEAK_BYTES_512 = int(17.6 * 2**30)
"""Peak accelerator memory of a 512x512 bf16 render with guidance (README, Speed and memory); scaled by pixel
count, plus the weights, it is what ComfyUI is asked to free before a render (an over-estimate)."""

NODE_SETTINGS = ("model_name_or_path", "weight_dtype", "device", "model_cache_dir", "speed")
"""Settings Load MEMO sets from its own inputs and ComfyUI's folders; the settings box may not set them too."""

HOST_SETTINGS = {"offload": "ComfyUI moves MEMO's models between its devices itself (they wait on its offload device)"}
"""Settings that do not apply inside ComfyUI, with the reason; the settings box refuses them."""

SETTINGS_SOURCE = "Load MEMO's settings box"

folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


class MemoNodeError(Exception):
    """A MEMO node's input is unusable; ComfyUI shows the message (one of the project's user-error messages)."""


@contextlib.contextmanager
def shown_in_comfyui() -> Iterator[None]:
    """Re-raise the project's user errors as :class:`MemoNodeError` with their message and no chained
    traceback, so ComfyUI shows what to fix; anything else passes unchanged."""
    try:
        yield
    except UserError as error:
        raise MemoNodeError(str(error)) from None


@dataclass
class MemoModel:
    """The MEMO_MODEL value: a loaded generator, kept on ``offload_device`` between renders, and the device
    renders run on."""

    generator: MemoGenerator
    device: torch.device
    offload_device: torch.device

    def modules(self, part: str) -> list:
        """What a step needs on the render device: ``"emotion"`` (emotion2vec and MEMO's emotion classifier),
        ``"conditions"`` (the audio and emotion models) or ``"all"`` (the generator: networks and conditions)."""
        conditions = self.generator.conditions
        if part == "emotion":
            return [conditions.emotion_encoder, conditions.classifier]
        return [conditions] if part == "conditions" else [self.generator]

    def weight_bytes(self, part: str) -> int:
        """Bytes of the torch weights :meth:`modules` ``(part)`` moves (emotion2vec only for ``"emotion"``: it is
        loaded on first use, perhaps never)."""
        conditions = self.generator.conditions
        modules = [conditions.classifier]
        modules += [conditions.emotion_encoder] if part == "emotion" else [conditions.audio_encoder.model]
        if part == "all":
            modules += [getattr(self.generator.pipeline, name) for name in self.generator.pipeline.components]
        tensors = [t for m in modules if isinstance(m, torch.nn.Module) for t in [*m.parameters(), *m.buffers()]]
        return sum(t.numel() * t.element_size() for t in tensors)


def model_folders() -> list[Path]:
    """ComfyUI's folders for MEMO models, the first being where hub downloads go."""
    return [Path(folder) for folder in folder_paths.get_folder_paths(MODEL_FOLDER)]


def resolve_model(name: str) -> str:
    """A folder name inside one of :func:`model_folders` becomes its path; a path or hub id is kept."""
    name = name.strip()
    if not Path(name).expanduser().is_dir():
        for folder in model_folders():
            if (folder / name).is_dir():
                return str(folder / name)
    return name


def settings_lines(settings: str) -> list[str]:
    """The settings box as ``key=value`` overrides: blank and ``#`` lines skipped, spaces around the key and
    the value trimmed. Raises :class:`MemoNodeError` for a line without ``=`` or one that sets a
    :data:`NODE_SETTINGS` key, which the node's own inputs decide."""
    lines = []
    for number, line in enumerate(settings.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, equals, value = line.partition("=")
        if not equals:
            raise MemoNodeError(f"Line {number} of {SETTINGS_SOURCE} ({line.strip()!r}) must look like key=value.")
        if key.strip() in NODE_SETTINGS:
            raise MemoNodeError(
                f"Line {number} of {SETTINGS_SOURCE} sets {key.strip()!r}, which Load MEMO's own inputs decide; "
                "remove the line and use the node's input instead."
            )
        if key.strip() in HOST_SETTINGS:
            raise MemoNodeError(
                f"Line {number} of {SETTINGS_SOURCE} sets {key.strip()!r}, which does not apply in ComfyUI: "
                f"{HOST_SETTINGS[key.strip()]}. Remove the line."
            )
        lines.append(f"{key.strip()}={value.strip()}")
    return lines


def load_memo(model: str, weight_dtype: str, device: str, settings: str, speed: str = "exact") -> MemoModel:
    """Build the generator from the node's inputs, on the offload device; hub downloads go to the first of
    :func:`model_folders`. ``settings`` holds ``key=value`` lines of ``configs/inference.yaml`` settings
    (:func:`settings_lines`). Raises :class:`MemoNodeError` for a device this machine lacks or bad settings."""
    lines = settings_lines(settings)
    with shown_in_comfyui():
        run_device = comfy.model_management.get_torch_device() if device == "auto" else pick_device(device)
    offload_device = run_device if run_device.type == "cpu" else comfy.model_management.unet_offload_device()
    overrides = [
        f"model_name_or_path={resolve_model(model)}",
        f"weight_dtype={weight_dtype}",
        f"device={offload_device.type}",
        f"model_cache_dir={model_folders()[0]}",
        f"speed={speed}",
    ]
    with shown_in_comfyui():
        config = load_config(None, overrides + lines, source=SETTINGS_SOURCE)
    generator = MemoGenerator(config)
    generator.progress_bar = False  # ComfyUI's own bar shows the progress
    return MemoModel(generator, run_device, offload_device)


@contextlib.contextmanager
def on_device(model: MemoModel, part: str, width: int = 0, height: int = 0) -> Iterator[MemoGenerator]:
    """The generator with the models of ``part`` (:meth:`MemoModel.modules`) on the render device for the
    duration, after ComfyUI has freed room for them (and for a ``width`` x ``height`` render's activations);
    back on the offload device afterwards, whatever happens."""
    if model.device.type != "cpu":
        required = model.weight_bytes(part) + PEAK_BYTES_512 * width * height // (512 * 512)
        comfy.model_management.free_memory(required, model.device)
    modules = model.modules(part)
    try:
        for module in modules:
            module.to(model.device)
        yield model.generator
    finally:
        for module in modules:
            module.to(model.offload_device)
        comfy.model_management.soft_empty_cache()


class NodeProgress:
    """ComfyUI's bar under the running node over ``total`` steps, moved by the generator's progress callback (which
    also stops the render when the user interrupts), with the last frame of each finished clip as its preview
    image (:meth:`show_clip`): what ComfyUI's samplers send, ``("JPEG", PIL image, args.preview_size)``."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.value = 0
        self.bar = comfy.utils.ProgressBar(total)

    def __call__(self, fraction: float, _text: str) -> None:
        self.value = round(fraction * self.total)
        self.bar.update_absolute(self.value, self.total)
        comfy.model_management.throw_exception_if_processing_interrupted()

    def show_clip(self, frames: torch.Tensor) -> None:
        """Show the last frame of a finished clip, (3, frames, height, width) in [0, 1], under the node."""
        last = frames[:, -1].detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)
        picture = Image.fromarray(np.ascontiguousarray(last.cpu().numpy()), mode="RGB")
        self.bar.update_absolute(self.value, self.total, ("JPEG", picture, comfy.cli_args.args.preview_size))


def image_to_pil(image: torch.Tensor) -> Image.Image:
    """The first picture of an IMAGE (batch, height, width, channels) in [0, 1] as an RGB PIL image.

    Raises :class:`MemoNodeError` for another shape or an empty batch; values above 1 (a picture in 0..255)
    are clamped with a warning."""
    if image.dim() != 4 or image.shape[-1] not in (1, 3, 4):
        raise MemoNodeError(f"Expected an IMAGE of shape (batch, height, width, channels), got {tuple(image.shape)}.")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise MemoNodeError(f"The IMAGE input holds no picture (shape {tuple(image.shape)}); connect a portrait.")
    pixels = image[0, ..., :3].expand(*image.shape[1:3], 3) if image.shape[-1] == 1 else image[0, ..., :3]
    pixels = pixels.detach().float().cpu()
    if pixels.max() > 1:
        logger.warning(
            "MEMO: the IMAGE input reaches %.4g but ComfyUI images are 0..1; values above 1 become white. "
            "Divide it by 255 if it is in 0..255.",
            float(pixels.max()),
        )
    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def pil_to_image(picture: Image.Image) -> torch.Tensor:
    """An RGB PIL image as an IMAGE of one picture, (1, height, width, 3) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]


def frames_to_image(clips: list[torch.Tensor]) -> torch.Tensor:
    """Generated clips, each (3, frames, height, width) in [0, 1], as one IMAGE batch (frames, height, width, 3)."""
    return torch.cat(clips, dim=1).permute(1, 2, 3, 0).float().contiguous()


def audio_to_decoded(audio: dict) -> DecodedAudio:
    """The AUDIO value as the decoded audio MEMO takes from a file (its 16 kHz copy via ``.mono()``); one clip only."""
    waveform = audio["waveform"]
    if waveform.dim() != 3 or waveform.shape[0] != 1:
        raise MemoNodeError(
            f"Expected one AUDIO clip, waveform (1, channels, samples); got shape {tuple(waveform.shape)}. "
            "Pass a single clip."
        )
    with shown_in_comfyui():
        return audio_from_samples(waveform[0], audio["sample_rate"], "The AUDIO input")
