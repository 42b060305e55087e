"""Inference settings: the YAML file, ``key=value`` overrides, and their validation.

The settings, their types and defaults are the fields of :class:`InferenceConfig`; a YAML file (such as
``configs/inference.yaml``) and command-line ``key=value`` overrides set them. An unknown key, a value of
the wrong type or an invalid choice is a :class:`ConfigError` that names it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from memo.constants import DTYPES, EMOTION_NAMES
from memo.errors import UserError
from memo.runtime.parallel import PARALLEL_CHOICES
from memo.sampling.speed import SpeedSettings, resolve_speed, speed_problems

logger = logging.getLogger("memo")

WEIGHT_DTYPES = tuple(DTYPES)
FRAMINGS = ("crop", "stretch")
DEVICES = ("auto", "cpu", "cuda", "mps")
COMPILE_CHOICES = ("auto", "true", "false")
OFFLOAD_CHOICES = ("none", "model", "group")

LEGACY_KEYS = {
    "enable_xformers_memory_efficient_attention": "attention always runs through PyTorch's scaled_dot_product_attention",
}
"""Keys of the original release's config that have no effect here: accepted with a warning."""


class ConfigError(UserError, ValueError):
    """A setting is unknown, of the wrong type, or out of range."""


@dataclass
class InferenceConfig:
    """Every inference setting with its default."""

    # Models: local directories or Hugging Face repo ids.
    model_name_or_path: str = "memoavatar/memo"
    vae: str = "stabilityai/sd-vae-ft-mse"
    wav2vec: str = "facebook/wav2vec2-base-960h"
    emotion2vec: str = "emotion2vec/emotion2vec_plus_large"
    misc_model_dir: str | None = None  # holds misc/face_analysis and misc/vocal_separator; default: the model

    # Video.
    resolution: int = 512
    width: int | None = None
    height: int | None = None
    fps: int = 30
    num_generated_frames_per_clip: int = 16
    num_init_past_frames: int = 16
    num_past_frames: int = 16
    inference_steps: int = 20
    cfg_scale: float = 3.5
    seed: int = 42

    # Conditions.
    framing: str = "crop"
    allow_no_face: bool = False
    vocal_separation: bool = True
    emotion: str = "auto"

    # Runtime.
    device: str = "auto"
    weight_dtype: str = "bf16"
    vae_batch_size: int = 8
    audio_chunk_seconds: float = 60.0
    crf: int = 18

    # Speed (memo/speed.py): a preset, and settings that override its values (None: the preset's).
    speed: str = "exact"
    solver: str | None = None
    solver_steps: int | None = None
    guidance_start: float | None = None
    guidance_end: float | None = None
    deep_cache_interval: int | None = None

    # Model downloads.
    model_cache_dir: str | None = None  # where hub models are downloaded; default: the Hugging Face cache

    # GPU speed and memory (memo/compilation.py, memo/placement.py).
    compile: str = "auto"
    offload: str = "none"
    vae_tile_size: int = 768
    # One video on two processes (memo/runtime/parallel.py): "guidance" runs each guidance half in its own
    # process (launch two: accelerate launch --num_processes 2 / torchrun --nproc_per_node 2); "none": one.
    parallel: str = "none"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the video."""
        return self.width or self.resolution, self.height or self.resolution

    @property
    def speed_settings(self) -> SpeedSettings:
        """The ``speed`` preset with the speed settings given explicitly applied over it."""
        return resolve_speed(self._speed_values(), self.inference_steps)

    def _speed_values(self) -> dict:
        return {name: getattr(self, name) for name in SPEED_KEYS}


SPEED_KEYS = ("speed", "solver", "solver_steps", "guidance_start", "guidance_end", "deep_cache_interval")


def validate(config: InferenceConfig) -> InferenceConfig:
    """Check values that types alone do not: choices and ranges."""
    problems = []
    width, height = config.size
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % 64:
            problems.append(f"{name} must be a positive multiple of 64, got {value}")
    if config.weight_dtype not in WEIGHT_DTYPES:
        problems.append(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {config.weight_dtype!r}")
    if config.framing not in FRAMINGS:
        problems.append(f"framing must be one of {', '.join(FRAMINGS)}, got {config.framing!r}")
    if config.device not in DEVICES:
        problems.append(f"device must be one of {', '.join(DEVICES)}, got {config.device!r}")
    if config.emotion != "auto" and config.emotion.lower() not in EMOTION_NAMES:
        problems.append(f"emotion must be 'auto' or one of {', '.join(EMOTION_NAMES)}, got {config.emotion!r}")
    positive = ("fps", "num_generated_frames_per_clip", "num_init_past_frames", "num_past_frames", "inference_steps")
    positive += ("vae_batch_size",)
    problems += [
        f"{name} must be positive, got {getattr(config, name)}" for name in positive if getattr(config, name) <= 0
    ]
    if config.num_generated_frames_per_clip > 32:
        problems.append("num_generated_frames_per_clip must be at most 32 (the temporal position table)")
    if not 0 <= config.crf <= 51:
        problems.append(f"crf must be in 0..51, got {config.crf}")
    if config.audio_chunk_seconds <= 0:
        problems.append(f"audio_chunk_seconds must be positive, got {config.audio_chunk_seconds}")
    problems += speed_problems(config._speed_values())
    config.compile = str(config.compile).lower()  # YAML and key=value give booleans as True/False
    if config.compile not in COMPILE_CHOICES:
        problems.append(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {config.compile!r}")
    if config.offload not in OFFLOAD_CHOICES:
        problems.append(f"offload must be one of {', '.join(OFFLOAD_CHOICES)}, got {config.offload!r}")
    if config.compile == "true" and config.offload == "group":
        problems.append(
            "compile=true cannot be combined with offload=group (group offloading moves weights inside the "
            "networks' forward, which a whole-graph compile cannot trace); use compile=auto or offload=model"
        )
    if config.parallel not in PARALLEL_CHOICES:
        problems.append(f"parallel must be one of {', '.join(PARALLEL_CHOICES)}, got {config.parallel!r}")
    if config.parallel == "guidance" and config.cfg_scale <= 1:
        problems.append(
            f"parallel=guidance splits the two halves of guidance, but cfg_scale={config.cfg_scale} runs without "
            "guidance; use cfg_scale above 1 or parallel=none"
        )
    if config.parallel == "guidance" and config.num_generated_frames_per_clip % 2:
        problems.append(
            "parallel=guidance needs an even num_generated_frames_per_clip (each half's frames meet the two "
            f"halves' reference frames in turn), got {config.num_generated_frames_per_clip}"
        )
    if config.vae_tile_size < 0 or config.vae_tile_size % 64:
        problems.append(f"vae_tile_size must be 0 (never tile) or a multiple of 64, got {config.vae_tile_size}")
    if problems:
        raise ConfigError("Invalid settings: " + "; ".join(problems) + ".")
    return config


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (), source: str = "the command line"
) -> InferenceConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides; validated. ``source``
    names where the overrides came from in messages."""
    known = {f.name for f in fields(InferenceConfig)}
    layers: list[DictConfig] = []
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"Config file {str(path)!r} does not exist.")
        try:
            loaded = OmegaConf.load(path)
        except Exception as error:
            raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {error}") from error
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"Config file {str(path)!r} must hold a mapping of settings.")
        layers.append(loaded)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like key=value.")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as error:
        raise ConfigError(f"Invalid override: {error}") from error
    for layer, origin in zip(layers, ([str(path)] if path is not None else []) + [source]):
        for key in list(layer.keys()):
            if key in LEGACY_KEYS:
                logger.warning("Ignoring %s from %s: %s.", key, origin, LEGACY_KEYS[key])
                del layer[key]
            elif key not in known:
                raise ConfigError(f"Unknown setting {key!r} in {origin}. Known settings: {', '.join(sorted(known))}.")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(InferenceConfig), *layers)
    except OmegaConfBaseException as error:
        reason = str(error.msg).splitlines()[0]
        raise ConfigError(f"Invalid setting {getattr(error, 'full_key', '')!r}: {reason}.") from error
    return validate(OmegaConf.to_object(merged))
