"""The MEMO nodes: load the models, read the emotion of a voice, preview the face crop, render a portrait
speaking an audio clip, and paste the rendered crop back into the picture. Every node is a thin layer over
``memo.generator.MemoGenerator`` and ``memo.conditions.paste_back``.

Node classes follow ComfyUI's node definition: ``INPUT_TYPES``, ``RETURN_TYPES``, ``RETURN_NAMES``,
``FUNCTION`` and ``CATEGORY``. Values between MEMO nodes: ``MEMO_MODEL`` (a :class:`runtime.MemoModel`),
``MEMO_EMOTION`` (one emotion class id per sample of the audio at 16 kHz, a (samples,) int64 tensor) and
``MEMO_CROP`` (a :class:`CropBox`: where MEMO Face Crop framed the picture).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from memo.conditions.emotion import (
    apply_emotion_overrides,
    emotion_id,
    emotion_spans,
    format_emotion_spans,
    sample_emotion_labels,
)
from memo.conditions.paste_back import PasteBack
from memo.constants import EMOTION_NAMES
from memo.io.hub import MEMO_REPO
from memo.sampling.speed import SPEEDS
from memo.settings.inference import DEVICES, FRAMINGS, WEIGHT_DTYPES, InferenceConfig, setting_help

from .runtime import (
    MemoModel,
    MemoNodeError,
    NodeProgress,
    audio_to_decoded,
    frames_to_image,
    image_to_pil,
    load_memo,
    on_device,
    pil_to_image,
    shown_in_comfyui,
)

logger = logging.getLogger("memo")

DEFAULTS = InferenceConfig()
"""The settings' defaults, which the nodes' inputs start from."""

CATEGORY = "MEMO"
EMOTIONS = ["auto", *EMOTION_NAMES]
MAX_SEED = 0xFFFFFFFFFFFFFFFF
SIZE = {"default": 512, "min": 64, "max": 2048, "step": 64}
OVERRIDES_TOOLTIP = (
    "Lines 'START-STOP: emotion' in seconds (STOP may be 'end'), written over the labels; later lines win. "
    "The labels output uses the same form."
)


class LoadMemo:
    """Load MEMO's models once (ComfyUI keeps the result while the inputs are unchanged)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name_or_path": (
                    "STRING",
                    {
                        "default": MEMO_REPO,
                        "tooltip": (
                            "A folder in models/memo, a path, or a Hugging Face repo id (downloaded into models/memo)."
                        ),
                    },
                ),
                "weight_dtype": (
                    list(WEIGHT_DTYPES),
                    {"default": DEFAULTS.runtime.weight_dtype, "tooltip": setting_help("weight_dtype")},
                ),
                "device": (list(DEVICES), {"default": "auto", "tooltip": "auto: ComfyUI's device."}),
            },
            "optional": {
                "settings": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": (
                            "More settings of configs/inference.yaml, one key=value per line"
                            " (e.g. vocal_separation=false)."
                        ),
                    },
                ),
                "speed": (
                    list(SPEEDS),
                    {
                        "default": DEFAULTS.sampling.speed,
                        "tooltip": (
                            "exact: the published computation. fast: under a quarter of its compute, slightly"
                            " different frames (README, Speed settings)."
                        ),
                    },
                ),
            },
        }

    RETURN_TYPES = ("MEMO_MODEL",)
    RETURN_NAMES = ("memo",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads the MEMO networks, face analysis, vocal separation and the audio and emotion encoders."

    def load(
        self, model_name_or_path: str, weight_dtype: str, device: str, settings: str = "", speed: str = "exact"
    ) -> tuple[MemoModel]:
        with shown_in_comfyui():
            return (load_memo(model_name_or_path, weight_dtype, device, settings, speed),)


class MemoEmotion:
    """The emotion of every second of a voice, as MEMO reads it, to inspect, edit and feed into MEMO Generate."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "memo": ("MEMO_MODEL",),
                "audio": ("AUDIO",),
                "emotion": (
                    EMOTIONS,
                    {"default": "auto", "tooltip": "auto: read from the voice; else that emotion throughout."},
                ),
                "overrides": ("STRING", {"default": "", "multiline": True, "tooltip": OVERRIDES_TOOLTIP}),
            }
        }

    RETURN_TYPES = ("MEMO_EMOTION", "STRING")
    RETURN_NAMES = ("emotion", "labels")
    FUNCTION = "label"
    CATEGORY = CATEGORY
    DESCRIPTION = "Reads the emotion of each second of the voice (emotion2vec and MEMO's classifier)."

    def label(self, memo: MemoModel, audio: dict, emotion: str, overrides: str) -> tuple[torch.Tensor, str]:
        waveform = audio_to_decoded(audio).mono()
        with shown_in_comfyui():
            if emotion == "auto":
                with on_device(memo, "emotion") as generator:
                    conditions = generator.conditions
                    labels = sample_emotion_labels(waveform, conditions.emotion_encoder, conditions.classifier)
            else:
                labels = torch.full(waveform.shape, emotion_id(emotion), dtype=torch.long)
            labels = apply_emotion_overrides(labels, overrides)
        return labels, format_emotion_spans(emotion_spans(labels))


@dataclass(frozen=True)
class CropBox:
    """The MEMO_CROP value: the region (left, top, right, bottom, in pixels) of a picture of ``image_size``
    (width, height) that MEMO Face Crop framed at ``video_size`` (width, height); None with framing=stretch."""

    box: tuple[float, float, float, float] | None
    image_size: tuple[int, int]
    video_size: tuple[int, int]


class MemoFaceCrop:
    """The reference frame MEMO will animate: the portrait framed around its face at the video size."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "memo": ("MEMO_MODEL",),
                "image": ("IMAGE",),
                "width": ("INT", SIZE),
                "height": ("INT", SIZE),
                "framing": (
                    list(FRAMINGS),
                    {"default": DEFAULTS.conditions.framing, "tooltip": setting_help("framing")},
                ),
                "allow_no_face": (
                    "BOOLEAN",
                    {"default": DEFAULTS.conditions.allow_no_face, "tooltip": setting_help("allow_no_face")},
                ),
            }
        }

    RETURN_TYPES = ("IMAGE", "MEMO_CROP")
    RETURN_NAMES = ("reference", "crop")
    FUNCTION = "crop"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Shows the face-centred crop (or the stretched picture) that MEMO Generate starts from, and where it lies "
        "in the picture (for MEMO Paste Back)."
    )

    def crop(self, memo: MemoModel, image: torch.Tensor, width: int, height: int, framing: str, allow_no_face: bool):
        picture = image_to_pil(image)
        with shown_in_comfyui():
            generator = memo.generator.with_settings(width=width, height=height, framing=framing)
            portrait = generator.prepare_portrait(picture, "the IMAGE input", allow_no_face)
        return pil_to_image(portrait.framed), CropBox(portrait.box, picture.size, (width, height))


class MemoPasteBack:
    """The generated frames pasted back into the picture they were cut from: the video at the picture's size."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "frames": ("IMAGE", {"tooltip": "The frames of MEMO Generate (same width, height and framing)."}),
                "image": ("IMAGE", {"tooltip": "The picture given to MEMO Face Crop and MEMO Generate."}),
                "crop": ("MEMO_CROP", {"tooltip": "The crop output of MEMO Face Crop."}),
                "max_output_side": (
                    "INT",
                    {
                        "default": DEFAULTS.video.max_output_side,
                        "min": 64,
                        "max": 8192,
                        "step": 2,
                        "tooltip": setting_help("max_output_side"),
                    },
                ),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    FUNCTION = "paste"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Pastes each generated frame back onto the face crop's place in the picture, blended over a soft band: "
        "the head moves, the rest of the picture stays (docs/paste-back.md)."
    )

    def paste(self, frames: torch.Tensor, image: torch.Tensor, crop: CropBox, max_output_side: int) -> tuple:
        picture = image_to_pil(image)
        if crop.box is None:
            raise MemoNodeError(
                "MEMO Face Crop used framing=stretch, so there is no region of the picture to paste into; "
                "set its framing (and MEMO Generate's) to crop."
            )
        if picture.size != crop.image_size:
            raise MemoNodeError(
                f"The IMAGE input is {picture.width}x{picture.height} but MEMO Face Crop framed a "
                f"{crop.image_size[0]}x{crop.image_size[1]} picture; connect the same picture to both."
            )
        if frames.dim() != 4 or frames.shape[0] == 0 or frames.shape[-1] != 3:
            raise MemoNodeError(
                f"The frames input must be an IMAGE batch (frames, height, width, 3), got {tuple(frames.shape)}."
            )
        size = (int(frames.shape[2]), int(frames.shape[1]))
        if size != crop.video_size:
            raise MemoNodeError(
                f"The frames are {size[0]}x{size[1]} but MEMO Face Crop framed for {crop.video_size[0]}x"
                f"{crop.video_size[1]}; give MEMO Generate and MEMO Face Crop the same width and height."
            )
        plan = PasteBack.plan(picture, crop.box, size, max_output_side)
        width, height = plan.size
        logger.info(
            "MEMO Paste Back: %d frames of %dx%d into the picture, output %dx%d", len(frames), *size, width, height
        )
        out = torch.empty((len(frames), height, width, 3), dtype=torch.float32)
        for index, frame in enumerate(frames):
            pixels = frame.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
            out[index] = torch.from_numpy(plan.paste(np.ascontiguousarray(pixels))).float() / 255.0
        return (out,)


class MemoGenerate:
    """A video of the portrait speaking the audio: its frames, the audio, and the frame rate, for Create Video."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "memo": ("MEMO_MODEL",),
                "image": ("IMAGE", {"tooltip": "The portrait (the first picture of the batch)."}),
                "audio": ("AUDIO",),
                "emotion": (EMOTIONS, {"default": "auto", "tooltip": "Ignored when emotion labels are connected."}),
                "inference_steps": (
                    "INT",
                    {
                        "default": DEFAULTS.sampling.inference_steps,
                        "min": 1,
                        "max": 200,
                        "tooltip": setting_help("inference_steps"),
                    },
                ),
                "cfg_scale": (
                    "FLOAT",
                    {
                        "default": DEFAULTS.sampling.cfg_scale,
                        "min": 1.0,
                        "max": 20.0,
                        "step": 0.1,
                        "tooltip": setting_help("cfg_scale"),
                    },
                ),
                "seed": ("INT", {"default": DEFAULTS.sampling.seed, "min": 0, "max": MAX_SEED}),
                "width": ("INT", SIZE),
                "height": ("INT", SIZE),
                "framing": (
                    list(FRAMINGS),
                    {"default": DEFAULTS.conditions.framing, "tooltip": setting_help("framing")},
                ),
                "allow_no_face": (
                    "BOOLEAN",
                    {"default": DEFAULTS.conditions.allow_no_face, "tooltip": setting_help("allow_no_face")},
                ),
            },
            "optional": {
                "emotion_labels": ("MEMO_EMOTION",),
            },
        }

    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT")
    RETURN_NAMES = ("frames", "audio", "fps")
    FUNCTION = "generate"
    CATEGORY = CATEGORY
    DESCRIPTION = "Renders the portrait speaking the audio, exactly as long as the audio."

    def generate(
        self,
        memo: MemoModel,
        image: torch.Tensor,
        audio: dict,
        emotion: str,
        inference_steps: int,
        cfg_scale: float,
        seed: int,
        width: int,
        height: int,
        framing: str,
        allow_no_face: bool,
        emotion_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict, float]:
        if image.shape[0] > 1:
            logger.warning("MEMO Generate: the IMAGE holds %d pictures; the first is the portrait.", image.shape[0])
        portrait = image_to_pil(image)
        source = audio_to_decoded(audio)
        with shown_in_comfyui():
            settings = dict(
                inference_steps=inference_steps, cfg_scale=cfg_scale, width=width, height=height, framing=framing
            )
            generator = memo.generator.with_settings(**settings)
            # Face analysis runs in ONNX Runtime and the audio models move alone: the networks only join
            # them on the GPU for the render itself.
            reference = generator.prepare_portrait(portrait, "the IMAGE input", allow_no_face)
            with on_device(memo, "conditions"):
                prepared = generator.prepare_decoded(source, emotion, emotion_labels)
            clips: list[torch.Tensor] = []
            total = (
                len(prepared.features)
                // generator.config.sampling.num_generated_frames_per_clip
                * generator.config.sampling.speed_settings.steps
            )
            with on_device(memo, "all", width, height) as loaded:  # a fresh copy, to log the render device
                bar = NodeProgress(total)

                def on_clip(frames: torch.Tensor) -> None:
                    clips.append(frames)
                    bar.show_clip(frames)

                loaded.with_settings(**settings).render_clips(reference, prepared, seed, on_clip, bar)
        return frames_to_image(clips), audio, float(generator.config.video.fps)


NODE_CLASS_MAPPINGS = {
    "LoadMemo": LoadMemo,
    "MemoEmotion": MemoEmotion,
    "MemoFaceCrop": MemoFaceCrop,
    "MemoGenerate": MemoGenerate,
    "MemoPasteBack": MemoPasteBack,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadMemo": "Load MEMO",
    "MemoEmotion": "MEMO Emotion From Audio",
    "MemoFaceCrop": "MEMO Face Crop",
    "MemoGenerate": "MEMO Generate",
    "MemoPasteBack": "MEMO Paste Back",
}
