"""The finetuning configuration: defaults, loading with command-line overrides, and checks.

A config file (``configs/finetune.yaml``) is merged over :data:`DEFAULTS`, then ``key=value`` overrides
(OmegaConf dot-list syntax, e.g. ``data.width=256 learning_rate=2e-5``) over that. Unknown keys are
rejected, so that a misspelt option fails instead of being ignored. Where the original MEMO release has
the same option, it has the same name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

DEFAULTS = {
    "output_dir": "outputs",
    "exp_name": None,
    "seed": 42,
    "tracker_project_name": "memo",
    "report_to": "none",
    "model_name_or_path": "memoavatar/memo",
    "vae": "stabilityai/sd-vae-ft-mse",
    "data": {
        "data_dirs": ["data/embedding"],
        "width": 512,
        "height": 512,
        "n_sample_frames": 16,
        "num_past_frames": 16,
        "dynamic_past_frames": False,
        "past_first_frame_ratio": 0.05,
        "past_zero_ratio": 0.05,
        "audio_start_ratio": 0.05,
        "num_workers": 4,
        "prefetch_factor": 2,
        "max_attempts": 20,
        "length_tolerance": 2,
    },
    "train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "max_train_steps": 20000,
    "learning_rate": 1e-5,
    "scale_lr": False,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "lr_num_cycles": 1,
    "lr_power": 1.0,
    "use_8bit_adam": False,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 0.01,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "mixed_precision": "bf16",
    "allow_tf32": True,
    "gradient_checkpointing": True,
    "vae_batch_size": 16,
    "use_ema": False,
    "ema_decay": 0.9999,
    "ddp_find_unused_parameters": False,
    "noise_scheduler_kwargs": {"num_train_timesteps": 1000},
    "weighting_scheme": "logit_normal",
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "mode_scale": 1.29,
    "robust_training": True,
    "robust_loss_threshold": 0.1,
    "train_reference_net": False,
    "train_diffusion_net": True,
    "train_image_proj": False,
    "train_audio_proj": False,
    "trainable_modules": ["motion_modules", "audio_modules"],
    "uncond_img_ratio": 0.05,
    "uncond_img_mode": "zero_reference",
    "uncond_audio_ratio": 0.05,
    "uncond_audio_mode": "zero_features",
    "uncond_emotion_ratio": 0.0,
    "checkpointing_steps": 5000,
    "checkpoints_total_limit": 20,
    "resume_from_checkpoint": None,
    "logging_steps": 1,
    "validation": {
        "steps": 0,
        "video_id": None,
        "reference_image": None,
        "num_frames": 32,
        "num_inference_steps": 20,
        "guidance_scale": 3.5,
        "seed": 42,
    },
}

CHOICES = {
    "report_to": {"none", "wandb", "tensorboard", "all"},
    "mixed_precision": {"no", "fp16", "bf16"},
    "weighting_scheme": {"logit_normal", "mode", "sigma_sqrt", "cosmap", "none"},
    "uncond_img_mode": {"zero_reference", "drop_reference"},
    "uncond_audio_mode": {"zero_features", "zero_tokens"},
}


def load_config(
    path: str | os.PathLike | None, overrides: Sequence[str] = (), exp_name: str | None = None
) -> DictConfig:
    """The defaults, merged with the file at ``path`` and the ``key=value`` ``overrides``; checked.

    With ``exp_name`` the run writes to ``<output_dir>/<exp_name>`` (the resolved path is stored back in
    ``output_dir``), as in the original release.
    """
    config = OmegaConf.create(DEFAULTS)
    OmegaConf.set_struct(config, True)
    OmegaConf.set_struct(config.noise_scheduler_kwargs, False)
    if path is not None:
        config = OmegaConf.merge(config, OmegaConf.load(path))
    if overrides:
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
    if exp_name is not None:
        config.exp_name = exp_name
    if config.exp_name:
        config.output_dir = os.path.join(config.output_dir, config.exp_name)
    check_config(config)
    return config


def check_config(config: DictConfig) -> None:
    """Raise ValueError on settings that cannot work, naming the key."""
    for key, allowed in CHOICES.items():
        if config[key] not in allowed:
            raise ValueError(f"{key}={config[key]!r} is not one of {sorted(allowed)}.")
    for key in ("uncond_img_ratio", "uncond_audio_ratio", "uncond_emotion_ratio"):
        if not 0.0 <= config[key] <= 1.0:
            raise ValueError(f"{key} must be a probability, got {config[key]}.")
    for key in ("past_first_frame_ratio", "past_zero_ratio", "audio_start_ratio"):
        if not 0.0 <= config.data[key] <= 1.0:
            raise ValueError(f"data.{key} must be a probability, got {config.data[key]}.")
    for key in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "max_train_steps",
        "checkpointing_steps",
        "logging_steps",
    ):
        if config[key] < 1:
            raise ValueError(f"{key} must be at least 1, got {config[key]}.")
    if config.checkpoints_total_limit is not None and config.checkpoints_total_limit < 1:
        raise ValueError("checkpoints_total_limit must be at least 1 (or null for no limit).")
    if config.data.width % 8 or config.data.height % 8:
        raise ValueError(
            f"data.width and data.height must be multiples of 8, got {config.data.width}x{config.data.height}."
        )
    if not config.data.data_dirs:
        raise ValueError("data.data_dirs lists no prepared data.")
    if not any(config[f"train_{name}"] for name in ("reference_net", "diffusion_net", "image_proj", "audio_proj")):
        raise ValueError(
            "Nothing to train: set at least one of train_reference_net, train_diffusion_net, train_image_proj,"
            " train_audio_proj."
        )
