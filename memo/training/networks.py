"""The networks of a run: the checkpoint and VAE found (once, before anything loads), loaded, and made ready
to train as one :class:`~memo.training.model.MemoTrainingModel` beside the frozen VAE."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from memo.io.model_load import load_model
from memo.loading import ModelLocator, check_checkpoint_files, checkpoint_folders, locate_checkpoint
from memo.pipeline import checkpoint_specs
from memo.settings.training import DropoutSettings, ModelSettings
from memo.training.conditioning import ConditionDropout
from memo.training.model import MemoTrainingModel
from memo.training.trainable import select_trainable

logger = logging.getLogger("memo")


@dataclass(frozen=True)
class ModelFolders:
    """The local folders of a run's checkpoint and VAE, found by :func:`locate_training_models`."""

    root: Path
    vae: Path
    model_name_or_path: str = ""
    """The setting that chose ``root`` (named in messages; its folder when empty)."""
    vae_name_or_path: str = ""


def locate_training_models(model_name_or_path: str, vae_name_or_path: str) -> ModelFolders:
    """The local folders of the checkpoint and the VAE, found or fetched as inference finds them
    (:func:`memo.loading.locate_checkpoint`), their files checked; one :class:`~memo.io.hub.MissingModelError`
    lists what cannot be had, with the command that downloads it. Cheap once downloaded, so it runs before
    anything else starts."""
    locator = ModelLocator()
    root, vae_dir = locate_checkpoint(locator, model_name_or_path, vae_name_or_path)
    locator.check()
    check_checkpoint_files(model_name_or_path, root, vae_name_or_path, vae_dir)
    return ModelFolders(root, vae_dir, model_name_or_path, vae_name_or_path)


def load_pretrained(folders: ModelFolders, vae_dtype: torch.dtype = torch.float32) -> tuple[dict, AutoencoderKL]:
    """The four networks of a checkpoint in the published layout, and the VAE (in ``vae_dtype``), each loaded
    through :func:`memo.io.model_load.load_model` (a damaged file is one ``DamagedModelError`` line)."""
    checkpoint, vae = checkpoint_folders(
        folders.model_name_or_path or str(folders.root),
        folders.root,
        folders.vae_name_or_path or str(folders.vae),
        folders.vae,
    )
    loaded = {name: load_model(spec) for name, spec in checkpoint_specs(checkpoint, vae, vae_dtype=vae_dtype).items()}
    return loaded, loaded.pop("vae")


def load_model_components(
    model_name_or_path: str, vae_name_or_path: str, vae_dtype: torch.dtype = torch.float32
) -> tuple[dict, AutoencoderKL, Path]:
    """The four networks of a checkpoint (a directory or a hub id), the VAE (in ``vae_dtype``), and the local
    directory the networks came from: :func:`locate_training_models` then :func:`load_pretrained`."""
    folders = locate_training_models(model_name_or_path, vae_name_or_path)
    networks, vae = load_pretrained(folders, vae_dtype)
    return networks, vae, folders.root


def build_model(
    settings: ModelSettings,
    dropout_settings: DropoutSettings,
    folders: ModelFolders,
    device: torch.device,
    weight_dtype: torch.dtype,
    allow_tf32: bool,
) -> tuple[MemoTrainingModel, AutoencoderKL]:
    """The networks to train as one :class:`MemoTrainingModel` (in train mode, trainable parts selected,
    gradient checkpointing as set) with its conditioning dropout, and the frozen VAE on ``device`` in
    ``weight_dtype`` (the mixed-precision dtype)."""
    networks, vae = load_pretrained(folders, weight_dtype)
    counts = select_trainable(networks, settings.trained(), list(settings.trainable_modules))
    vae.requires_grad_(False)
    if settings.gradient_checkpointing:
        networks["diffusion_net"].enable_gradient_checkpointing()
        if counts["reference_net"]:
            networks["reference_net"].enable_gradient_checkpointing()
    if allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    vae.to(device).eval()
    model = MemoTrainingModel(**networks, dropout=ConditionDropout.from_settings(dropout_settings))
    model.train()
    logger.info(
        f"Trainable parameters: {sum(counts.values()) / 1e6:.3f} M "
        f"({', '.join(f'{k} {v / 1e6:.3f} M' for k, v in counts.items())})"
    )
    return model, vae
