"""Finetuning settings: one typed field per setting, read from a YAML file and ``key=value`` overrides.

:class:`TrainingConfig` (with its sections :class:`DataSettings` and :class:`ValidationSettings`) holds every
setting with its type, default, range and one line of help; ``python finetune.py --help-settings`` lists them.
A config file (``configs/finetune.yaml``) is merged over the defaults, then ``key=value`` overrides (OmegaConf
dot-list syntax, e.g. ``data.width=256 learning_rate=2e-5``) over that. An unknown key, a value of the wrong
type or out of range is a :class:`ConfigError` naming it. Settings that inference has too carry the same name
(``model_name_or_path``, ``vae``, ``seed``, ``vae_batch_size``, ``width``/``height``, ``num_past_frames``,
``num_generated_frames_per_clip``, ``inference_steps``, ``cfg_scale``); other names follow the original release.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memo.io.hub import MEMO_REPO, VAE_REPO
from memo.settings.schema import ConfigError, help_text, load_layers, range_problems, read_overrides, read_yaml, setting

__all__ = ["ConfigError", "TrainingConfig", "load_config", "check_config", "settings_help", "dataloader_workers"]

logger = logging.getLogger("memo")

REPORT_TO = ("none", "wandb", "tensorboard", "all")
MIXED_PRECISION = ("no", "fp16", "bf16")
WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")
UNCOND_IMG_MODES = ("zero_reference", "drop_reference")
UNCOND_AUDIO_MODES = ("zero_features", "zero_tokens")
MAX_DEFAULT_WORKERS = 8
"""The most dataloader workers chosen when ``data.num_workers`` is null."""

RENAMED = {
    "data.n_sample_frames": "data.num_generated_frames_per_clip",
    "validation.num_inference_steps": "validation.inference_steps",
    "validation.guidance_scale": "validation.cfg_scale",
}
"""Old setting name -> its current name (the name inference uses); accepted with a deprecation warning."""


@dataclass
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


@dataclass
class ValidationSettings:
    """The ``validation`` section: a preview video rendered every so many steps."""

    steps: int = setting(0, "render a preview video every N steps (0: never)", minimum=0)
    video_id: str | None = setting(None, "prepared video giving face, audio and emotion; null: the first")
    reference_image: str | None = setting(None, "image file instead of the video's first frame (same person)")
    num_frames: int = setting(32, "frames of the preview", minimum=1)
    inference_steps: int = setting(20, "denoising steps per clip of the preview", minimum=1)
    cfg_scale: float = setting(3.5, "classifier-free guidance scale of the preview; 1 turns it off", minimum=0.0)
    seed: int = setting(42, "random seed of the preview's noise", minimum=0)


@dataclass
class TrainingConfig:
    """Every finetuning setting: its type, default, range and one line of help."""

    output_dir: str = setting("outputs", "the run writes to <output_dir>/<exp_name>")
    exp_name: str | None = setting(None, "run name (finetune.py's --exp_name sets it)")
    seed: int | None = setting(42, "random seed (per process); null: not seeded", minimum=0)
    tracker_project_name: str = setting("memo", "project name in wandb / tensorboard")
    report_to: str = setting("none", "where metrics go besides logs/metrics.jsonl", choices=REPORT_TO)
    model_name_or_path: str = setting(MEMO_REPO, "checkpoint in the published layout to start from: folder or hub id")
    vae: str = setting(VAE_REPO, "the VAE: folder or hub id")
    data: DataSettings = setting(help="the data section", factory=DataSettings)
    train_batch_size: int = setting(1, "clips per GPU per step", minimum=1)
    gradient_accumulation_steps: int = setting(
        1, "batches per optimizer step (under DeepSpeed the launcher's wins)", minimum=1
    )
    max_train_steps: int = setting(20000, "optimizer steps of the whole run", minimum=1)
    learning_rate: float = setting(1e-5, "peak learning rate", minimum=0.0)
    scale_lr: bool = setting(False, "multiply the learning rate by batch size x processes x accumulation")
    lr_scheduler: str = setting(
        "constant", "diffusers' get_scheduler name: constant, constant_with_warmup, linear, cosine, ..."
    )
    lr_warmup_steps: int = setting(0, "steps of learning-rate warm-up", minimum=0)
    lr_num_cycles: int = setting(1, "cycles of cosine_with_restarts", minimum=1)
    lr_power: float = setting(1.0, "power of the polynomial scheduler", minimum=0.0)
    use_8bit_adam: bool = setting(False, "bitsandbytes AdamW8bit (CUDA only)")
    adam_beta1: float = setting(0.9, "AdamW beta1", minimum=0.0, maximum=1.0)
    adam_beta2: float = setting(0.999, "AdamW beta2", minimum=0.0, maximum=1.0)
    adam_weight_decay: float = setting(0.01, "AdamW weight decay", minimum=0.0)
    adam_epsilon: float = setting(1e-8, "AdamW epsilon", minimum=0.0)
    max_grad_norm: float = setting(1.0, "gradient clipping norm; 0: off (DeepSpeed: gradient_clipping)", minimum=0.0)
    mixed_precision: str = setting("bf16", "accelerate's mixed precision", choices=MIXED_PRECISION)
    allow_tf32: bool = setting(True, "TF32 matmuls on Ampere and later GPUs")
    gradient_checkpointing: bool = setting(True, "recompute activations in the backward pass to save memory")
    vae_batch_size: int = setting(16, "frames per VAE encode call", minimum=1)
    use_ema: bool = setting(False, "keep an exponential moving average of the trained weights")
    ema_decay: float = setting(0.9999, "EMA decay", minimum=0.0, maximum=1.0)
    ddp_find_unused_parameters: bool = setting(False, "DDP's find_unused_parameters")
    noise_scheduler_kwargs: dict[str, Any] = setting(
        help="FlowMatchEulerDiscreteScheduler arguments", factory=lambda: {"num_train_timesteps": 1000}
    )
    weighting_scheme: str = setting("logit_normal", "timestep sampling and loss weighting", choices=WEIGHTING_SCHEMES)
    logit_mean: float = setting(0.0, "mean of the logit-normal timestep density")
    logit_std: float = setting(1.0, "standard deviation of the logit-normal timestep density", minimum=0.0)
    mode_scale: float = setting(1.29, "scale of the mode timestep density")
    robust_training: bool = setting(True, "leave out samples whose loss exceeds robust_loss_threshold")
    robust_loss_threshold: float = setting(0.1, "loss above which a sample is left out", minimum=0.0)
    train_reference_net: bool = setting(False, "train the reference net (restricted to trainable_modules)")
    train_diffusion_net: bool = setting(True, "train the diffusion net (restricted to trainable_modules)")
    train_image_proj: bool = setting(False, "train the face-embedding projection")
    train_audio_proj: bool = setting(False, "train the audio projection")
    trainable_modules: list[str] = setting(
        help="module names the trained nets are restricted to", factory=lambda: ["motion_modules", "audio_modules"]
    )
    uncond_img_ratio: float = setting(0.05, "samples trained without their image condition", minimum=0, maximum=1)
    uncond_img_mode: str = setting("zero_reference", "how the image condition is dropped", choices=UNCOND_IMG_MODES)
    uncond_audio_ratio: float = setting(0.05, "samples trained without their audio condition", minimum=0, maximum=1)
    uncond_audio_mode: str = setting("zero_features", "how the audio condition is dropped", choices=UNCOND_AUDIO_MODES)
    uncond_emotion_ratio: float = setting(
        0.0, "samples trained without their emotion, on top of the net's own", minimum=0, maximum=1
    )
    checkpointing_steps: int = setting(5000, "save a checkpoint every N steps", minimum=1)
    checkpoints_total_limit: int | None = setting(20, "checkpoints kept (oldest removed); null: all", minimum=1)
    resume_from_checkpoint: str | None = setting(None, 'null, "latest", a checkpoint name in the run folder, or a path')
    logging_steps: int = setting(1, "log metrics every N steps", minimum=1)
    validation: ValidationSettings = setting(help="the validation section", factory=ValidationSettings)


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
) -> DictConfig:
    """The defaults, merged with the file at ``path`` and the ``key=value`` ``overrides``; checked. Returns a
    typed DictConfig backed by :class:`TrainingConfig` (a later assignment of the wrong type fails too).

    With ``exp_name`` the run writes to ``<output_dir>/<exp_name>`` (the resolved path is stored back in
    ``output_dir``), as in the original release. Raises :class:`ConfigError` (one line naming the key).
    """
    layers = [(str(path), read_yaml(path))] if path is not None else []
    layers.append(("the command line", read_overrides(overrides)))
    config = load_layers(TrainingConfig, layers, RENAMED, help_command=HELP_COMMAND)
    if exp_name is not None:
        config.exp_name = exp_name
    if config.exp_name:
        config.output_dir = os.path.join(config.output_dir, config.exp_name)
    check_config(config)
    return config


def check_config(config: DictConfig) -> None:
    """Raise :class:`ConfigError` on settings that cannot work, naming the key: each field's choices and range,
    and the rules between settings."""
    problems = range_problems(OmegaConf.to_object(config))
    if not config.data.data_dirs:
        problems.append("data.data_dirs lists no prepared data")
    if not any(config[f"train_{name}"] for name in ("reference_net", "diffusion_net", "image_proj", "audio_proj")):
        problems.append(
            "nothing to train: set at least one of train_reference_net, train_diffusion_net, train_image_proj, "
            "train_audio_proj"
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
