"""Inference settings: typed sections, read from a YAML file and ``key=value`` overrides.

:class:`InferenceConfig` is composed of sections, each the settings one part of generation takes:
:class:`ModelSettings` (the loader), :class:`RuntimeSettings` (device, dtype, compilation, offloading),
:class:`MemorySettings` (the VAE's batches and tiles), :class:`VideoSettings` (the video written),
:class:`ConditionSettings` (portrait and emotion), :class:`SamplingSettings` (clips, steps, guidance, seed,
speed) and :class:`ResumeSettings`. Each field has its type (a choice is a ``Literal``), default, range and
one line of help; ``python inference.py --help-settings`` lists them by section. The sections are flat: users
write every setting under its own name (``fps``, held in ``config.video``), in a YAML file (such as
``configs/inference.yaml``), as command-line ``key=value`` overrides, as the batch manifest's columns,
``MemoGenerator.with_settings``' keywords, and the web app's and ComfyUI node's inputs. :func:`load_config`
returns the checked, frozen objects (the only check; later code trusts them). An unknown key, a value of the
wrong type or out of range is a :class:`ConfigError` that names it.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import os
from dataclasses import dataclass
from typing import Any, Literal, get_args

from omegaconf import OmegaConf

from memo.constants import DTYPES, EMOTION_NAMES, SEED_MAX
from memo.io.hub import EMOTION2VEC_REPO, MEMO_REPO, VAE_REPO, WAV2VEC_REPO
from memo.runtime.parallel import PARALLEL_CHOICES
from memo.sampling.solvers import SOLVERS
from memo.sampling.speed import SPEEDS, SpeedSettings, resolve_speed, speed_problems
from memo.settings.schema import (
    ConfigError,
    closest,
    help_text,
    leaves,
    load_layers,
    range_problems,
    read_overrides,
    read_yaml,
    section,
    setting,
    setting_names,
    setting_paths,
)

__all__ = ["ConfigError", "InferenceConfig", "load_config", "validate", "settings_help"]

logger = logging.getLogger("memo")

WeightDtype = Literal[tuple(DTYPES)]
Framing = Literal["crop", "stretch"]
Device = Literal["auto", "cpu", "cuda", "mps"]
Compile = Literal["auto", "true", "false"]
"""auto: on CUDA only. YAML's and key=value's booleans (compile: true) are read as "true"/"false"."""
Offload = Literal["none", "model", "group"]
Speed = Literal[SPEEDS]
Solver = Literal[SOLVERS]
Parallel = Literal[PARALLEL_CHOICES]
WEIGHT_DTYPES, FRAMINGS, DEVICES, OFFLOAD_CHOICES = (get_args(kind) for kind in (WeightDtype, Framing, Device, Offload))
EMOTIONS = ("auto", *EMOTION_NAMES)

MAX_FPS = 120
"""The highest ``fps``: above any screen's rate; wav2vec2 reads the voice 50 times a second, so more frames only
interpolate between its features (and a huge rate leaves no audio samples per frame)."""
MAX_VAE_BATCH_SIZE = 64
"""The largest ``vae_batch_size``: twice the longest clip (32 frames); a larger batch saves no time and only
adds memory."""
MAX_AUDIO_CHUNK_SECONDS = 300
"""The longest ``audio_chunk_seconds``: wav2vec2 attends over a whole chunk, whose memory grows with the square
of its length (300 s, 15000 features: about 11 GB of float32 attention scores per layer)."""

LEGACY_KEYS = {
    "enable_xformers_memory_efficient_attention": (
        "attention always runs through PyTorch's scaled_dot_product_attention"
    ),
}
"""Keys of the original release's config that have no effect here: accepted with a warning."""

RENAMED: dict[str, str] = {}
"""Old setting name -> its current name; accepted with a deprecation warning (none so far for inference)."""


@dataclass(frozen=True)
class ModelSettings:
    """Which models load: the checkpoint, the VAE and the audio encoders (local folders or Hugging Face repo ids,
    memo.io.hub.REGISTRY), and how the audio models run. The loader (memo/loading.py) takes this section."""

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
    model_cache_dir: str | None = setting(None, "folder hub models are downloaded into; null: the Hugging Face cache")
    vocal_separation: bool = setting(True, "separate the voice from music before reading the audio")
    audio_chunk_seconds: float = setting(
        60.0,
        f"longer audio is encoded in chunks of this many seconds (at most {MAX_AUDIO_CHUNK_SECONDS:g}: wav2vec2's "
        "attention memory grows with the square of a chunk's length)",
        minimum=1e-3,
        maximum=MAX_AUDIO_CHUNK_SECONDS,
    )


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how the networks run: device, dtype, compilation, offloading, parallel processes
    (memo/runtime/). Like the models section, these are fixed when a generator loads."""

    device: Device = setting("auto", "auto: CUDA, then MPS, then CPU")
    weight_dtype: WeightDtype = setting("bf16", "dtype of the networks' weights")
    compile: Compile = setting("auto", "torch.compile the networks: auto (on CUDA only), true or false")
    offload: Offload = setting("none", "none; model: each network on the GPU when used; group: layers streamed in")
    fp8_weights: bool = setting(
        False, "store the two large networks' weights in fp8: about half their GPU memory, not exact (README)"
    )
    parallel: Parallel = setting(
        "none", "guidance: one video on two launched processes, one guidance half each; none: one process"
    )


@dataclass(frozen=True)
class MemorySettings:
    """How the VAE's work is cut to fit in memory (memo/pipeline)."""

    vae_batch_size: int = setting(
        8,
        f"frames per VAE call; lower it if the GPU runs out of memory (at most {MAX_VAE_BATCH_SIZE}: the frames "
        "of two clips)",
        minimum=1,
        maximum=MAX_VAE_BATCH_SIZE,
    )
    vae_tile_size: int = setting(
        768, "frames with a side above this VAE-decode in tiles of this size (multiple of 64); 0: never"
    )


@dataclass(frozen=True)
class VideoSettings:
    """The video written: its size, frame rate, quality, and pasting back into the photo (memo/io/video.py,
    memo/conditions/paste_back.py)."""

    resolution: int = setting(512, "square side in pixels (multiple of 64), unless width and height are set")
    width: int | None = setting(None, "video width in pixels (multiple of 64); null: resolution")
    height: int | None = setting(None, "video height in pixels (multiple of 64); null: resolution")
    fps: int = setting(
        30,
        f"frames per second of the video (at most {MAX_FPS}: above that the audio holds too few samples per frame "
        "for wav2vec2's features)",
        minimum=1,
        maximum=MAX_FPS,
    )
    crf: int = setting(18, "H.264 quality: lower is better and larger", minimum=0, maximum=51)
    paste_back: bool = setting(False, "paste each frame back into the photo: the video at the photo's own size (crop)")
    max_output_side: int = setting(
        1920, "with paste_back, the video's longer side at most this (the photo is scaled down, never up)", minimum=64
    )

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the video in pixels."""
        return self.width or self.resolution, self.height or self.resolution


@dataclass(frozen=True)
class ConditionSettings:
    """How the portrait and the voice become conditions: framing, a missing face, the emotion."""

    framing: Framing = setting("crop", "crop: face-centred, undistorted; stretch: squash the whole image (original)")
    allow_no_face: bool = setting(False, "go on with a zero face embedding when no face is found")
    emotion: str = setting("auto", "auto: read from the voice; or one emotion for the whole video", choices=EMOTIONS)


@dataclass(frozen=True)
class SamplingSettings:
    """How the video is generated clip by clip: clip lengths, denoising steps, guidance, the seed, and the
    speed preset with the settings that override its values (None: the preset's; memo/sampling/speed.py)."""

    num_generated_frames_per_clip: int = setting(
        16, "frames generated per clip (the temporal position table holds 32)", minimum=1, maximum=32
    )
    num_init_past_frames: int = setting(16, "copies of the portrait the first clip treats as its past", minimum=1)
    num_past_frames: int = setting(16, "generated frames each later clip conditions on", minimum=1)
    inference_steps: int = setting(20, "denoising steps per clip", minimum=1)
    cfg_scale: float = setting(3.5, "classifier-free guidance scale; 1 turns it off (about twice as fast)", minimum=0.0)
    seed: int = setting(42, "random seed of the noise", minimum=0, maximum=SEED_MAX)
    speed: Speed = setting("exact", "exact: the published computation; fast: under a quarter of its FLOPs")
    solver: Solver | None = setting(None, "step solver; null: the preset's (exact: euler, fast: unipc)")
    solver_steps: int | None = setting(None, "solver steps per clip (>= 1); null: the preset's")
    guidance_start: float | None = setting(None, "guidance from this fraction of the steps (0..1); null: the preset's")
    guidance_end: float | None = setting(None, "guidance up to this fraction of the steps (0..1); null: the preset's")
    deep_cache_interval: int | None = setting(
        None, "the whole net every N steps, outer layers between (1: off); null: the preset's"
    )

    @property
    def speed_settings(self) -> SpeedSettings:
        """The ``speed`` preset with the speed settings given explicitly applied over it."""
        return resolve_speed(self.speed_values(), self.inference_steps)

    def speed_values(self) -> dict:
        """The speed settings as ``name -> value`` (None: the preset's)."""
        return {name: getattr(self, name) for name in SPEED_KEYS}


@dataclass(frozen=True)
class ResumeSettings:
    """Saving a long render's progress for resuming (memo/io/job_state.py)."""

    resume_snapshot_minutes: float = setting(
        10.0, "long renders: most minutes between snapshots of the temporal memory (0: every clip)", minimum=0.0
    )


@dataclass(frozen=True)
class InferenceConfig:
    """Every inference setting, in sections (see the module docstring). Each setting also reads under the name
    users write (``config.fps`` is ``config.video.fps``)."""

    models: ModelSettings = section(ModelSettings, "the models and where they come from", flat=True)
    runtime: RuntimeSettings = section(RuntimeSettings, "device, dtype, compilation, offloading", flat=True)
    memory: MemorySettings = section(MemorySettings, "VAE batches and tiles", flat=True)
    video: VideoSettings = section(VideoSettings, "size, frame rate, quality, paste-back", flat=True)
    conditions: ConditionSettings = section(ConditionSettings, "portrait framing and emotion", flat=True)
    sampling: SamplingSettings = section(SamplingSettings, "clips, steps, guidance, seed and speed", flat=True)
    resume: ResumeSettings = section(ResumeSettings, "saved progress of long renders", flat=True)

    def __getattr__(self, name: str) -> Any:
        """Setting ``name`` as users write it (``fps``), read from its section; AttributeError for others."""
        path = SETTING_PATHS.get(name)
        if path is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return operator.attrgetter(path)(self)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the video in pixels."""
        return self.video.size

    @property
    def speed_settings(self) -> SpeedSettings:
        """The ``speed`` preset with the speed settings given explicitly applied over it."""
        return self.sampling.speed_settings

    def updated(self, **settings: Any) -> InferenceConfig:
        """A copy with the settings named as users write them (``fps=25``) changed; not checked: pass it
        through :func:`validate`. Raises :class:`ConfigError` for an unknown name."""
        changes: dict[str, dict[str, Any]] = {}
        for name, value in check_names(settings, "the settings").items():
            part, leaf = SETTING_PATHS[name].split(".")
            changes.setdefault(part, {})[leaf] = value
        return dataclasses.replace(
            self, **{part: dataclasses.replace(getattr(self, part), **values) for part, values in changes.items()}
        )


SETTING_PATHS = {name: path for name, path in setting_paths(InferenceConfig).items() if name != path}
"""Each setting's name -> its attribute path (``fps`` -> ``video.fps``)."""
LOAD_SETTINGS = frozenset(setting_names(ModelSettings) + setting_names(RuntimeSettings))
"""Settings that choose or build the loaded models (the models and runtime sections); every other setting may
change per call (``MemoGenerator.with_settings``)."""

JOB_NEUTRAL_SETTINGS = ("model_cache_dir", "resume_snapshot_minutes")
"""The settings that change neither the frames nor the file's bytes: saved progress (``memo/io/job_state.py``)
of a render is resumed across a change of these only. Every other setting is part of a job's fingerprint: the
model and size settings, the speed settings, ``crf``, and also ``device``, ``weight_dtype``, ``offload``,
``compile``, ``parallel`` and ``vae_batch_size``, which may move the rounding of a computation."""

SPEED_KEYS = ("speed", "solver", "solver_steps", "guidance_start", "guidance_end", "deep_cache_interval")


def validate(config: InferenceConfig) -> InferenceConfig:
    """``config`` checked for what types alone do not: each field's choices and range, and the rules between
    settings; returned with ``emotion`` lower-cased. Raises :class:`ConfigError` listing every problem."""
    config = config.updated(emotion=str(config.conditions.emotion).lower())
    video, sampling, runtime = config.video, config.sampling, config.runtime
    problems = []
    width, height = video.size
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % 64:
            problems.append(f"{name} must be a positive multiple of 64, got {value}")
    if config.conditions.emotion not in EMOTIONS:
        problems.append(
            f"emotion must be 'auto' or one of {', '.join(EMOTION_NAMES)}, got {config.conditions.emotion!r}"
        )
    problems += [problem for problem in range_problems(config) if not problem.startswith("emotion ")]
    problems += speed_problems(sampling.speed_values())
    if runtime.compile == "true" and runtime.offload == "group":
        problems.append(
            "compile=true cannot be combined with offload=group (group offloading moves weights inside the "
            "networks' forward, which a whole-graph compile cannot trace); use compile=auto or offload=model"
        )
    if runtime.parallel == "guidance" and sampling.cfg_scale <= 1:
        problems.append(
            f"parallel=guidance splits the two halves of guidance, but cfg_scale={sampling.cfg_scale} runs without "
            "guidance; use cfg_scale above 1 or parallel=none"
        )
    if runtime.parallel == "guidance" and sampling.num_generated_frames_per_clip % 2:
        problems.append(
            "parallel=guidance needs an even num_generated_frames_per_clip (each half's frames meet the two "
            f"halves' reference frames in turn), got {sampling.num_generated_frames_per_clip}"
        )
    if video.paste_back and config.conditions.framing != "crop":
        problems.append(
            f"paste_back=true needs framing=crop (framing={config.conditions.framing} animates the whole squashed "
            "picture, so there is no region to paste back into); use framing=crop or paste_back=false"
        )
    if config.memory.vae_tile_size < 0 or config.memory.vae_tile_size % 64:
        problems.append(f"vae_tile_size must be 0 (never tile) or a multiple of 64, got {config.memory.vae_tile_size}")
    if problems:
        raise ConfigError("Invalid settings: " + "; ".join(dict.fromkeys(problems)) + ".")
    return config


HELP_COMMAND = "python inference.py --help-settings"


def setting_help(name: str) -> str:
    """The one line of help of setting ``name`` (for tooltips and forms)."""
    return next(field.metadata["help"] for each, _, field, _ in leaves(InferenceConfig) if each == name)


def settings_help() -> str:
    """The listing of ``--help-settings``: every inference setting by section, its type and range, default and
    help."""
    return help_text(
        InferenceConfig,
        "Inference settings: set them in the YAML config (--config) or as key=value; the same names work in the\n"
        "batch manifest's columns, MemoGenerator.with_settings(...), the web app and the ComfyUI node.",
    )


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (), source: str = "the command line"
) -> InferenceConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides; checked, as frozen typed
    objects (the only check; later code trusts them). ``source`` names where the overrides came from in
    messages. Raises :class:`ConfigError` (one line naming the key)."""
    layers = [(str(path), read_yaml(path))] if path is not None else []
    layers.append((source, read_overrides(overrides)))
    merged = load_layers(InferenceConfig, layers, RENAMED, LEGACY_KEYS, HELP_COMMAND)
    return validate(OmegaConf.to_object(merged))


def check_names(settings: dict, source: str) -> dict:
    """``settings`` (name -> value, from Python) with deprecated names replaced by their current ones (with a
    warning); :class:`ConfigError` for an unknown name, with the closest valid ones."""
    known = setting_names(InferenceConfig)
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
