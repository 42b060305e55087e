"""Inference settings: one typed field per setting, read from a YAML file and ``key=value`` overrides.

The settings, their types, defaults, ranges and one line of help each are the fields of
:class:`InferenceConfig` (``python inference.py --help-settings`` lists them). A YAML file (such as
``configs/inference.yaml``) and command-line ``key=value`` overrides set them; the same names are the batch
manifest's columns, ``MemoGenerator.with_settings``' keywords, and the web app's and ComfyUI node's inputs. An
unknown key, a value of the wrong type or out of range is a :class:`ConfigError` that names it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from typing import Literal, get_args

from omegaconf import OmegaConf

from memo.constants import DTYPES, EMOTION_NAMES, SEED_MAX
from memo.io.hub import EMOTION2VEC_REPO, MEMO_REPO, VAE_REPO, WAV2VEC_REPO
from memo.runtime.parallel import PARALLEL_CHOICES
from memo.sampling.solvers import SOLVERS
from memo.sampling.speed import SPEEDS, SpeedSettings, resolve_speed, speed_problems
from memo.settings.schema import ConfigError, help_text, load_layers, range_problems, read_overrides, read_yaml, setting

__all__ = ["ConfigError", "InferenceConfig", "load_config", "validate", "settings_help"]

logger = logging.getLogger("memo")

WEIGHT_DTYPES = tuple(DTYPES)
Framing = Literal["crop", "stretch"]
Device = Literal["auto", "cpu", "cuda", "mps"]
Compile = Literal["auto", "true", "false"]
"""auto: on CUDA only. YAML's and key=value's booleans (compile: true) are read as "true"/"false"."""
Offload = Literal["none", "model", "group"]
FRAMINGS, DEVICES, OFFLOAD_CHOICES = get_args(Framing), get_args(Device), get_args(Offload)
EMOTIONS = ("auto", *EMOTION_NAMES)

LEGACY_KEYS = {
    "enable_xformers_memory_efficient_attention": (
        "attention always runs through PyTorch's scaled_dot_product_attention"
    ),
}
"""Keys of the original release's config that have no effect here: accepted with a warning."""

RENAMED: dict[str, str] = {}
"""Old setting name -> its current name; accepted with a deprecation warning (none so far for inference)."""


@dataclass
class InferenceConfig:
    """Every inference setting: its type, default, range and one line of help."""

    # Models: local directories or Hugging Face repo ids (memo.io.hub.REGISTRY).
    model_name_or_path: str = setting(
        MEMO_REPO, "MEMO networks, misc/ (face analysis, vocal separator, emotion classifier): folder or hub id"
    )
    vae: str = setting(
        VAE_REPO, "the VAE: folder or hub id (a checkpoint's own vae/ folder wins while this is the default)"
    )
    wav2vec: str = setting(WAV2VEC_REPO, "the wav2vec2 audio encoder: folder or hub id")
    emotion2vec: str = setting(
        EMOTION2VEC_REPO, "the emotion2vec speech-emotion encoder (used by emotion=auto): folder or hub id"
    )
    misc_model_dir: str | None = setting(
        None, "a folder holding misc/face_analysis and misc/vocal_separator; null: the model's"
    )

    # Video.
    resolution: int = setting(512, "square side in pixels (multiple of 64), unless width and height are set")
    width: int | None = setting(None, "video width in pixels (multiple of 64); null: resolution")
    height: int | None = setting(None, "video height in pixels (multiple of 64); null: resolution")
    fps: int = setting(30, "frames per second of the video", minimum=1)
    num_generated_frames_per_clip: int = setting(
        16, "frames generated per clip (the temporal position table holds 32)", minimum=1, maximum=32
    )
    num_init_past_frames: int = setting(16, "copies of the portrait the first clip treats as its past", minimum=1)
    num_past_frames: int = setting(16, "generated frames each later clip conditions on", minimum=1)
    inference_steps: int = setting(20, "denoising steps per clip", minimum=1)
    cfg_scale: float = setting(3.5, "classifier-free guidance scale; 1 turns it off (about twice as fast)", minimum=0.0)
    seed: int = setting(42, "random seed of the noise", minimum=0, maximum=SEED_MAX)

    # Conditions.
    framing: Framing = setting("crop", "crop: face-centred, undistorted; stretch: squash the whole image (original)")
    allow_no_face: bool = setting(False, "go on with a zero face embedding when no face is found")
    paste_back: bool = setting(False, "paste each frame back into the photo: the video at the photo's own size (crop)")
    max_output_side: int = setting(
        1920, "with paste_back, the video's longer side at most this (the photo is scaled down, never up)", minimum=64
    )
    vocal_separation: bool = setting(True, "separate the voice from music before reading the audio")
    emotion: str = setting("auto", "auto: read from the voice; or one emotion for the whole video", choices=EMOTIONS)

    # Runtime.
    device: Device = setting("auto", "auto: CUDA, then MPS, then CPU")
    weight_dtype: str = setting("bf16", "dtype of the networks' weights", choices=WEIGHT_DTYPES)
    vae_batch_size: int = setting(8, "frames per VAE call; lower it if the GPU runs out of memory", minimum=1)
    audio_chunk_seconds: float = setting(60.0, "longer audio is encoded in chunks of this many seconds", minimum=1e-3)
    crf: int = setting(18, "H.264 quality: lower is better and larger", minimum=0, maximum=51)

    # Speed (memo/sampling/speed.py): a preset, and settings that override its values (None: the preset's).
    speed: str = setting(
        "exact", "exact: the published computation; fast: under a quarter of its FLOPs", choices=SPEEDS
    )
    solver: str | None = setting(None, "step solver; null: the preset's (exact: euler, fast: unipc)", choices=SOLVERS)
    solver_steps: int | None = setting(None, "solver steps per clip (>= 1); null: the preset's")
    guidance_start: float | None = setting(None, "guidance from this fraction of the steps (0..1); null: the preset's")
    guidance_end: float | None = setting(None, "guidance up to this fraction of the steps (0..1); null: the preset's")
    deep_cache_interval: int | None = setting(
        None, "the whole net every N steps, outer layers between (1: off); null: the preset's"
    )

    # Model downloads.
    model_cache_dir: str | None = setting(None, "folder hub models are downloaded into; null: the Hugging Face cache")

    # GPU speed and memory (memo/runtime/compilation.py, memo/runtime/placement.py).
    compile: Compile = setting("auto", "torch.compile the networks: auto (on CUDA only), true or false")
    offload: Offload = setting("none", "none; model: each network on the GPU when used; group: layers streamed in")
    fp8_weights: bool = setting(
        False, "store the two large networks' weights in fp8: about half their GPU memory, not exact (README)"
    )
    vae_tile_size: int = setting(
        768, "frames with a side above this VAE-decode in tiles of this size (multiple of 64); 0: never"
    )
    parallel: str = setting(
        "none",
        "guidance: one video on two launched processes, one guidance half each; none: one process",
        choices=PARALLEL_CHOICES,
    )

    resume_snapshot_minutes: float = setting(
        10.0, "long renders: save the temporal memory for resuming every this many minutes (0: every clip)", minimum=0.0
    )

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


JOB_NEUTRAL_SETTINGS = ("model_cache_dir", "resume_snapshot_minutes")
"""The settings that change neither the frames nor the file's bytes: saved progress (``memo/io/job_state.py``)
of a render is resumed across a change of these only. Every other setting is part of a job's fingerprint: the
model and size settings, the speed settings, ``crf``, and also ``device``, ``weight_dtype``, ``offload``,
``compile``, ``parallel`` and ``vae_batch_size``, which may move the rounding of a computation."""

SPEED_KEYS = ("speed", "solver", "solver_steps", "guidance_start", "guidance_end", "deep_cache_interval")


def validate(config: InferenceConfig) -> InferenceConfig:
    """Check what types alone do not: each field's choices and range, and the rules between settings.
    Raises :class:`ConfigError` listing every problem."""
    config.compile = str(config.compile).lower()  # YAML and key=value give booleans as True/False
    config.emotion = str(config.emotion).lower()
    problems = []
    width, height = config.size
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % 64:
            problems.append(f"{name} must be a positive multiple of 64, got {value}")
    if config.emotion not in EMOTIONS:
        problems.append(f"emotion must be 'auto' or one of {', '.join(EMOTION_NAMES)}, got {config.emotion!r}")
    problems += [problem for problem in range_problems(config) if not problem.startswith("emotion ")]
    problems += speed_problems(config._speed_values())
    if config.compile == "true" and config.offload == "group":
        problems.append(
            "compile=true cannot be combined with offload=group (group offloading moves weights inside the "
            "networks' forward, which a whole-graph compile cannot trace); use compile=auto or offload=model"
        )
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
    if config.paste_back and config.framing != "crop":
        problems.append(
            f"paste_back=true needs framing=crop (framing={config.framing} animates the whole squashed picture, "
            "so there is no region to paste back into); use framing=crop or paste_back=false"
        )
    if config.vae_tile_size < 0 or config.vae_tile_size % 64:
        problems.append(f"vae_tile_size must be 0 (never tile) or a multiple of 64, got {config.vae_tile_size}")
    if problems:
        raise ConfigError("Invalid settings: " + "; ".join(dict.fromkeys(problems)) + ".")
    return config


HELP_COMMAND = "python inference.py --help-settings"


def setting_help(name: str) -> str:
    """The one line of help of setting ``name`` (for tooltips and forms)."""
    return next(f.metadata["help"] for f in fields(InferenceConfig) if f.name == name)


def settings_help() -> str:
    """The listing of ``--help-settings``: every inference setting, its type and range, default and help."""
    return help_text(
        InferenceConfig,
        "Inference settings: set them in the YAML config (--config) or as key=value; the same names work in the\n"
        "batch manifest's columns, MemoGenerator.with_settings(...), the web app and the ComfyUI node.",
    )


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (), source: str = "the command line"
) -> InferenceConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides; validated. ``source``
    names where the overrides came from in messages. Raises :class:`ConfigError` (one line naming the key)."""
    layers = [(str(path), read_yaml(path))] if path is not None else []
    layers.append((source, read_overrides(overrides)))
    merged = load_layers(InferenceConfig, layers, RENAMED, LEGACY_KEYS, HELP_COMMAND)
    return validate(OmegaConf.to_object(merged))


def check_names(settings: dict, source: str) -> dict:
    """``settings`` (name -> value, from Python) with deprecated names replaced by their current ones (with a
    warning); :class:`ConfigError` for an unknown name, with the closest valid ones."""
    from memo.settings.schema import closest

    known = [f.name for f in fields(InferenceConfig)]
    result = {}
    for name, value in settings.items():
        if name in RENAMED:
            logger.warning("%s in %s is deprecated: it is now called %s.", name, source, RENAMED[name])
            name = RENAMED[name]
        if name not in known:
            raise ConfigError(
                f"Unknown setting {name!r} in {source}{closest(name, known)} (`{HELP_COMMAND}` lists every setting)."
            )
        result[name] = value
    return result
