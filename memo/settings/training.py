"""Finetuning settings: typed sections, read from a YAML file and ``key=value`` overrides.

:class:`TrainingConfig` is composed of sections, each the settings of one part of a run: :class:`ModelSettings`,
:class:`DataSettings`, :class:`ScheduleSettings`, :class:`OptimizerSettings`, :class:`ObjectiveSettings`,
:class:`DropoutSettings`, :class:`CheckpointSettings`, :class:`TrackingSettings` and
:class:`ValidationSettings`; each field has its type (a choice is a ``Literal``), default, range and one line
of help; ``python finetune.py --help-settings`` lists them. The ``data`` and ``validation`` sections are
written dotted (``data.width``); the others are flat: their settings keep the names of the original release
(``learning_rate``, held in ``config.optimizer``). :func:`load_config` returns the checked, frozen objects;
each part of the run takes its own section.
A config file (``configs/finetune.yaml``) is merged over the defaults, then ``key=value`` overrides (OmegaConf
dot-list syntax, e.g. ``data.width=256 learning_rate=2e-5``) over that. An unknown key, a value of the wrong
type or out of range is a :class:`ConfigError` naming it. Settings that inference has too carry the same name
(``model_name_or_path``, ``vae``, ``seed``, ``vae_batch_size``, ``width``/``height``, ``num_past_frames``,
``num_generated_frames_per_clip``, ``inference_steps``, ``cfg_scale``); other names follow the original release.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from omegaconf import OmegaConf

from memo.io.hub import MEMO_REPO, VAE_REPO
from memo.settings.schema import (
    ConfigError,
    as_layer,
    help_text,
    load_layers,
    range_problems,
    read_overrides,
    read_yaml,
    section,
    setting,
)

__all__ = ["ConfigError", "TrainingConfig", "load_config", "check_config", "settings_help", "dataloader_workers"]

logger = logging.getLogger("memo")

ReportTo = Literal["none", "wandb", "tensorboard", "all"]
MixedPrecision = Literal["no", "fp16", "bf16"]
WeightingScheme = Literal["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"]
ImageDropMode = Literal["zero_reference", "drop_reference"]
"""zero_reference: the original's training (zero reference and past latents); drop_reference: as the
pipeline's unconditional branch (no reference attention, a zero face embedding)."""
AudioDropMode = Literal["zero_features", "zero_tokens"]
"""zero_features: the original's training (zero wav2vec2 features); zero_tokens: as the pipeline's
unconditional branch (zero audio tokens)."""
TRAINABLE_NETWORKS = ("reference_net", "diffusion_net", "image_proj", "audio_proj")
MAX_DEFAULT_WORKERS = 8
"""The most dataloader workers chosen when ``data.num_workers`` is null."""

RENAMED = {
    "data.n_sample_frames": "data.num_generated_frames_per_clip",
    "validation.num_inference_steps": "validation.inference_steps",
    "validation.guidance_scale": "validation.cfg_scale",
}
"""Old setting name -> its current name (the name inference uses); accepted with a deprecation warning."""


@dataclass(frozen=True)
class DataSettings:
    """The ``data`` section: which prepared videos, and how clips are drawn from them."""

    data_dirs: list[str] = setting(
        help="folders written by scripts/prepare_data.py (or their metadata.jsonl)", factory=lambda: ["data/embedding"]
    )
    width: int = setting(512, "training clip width in pixels", minimum=8, multiple_of=8)
    height: int = setting(512, "training clip height in pixels", minimum=8, multiple_of=8)
    num_generated_frames_per_clip: int = setting(16, "frames per training clip", minimum=1, maximum=32)
    num_past_frames: int = setting(16, "past frames the clip conditions on (fed to the temporal memory)", minimum=0)
    dynamic_past_frames: bool = setting(False, "0..num_past_frames real past frames, the rest the reference frame")
    past_first_frame_ratio: float = setting(
        0.05, "past frames replaced by the clip's first frame", minimum=0, maximum=1
    )
    past_zero_ratio: float = setting(0.05, "past frames set to zero (the original's start_ratio)", minimum=0, maximum=1)
    audio_start_ratio: float = setting(
        0.05, "clips whose first audio windows are padded as at a recording's start", minimum=0, maximum=1
    )
    num_workers: int | None = setting(
        None, f"dataloader worker processes; null: one per CPU core, at most {MAX_DEFAULT_WORKERS}", minimum=0
    )
    prefetch_factor: int = setting(2, "batches each worker loads ahead", minimum=1)
    max_attempts: int = setting(20, "unreadable samples replaced in a row before the run stops", minimum=1)
    length_tolerance: int = setting(2, "frames by which a video and its features may differ in length", minimum=0)


@dataclass(frozen=True)
class ValidationSettings:
    """The ``validation`` section: a preview video rendered every so many steps."""

    steps: int = setting(0, "render a preview video every N steps (0: never)", minimum=0)
    video_id: str | None = setting(None, "prepared video giving face, audio and emotion; null: the first")
    reference_image: str | None = setting(None, "image file instead of the video's first frame (same person)")
    num_frames: int = setting(32, "frames of the preview", minimum=1)
    inference_steps: int = setting(20, "denoising steps per clip of the preview", minimum=1)
    cfg_scale: float = setting(3.5, "classifier-free guidance scale of the preview; 1 turns it off", minimum=0.0)
    seed: int = setting(42, "random seed of the preview's noise", minimum=0)


@dataclass(frozen=True)
class ModelSettings:
    """The checkpoint to start from, and which of its parts train."""

    model_name_or_path: str = setting(MEMO_REPO, "checkpoint in the published layout to start from: folder or hub id")
    vae: str = setting(VAE_REPO, "the VAE: folder or hub id")
    train_reference_net: bool = setting(False, "train the reference net (restricted to trainable_modules)")
    train_diffusion_net: bool = setting(True, "train the diffusion net (restricted to trainable_modules)")
    train_image_proj: bool = setting(False, "train the face-embedding projection")
    train_audio_proj: bool = setting(False, "train the audio projection")
    trainable_modules: list[str] = setting(
        help="module names the trained nets are restricted to", factory=lambda: ["motion_modules", "audio_modules"]
    )
    gradient_checkpointing: bool = setting(True, "recompute activations in the backward pass to save memory")
    vae_batch_size: int = setting(16, "frames per VAE encode call", minimum=1)

    def trained(self) -> dict[str, bool]:
        """Network folder name -> whether it trains."""
        return {name: getattr(self, f"train_{name}") for name in TRAINABLE_NETWORKS}


@dataclass(frozen=True)
class ScheduleSettings:
    """How long the run is, how many clips a step takes, and the learning-rate schedule."""

    train_batch_size: int = setting(1, "clips per GPU per step", minimum=1)
    gradient_accumulation_steps: int = setting(
        1, "batches per optimizer step (under DeepSpeed the launcher's wins)", minimum=1
    )
    max_train_steps: int = setting(20000, "optimizer steps of the whole run", minimum=1)
    lr_scheduler: str = setting(
        "constant", "diffusers' get_scheduler name: constant, constant_with_warmup, linear, cosine, ..."
    )
    lr_warmup_steps: int = setting(0, "steps of learning-rate warm-up", minimum=0)
    lr_num_cycles: int = setting(1, "cycles of cosine_with_restarts", minimum=1)
    lr_power: float = setting(1.0, "power of the polynomial scheduler", minimum=0.0)


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW, gradient clipping and the EMA of the trained weights."""

    learning_rate: float = setting(1e-5, "peak learning rate", minimum=0.0)
    scale_lr: bool = setting(False, "multiply the learning rate by batch size x processes x accumulation")
    use_8bit_adam: bool = setting(False, "bitsandbytes AdamW8bit (CUDA only)")
    adam_beta1: float = setting(0.9, "AdamW beta1", minimum=0.0, maximum=1.0)
    adam_beta2: float = setting(0.999, "AdamW beta2", minimum=0.0, maximum=1.0)
    adam_weight_decay: float = setting(0.01, "AdamW weight decay", minimum=0.0)
    adam_epsilon: float = setting(1e-8, "AdamW epsilon", minimum=0.0)
    max_grad_norm: float = setting(1.0, "gradient clipping norm; 0: off (DeepSpeed: gradient_clipping)", minimum=0.0)
    use_ema: bool = setting(False, "keep an exponential moving average of the trained weights")
    ema_decay: float = setting(0.9999, "EMA decay", minimum=0.0, maximum=1.0)


@dataclass(frozen=True)
class ObjectiveSettings:
    """Flow matching: the timestep density, the loss weighting and the robust-training filter."""

    noise_scheduler_kwargs: dict[str, Any] = setting(
        help="FlowMatchEulerDiscreteScheduler arguments", factory=lambda: {"num_train_timesteps": 1000}
    )
    weighting_scheme: WeightingScheme = setting("logit_normal", "timestep sampling and loss weighting")
    logit_mean: float = setting(0.0, "mean of the logit-normal timestep density")
    logit_std: float = setting(1.0, "standard deviation of the logit-normal timestep density", minimum=0.0)
    mode_scale: float = setting(1.29, "scale of the mode timestep density")
    robust_training: bool = setting(True, "leave out samples whose loss exceeds robust_loss_threshold")
    robust_loss_threshold: float = setting(0.1, "loss above which a sample is left out", minimum=0.0)

    @property
    def threshold(self) -> float | None:
        """The robust-training loss threshold, None when robust training is off."""
        return self.robust_loss_threshold if self.robust_training else None


@dataclass(frozen=True)
class DropoutSettings:
    """Conditioning dropout for classifier-free guidance: which samples train without which condition."""

    uncond_img_ratio: float = setting(0.05, "samples trained without their image condition", minimum=0, maximum=1)
    uncond_img_mode: ImageDropMode = setting("zero_reference", "how the image condition is dropped")
    uncond_audio_ratio: float = setting(0.05, "samples trained without their audio condition", minimum=0, maximum=1)
    uncond_audio_mode: AudioDropMode = setting("zero_features", "how the audio condition is dropped")
    uncond_emotion_ratio: float = setting(
        0.0, "samples trained without their emotion, on top of the net's own", minimum=0, maximum=1
    )


@dataclass(frozen=True)
class CheckpointSettings:
    """When checkpoints are written, how many are kept, and which one a run resumes from."""

    checkpointing_steps: int = setting(5000, "save a checkpoint every N steps", minimum=1)
    checkpoints_total_limit: int | None = setting(20, "checkpoints kept (oldest removed); null: all", minimum=1)
    resume_from_checkpoint: str | None = setting(None, 'null, "latest", a checkpoint name in the run folder, or a path')


@dataclass(frozen=True)
class TrackingSettings:
    """Where metrics go, and the accelerator's precision and process options."""

    tracker_project_name: str = setting("memo", "project name in wandb / tensorboard")
    report_to: ReportTo = setting("none", "where metrics go besides logs/metrics.jsonl")
    logging_steps: int = setting(1, "log metrics every N steps", minimum=1)
    mixed_precision: MixedPrecision = setting("bf16", "accelerate's mixed precision")
    allow_tf32: bool = setting(True, "TF32 matmuls on Ampere and later GPUs")
    ddp_find_unused_parameters: bool = setting(False, "DDP's find_unused_parameters")


@dataclass(frozen=True)
class TrainingConfig:
    """Every finetuning setting, in sections (see the module docstring)."""

    output_dir: str = setting("outputs", "the run writes to <output_dir>/<exp_name>")
    exp_name: str | None = setting(None, "run name (finetune.py's --exp_name sets it)")
    seed: int | None = setting(42, "random seed (per process); null: not seeded", minimum=0)
    tracking: TrackingSettings = section(TrackingSettings, "trackers, precision, process options", flat=True)
    models: ModelSettings = section(ModelSettings, "the checkpoint and what trains", flat=True)
    data: DataSettings = section(DataSettings, "the data section")
    schedule: ScheduleSettings = section(ScheduleSettings, "steps, batch and learning-rate schedule", flat=True)
    optimizer: OptimizerSettings = section(OptimizerSettings, "AdamW, clipping, EMA", flat=True)
    objective: ObjectiveSettings = section(ObjectiveSettings, "flow matching and robust training", flat=True)
    dropout: DropoutSettings = section(DropoutSettings, "conditioning dropout", flat=True)
    checkpointing: CheckpointSettings = section(CheckpointSettings, "checkpoints and resumption", flat=True)
    validation: ValidationSettings = section(ValidationSettings, "the validation section")

    def to_yaml(self) -> str:
        """These settings as YAML under the names users write (what a run saves as ``config.yaml``)."""
        return OmegaConf.to_yaml(as_layer(self))


HELP_COMMAND = "python finetune.py --help-settings"


def settings_help() -> str:
    """The listing of ``--help-settings``: every finetuning setting, its type and range, default and help."""
    return help_text(
        TrainingConfig,
        "Finetuning settings: set them in the YAML config (--config) or as key=value (dotted for the data and\n"
        "validation sections, e.g. data.width=256).",
    )


def load_config(
    path: str | os.PathLike | None, overrides: Sequence[str] = (), exp_name: str | None = None
) -> TrainingConfig:
    """The defaults, merged with the file at ``path`` and the ``key=value`` ``overrides``; checked, as frozen
    typed objects (the only check; the run trusts them).

    With ``exp_name`` the run writes to ``<output_dir>/<exp_name>`` (the resolved path is stored in
    ``output_dir``), as in the original release. Raises :class:`ConfigError` (one line naming the key).
    """
    layers = [(str(path), read_yaml(path))] if path is not None else []
    layers.append(("the command line", read_overrides(overrides)))
    if exp_name is not None:
        layers.append(("--exp_name", OmegaConf.create({"exp_name": exp_name})))
    config = OmegaConf.to_object(load_layers(TrainingConfig, layers, RENAMED, help_command=HELP_COMMAND))
    check_config(config)
    if config.exp_name:
        config = dataclasses.replace(config, output_dir=os.path.join(config.output_dir, config.exp_name))
    return config


def check_config(config: TrainingConfig) -> None:
    """Raise :class:`ConfigError` on settings that cannot work, naming the key: each field's choices and range,
    and the rules between settings."""
    problems = range_problems(config)
    if not config.data.data_dirs:
        problems.append("data.data_dirs lists no prepared data")
    if not any(config.models.trained().values()):
        problems.append(
            "nothing to train: set at least one of " + ", ".join(f"train_{name}" for name in TRAINABLE_NETWORKS)
        )
    if problems:
        raise ConfigError("Invalid settings: " + "; ".join(problems) + ".")


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity where the OS says, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def dataloader_workers(requested: int | None, processes: int = 1) -> int:
    """Dataloader workers per process: ``requested``, or with null one per CPU core this process gets (the
    cores shared by the ``processes`` of the machine), at most :data:`MAX_DEFAULT_WORKERS`. A request above the
    cores available is lowered to them, with a warning (more workers than cores only slow each other down)."""
    cores = max(1, available_cpus() // max(1, processes))
    if requested is None:
        return min(cores, MAX_DEFAULT_WORKERS)
    if requested > cores:
        logger.warning(
            "data.num_workers=%d but this process has %d CPU core%s; using %d workers (data.num_workers=null "
            "chooses this by itself).",
            requested,
            cores,
            "s" if cores > 1 else "",
            cores,
        )
        return cores
    return requested
