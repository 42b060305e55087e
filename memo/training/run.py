"""One run's parts, built once: the accelerator, the model, optimizer, schedule, data, EMA and objective,
prepared by accelerate and gathered in a :class:`TrainingRun` that every later phase reads."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader

from memo.constants import DTYPES
from memo.data.dataset import TalkingVideoDataset, load_metadata
from memo.sampling.conditioning import encode_frames
from memo.settings.schema import flat_values
from memo.settings.training import TrainingConfig
from memo.training.batches import build_dataloader
from memo.training.checkpointing import resolve_resume
from memo.training.flow_matching import FlowMatchingObjective
from memo.training.networks import ModelFolders, build_model, locate_training_models
from memo.training.optim import lr_scheduler_for, optimizer_for
from memo.training.saving import register_checkpoint_hooks

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

logger = get_logger(__name__, log_level="INFO")


@dataclass(frozen=True)
class RunInputs:
    """What a run reads before it starts, found once (by ``finetune.py``'s checks, or by :func:`find_inputs`):
    the model folders and the prepared videos' metadata."""

    folders: ModelFolders
    entries: list[dict]
    resume: Path | None = None
    """The checkpoint ``resume_from_checkpoint`` chose, checked whole
    (:func:`~memo.training.checkpointing.resolve_resume`); None: start from step 0."""


def find_inputs(config: TrainingConfig) -> RunInputs:
    """Locate the checkpoint and VAE, read the metadata of ``data.data_dirs`` and choose the checkpoint to resume
    from; raises :class:`~memo.io.hub.MissingModelError`, ``FileNotFoundError`` or
    :class:`~memo.training.checkpointing.CheckpointError` naming what is missing."""
    folders = locate_training_models(config.models.model_name_or_path, config.models.vae)
    resume = resolve_resume(config.output_dir, config.checkpointing.resume_from_checkpoint)
    return RunInputs(folders, load_metadata(list(config.data.data_dirs)), resume)


def make_accelerator(config: TrainingConfig) -> Accelerator:
    """The run's :class:`~accelerate.Accelerator` (accumulation, mixed precision, trackers, DDP options); seeds
    every process when ``seed`` is set and, on the main process, creates ``<output_dir>/logs`` and saves the
    settings as ``<output_dir>/config.yaml``."""
    output_dir = Path(config.output_dir)
    tracking = config.tracking
    accelerator = Accelerator(
        gradient_accumulation_steps=config.schedule.gradient_accumulation_steps,
        mixed_precision=tracking.mixed_precision,
        log_with=None if tracking.report_to == "none" else tracking.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=tracking.ddp_find_unused_parameters)],
    )
    logger.info(accelerator.state, main_process_only=False)
    if config.seed is not None:
        set_seed(config.seed, device_specific=True)
    if accelerator.is_main_process:
        (output_dir / "logs").mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config.to_yaml())
    return accelerator


@dataclass
class TrainingRun:
    """The parts of one run that :func:`prepare_run` builds once and every later phase reads."""

    config: TrainingConfig
    accelerator: Accelerator
    model: torch.nn.Module
    """The :class:`MemoTrainingModel` as accelerate prepared it (wrapped under DDP)."""
    vae: AutoencoderKL
    params: list[torch.nn.Parameter]
    optimizer: AcceleratedOptimizer
    lr_scheduler: AcceleratedScheduler
    dataset: TalkingVideoDataset
    dataloader: DataLoader
    objective: FlowMatchingObjective
    ema: EMAModel | None
    """diffusers' ``EMAModel`` of ``params`` when ``use_ema``."""
    output_dir: Path
    resume: Path | None = None
    """The checkpoint to resume from (:attr:`RunInputs.resume`)."""

    @property
    def accumulation(self) -> int:
        """Batches per optimizer step: accelerate's (a DeepSpeed config's own setting wins over the config's)."""
        return self.accelerator.gradient_accumulation_steps

    @property
    def updates_per_epoch(self) -> int:
        """Optimizer steps per pass over this process's share of the data (at least 1)."""
        return max(1, math.ceil(len(self.dataloader) / self.accumulation))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) frames in [-1, 1] -> (N, 4, H/8, W/8) scaled latents, a sample of the VAE's posterior
        (as the original trains), ``vae_batch_size`` frames per VAE call."""
        return encode_frames(self.vae, pixels, self.config.models.vae_batch_size, self.accelerator.device, sample=True)

    def record(self, entry: dict) -> None:
        """Append ``entry`` as one JSON line to ``<output_dir>/logs/metrics.jsonl`` (main process only)."""
        if self.accelerator.is_main_process:
            with (self.output_dir / "logs" / "metrics.jsonl").open("a") as stream:
                stream.write(json.dumps(entry) + "\n")


def _hparams(config: TrainingConfig) -> dict:
    """The settings as flat names with scalar values (what tensorboard's hparams accept)."""
    return {
        name: value if isinstance(value, (int, float, str, bool)) else str(value)
        for name, value in flat_values(config).items()
    }


def prepare_run(config: TrainingConfig, accelerator: Accelerator, inputs: RunInputs | None = None) -> TrainingRun:
    """Build the model, optimizer, data, schedule and EMA, register the checkpoint hooks, let accelerate
    prepare them, and start the trackers; everything later phases need, in one :class:`TrainingRun`.
    ``inputs`` are found here when the caller has not found them. Raises ``ValueError`` when this process's
    share of the data holds no batch."""
    inputs = inputs or find_inputs(config)
    schedule, optimizer_settings = config.schedule, config.optimizer
    model, vae = build_model(
        config.models,
        config.dropout,
        inputs.folders,
        accelerator.device,
        DTYPES.get(accelerator.mixed_precision, torch.float32),
        config.tracking.allow_tf32,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    clips_per_step = accelerator.gradient_accumulation_steps * schedule.train_batch_size * accelerator.num_processes
    optimizer = optimizer_for(params, optimizer_settings, clips_per_step)
    dataset, dataloader = build_dataloader(config.data, inputs.entries, schedule.train_batch_size, model)
    lr_scheduler = lr_scheduler_for(optimizer, schedule, accelerator.num_processes)
    ema = None
    if optimizer_settings.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=optimizer_settings.ema_decay)
        accelerator.register_for_checkpointing(ema)
    register_checkpoint_hooks(accelerator, ema, params, inputs.folders.root)

    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    if len(dataloader) == 0:
        raise ValueError("The dataloader yields no batch: the data holds fewer videos than processes.")
    if accelerator.gradient_accumulation_steps != schedule.gradient_accumulation_steps:
        logger.warning(
            f"Gradient accumulation is {accelerator.gradient_accumulation_steps} steps (set by the launcher), "
            f"not the config's {schedule.gradient_accumulation_steps}."
        )
    if ema is not None:
        ema.to(accelerator.device)
    if accelerator.is_main_process and config.tracking.report_to != "none":
        accelerator.init_trackers(config.tracking.tracker_project_name, config=_hparams(config))
    return TrainingRun(
        config=config,
        accelerator=accelerator,
        model=model,
        vae=vae,
        params=params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        dataset=dataset,
        dataloader=dataloader,
        objective=FlowMatchingObjective.from_settings(config.objective),
        ema=ema,
        output_dir=Path(config.output_dir),
        resume=inputs.resume,
    )
