"""The finetuning loop: load, prepare with accelerate, train, log, checkpoint, validate, resume.

Everything distributed is accelerate's: the same code runs on one process, several GPUs (DDP) or
several machines, with or without DeepSpeed, as ``accelerate launch`` sets it up. Each optimizer step:

1. the clip frames and the reference + past frames are VAE-encoded (a latent sample, as the original);
2. one timestep per sample is drawn and the clip latents are noised (:mod:`flow_matching`);
3. some samples lose their image, audio or emotion conditioning (:mod:`conditioning`);
4. the networks predict the velocity (:mod:`model`); the weighted x0 loss, filtered by the robust-training
   threshold, is backpropagated; gradients are clipped and accumulated as configured;
5. loss, learning rate, throughput and data replacements are logged to the trackers and to
   ``<output_dir>/logs/metrics.jsonl``; checkpoints (:mod:`checkpointing`) and validation videos
   (:mod:`validation`) are written every so many steps.

:func:`train` runs the phases in order, each a function of its own: :func:`make_accelerator`,
:func:`build_model`, :func:`build_optimizer_for`, :func:`build_dataloader`, :func:`prepare_run` (which
gathers what every later phase uses into a :class:`TrainingRun`), :func:`resume_run` (which returns the
:class:`TrainState` the loop carries), then per batch :func:`training_step`, :func:`add_batch_stats` and, at
the end of each optimizer step, :func:`end_optimizer_step` and :func:`save_and_validate`; :func:`finish_run`
writes the last checkpoint and returns the summary.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)
from diffusers import AutoencoderKL
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from memo.constants import DTYPES
from memo.data.dataset import TalkingVideoDataset
from memo.io.partial import Partial
from memo.loading import ModelLocator, check_checkpoint_files, locate_checkpoint
from memo.pipeline import NETWORKS
from memo.settings.training import dataloader_workers
from memo.training.checkpointing import (
    checkpoint_step,
    load_networks,
    prune_checkpoints,
    reached,
    resolve_resume,
    save_networks,
    sync_folder,
    sync_tree,
    write_training_state,
)
from memo.training.conditioning import ConditionDropout
from memo.training.flow_matching import FlowMatchingObjective, robust_mean
from memo.training.model import MemoTrainingModel
from memo.training.optim import build_lr_scheduler, build_optimizer
from memo.training.trainable import select_trainable
from memo.training.validation import render_validation

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

logger = get_logger(__name__, log_level="INFO")


def locate_training_models(model_name_or_path: str, vae_name_or_path: str) -> tuple[Path, Path]:
    """The local folders of the checkpoint and the VAE, found or fetched as inference finds them
    (:func:`memo.loading.locate_checkpoint`); one :class:`~memo.io.hub.MissingModelError` lists what cannot be
    had, with the command that downloads it. Cheap once downloaded, so it runs before anything else starts."""
    locator = ModelLocator()
    root, vae_dir = locate_checkpoint(locator, model_name_or_path, vae_name_or_path)
    locator.check()
    check_checkpoint_files(model_name_or_path, root, vae_name_or_path, vae_dir)
    return root, vae_dir


def load_model_components(
    model_name_or_path: str, vae_name_or_path: str, vae_dtype: torch.dtype = torch.float32
) -> tuple[dict, AutoencoderKL, Path]:
    """The four networks of a checkpoint in the published layout (a directory or a hub id), the VAE (in
    ``vae_dtype``), and the local directory the networks came from."""
    root, vae_dir = locate_training_models(model_name_or_path, vae_name_or_path)
    networks = {name: network.from_pretrained(root / name) for name, network in NETWORKS.items()}
    return networks, AutoencoderKL.from_pretrained(vae_dir, torch_dtype=vae_dtype), root


def _optimizer_steps(optimizer) -> int | None:
    """The step count stored in the (first parameter's) optimizer state, when the optimizer keeps one."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in getattr(inner, "state", {}).values():
        if isinstance(state, dict) and "step" in state:
            return int(state["step"])
    return None


def _flat_config(config: DictConfig) -> dict:
    """The config as flat ``a.b`` keys with scalar values (what tensorboard's hparams accept)."""
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk(OmegaConf.to_container(config, resolve=True), "")
    return flat


class _Encoder:
    """VAE-encodes frames into scaled latent samples, ``batch_size`` frames at a time."""

    def __init__(self, vae: AutoencoderKL, dtype: torch.dtype, batch_size: int):
        self.vae, self.dtype, self.batch_size = vae, dtype, batch_size

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = [
            self.vae.encode(chunk.to(self.vae.device, self.dtype)).latent_dist.sample()
            for chunk in pixels.split(self.batch_size)
        ]
        return torch.cat(latents) * self.vae.config.scaling_factor


# -- the phases of a run, in the order train() calls them ---------------------------------------------


def make_accelerator(config: DictConfig) -> Accelerator:
    """The run's :class:`~accelerate.Accelerator` (accumulation, mixed precision, trackers, DDP options from
    ``config``); seeds every process when ``config.seed`` is set and, on the main process, creates
    ``<output_dir>/logs`` and saves the config as ``<output_dir>/config.yaml``."""
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(config.ddp_find_unused_parameters))],
    )
    logger.info(accelerator.state, main_process_only=False)
    if config.seed is not None:
        set_seed(int(config.seed), device_specific=True)
    if accelerator.is_main_process:
        (output_dir / "logs").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, output_dir / "config.yaml")
    return accelerator


def build_model(
    config: DictConfig, accelerator: Accelerator
) -> tuple[MemoTrainingModel, AutoencoderKL, ConditionDropout, Path]:
    """The networks to train as one :class:`MemoTrainingModel` (in train mode, trainable parts selected,
    gradient checkpointing as configured), the frozen VAE on the accelerator's device in the mixed-precision
    dtype, the conditioning dropout, and the local folder the networks came from."""
    weight_dtype = DTYPES.get(accelerator.mixed_precision, torch.float32)
    networks, vae, source = load_model_components(config.model_name_or_path, config.vae, weight_dtype)
    counts = select_trainable(
        networks, {name: bool(config[f"train_{name}"]) for name in NETWORKS}, list(config.trainable_modules or [])
    )
    vae.requires_grad_(False)
    if config.gradient_checkpointing:
        networks["diffusion_net"].enable_gradient_checkpointing()
        if counts["reference_net"]:
            networks["reference_net"].enable_gradient_checkpointing()
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    vae.to(accelerator.device).eval()
    dropout = ConditionDropout(
        image_ratio=config.uncond_img_ratio,
        audio_ratio=config.uncond_audio_ratio,
        emotion_ratio=config.uncond_emotion_ratio,
        image_mode=config.uncond_img_mode,
        audio_mode=config.uncond_audio_mode,
    )
    model = MemoTrainingModel(**networks, dropout=dropout)
    model.train()
    logger.info(
        f"Trainable parameters: {sum(counts.values()) / 1e6:.3f} M "
        f"({', '.join(f'{k} {v / 1e6:.3f} M' for k, v in counts.items())})"
    )
    return model, vae, dropout, source


def build_optimizer_for(
    config: DictConfig, accelerator: Accelerator, params: list[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """The optimizer over ``params``; with ``scale_lr`` the learning rate is multiplied by the clips per
    optimizer step (accumulation x per-device batch x processes)."""
    learning_rate = float(config.learning_rate)
    if config.scale_lr:
        learning_rate *= (
            accelerator.gradient_accumulation_steps * int(config.train_batch_size) * accelerator.num_processes
        )
    return build_optimizer(
        params,
        learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
        use_8bit_adam=config.use_8bit_adam,
    )


def build_dataloader(config: DictConfig, model: MemoTrainingModel) -> tuple[TalkingVideoDataset, DataLoader]:
    """The dataset of ``config.data`` (audio windows and face embeddings shaped as ``model``'s projections
    expect them) and its shuffling loader, with the worker count shared among this machine's processes."""
    audio_config = model.audio_proj.config
    data = config.data
    dataset = TalkingVideoDataset(
        list(data.data_dirs),
        width=data.width,
        height=data.height,
        n_sample_frames=data.num_generated_frames_per_clip,
        num_past_frames=data.num_past_frames,
        dynamic_past_frames=data.dynamic_past_frames,
        past_first_frame_ratio=data.past_first_frame_ratio,
        past_zero_ratio=data.past_zero_ratio,
        audio_start_ratio=data.audio_start_ratio,
        audio_window_shape=(audio_config.seq_len, audio_config.blocks, audio_config.channels),
        face_dim=model.image_proj.config.clip_embeddings_dim,
        max_attempts=data.max_attempts,
        length_tolerance=data.length_tolerance,
    )
    workers = dataloader_workers(data.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    dataloader = DataLoader(
        dataset,
        batch_size=int(config.train_batch_size),
        shuffle=True,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=int(data.prefetch_factor) if workers > 0 else None,
        persistent_workers=workers > 0,
    )
    return dataset, dataloader


def register_checkpoint_hooks(
    accelerator: Accelerator, ema: EMAModel | None, params: list[torch.nn.Parameter], source: Path
) -> None:
    """Make accelerate's checkpoints hold the networks once, in the published layout (plus ``ema/`` when EMA
    is on), instead of its own model file; loading reads them back. Under DeepSpeed, FSDP and Megatron-LM the
    engine's own model files stay (it needs them) and the published layout is written beside them."""
    native = accelerator.distributed_type not in (
        DistributedType.DEEPSPEED,
        DistributedType.FSDP,
        DistributedType.MEGATRON_LM,
    )

    def save_hook(models, weights, directory):
        if accelerator.is_main_process:
            trained = accelerator.unwrap_model(models[0]).networks()
            save_networks(trained, directory, source)
            if ema is not None:
                ema.store(params)
                ema.copy_to(params)
                save_networks(trained, Path(directory) / "ema", source)
                ema.restore(params)
            reached("networks_written")
        if native:
            del weights[:]

    def load_hook(models, directory):
        if native:
            for wrapped in models:
                load_networks(accelerator.unwrap_model(wrapped).networks(), directory)
            del models[:]

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


@dataclass
class TrainingRun:
    """The parts of one run that :func:`prepare_run` builds once and every later phase reads."""

    config: DictConfig
    accelerator: Accelerator
    model: torch.nn.Module
    """The :class:`MemoTrainingModel` as accelerate prepared it (wrapped under DDP)."""
    vae: AutoencoderKL
    params: list[torch.nn.Parameter]
    optimizer: AcceleratedOptimizer
    lr_scheduler: AcceleratedScheduler
    dataset: TalkingVideoDataset
    dataloader: DataLoader
    dropout: ConditionDropout
    encode: _Encoder
    objective: FlowMatchingObjective
    threshold: float | None
    """The robust-training loss threshold, None when robust training is off."""
    ema: EMAModel | None
    """diffusers' ``EMAModel`` of ``params`` when ``use_ema``."""

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def accumulation(self) -> int:
        """Batches per optimizer step: accelerate's (a DeepSpeed config's own setting wins over the config's)."""
        return self.accelerator.gradient_accumulation_steps

    @property
    def updates_per_epoch(self) -> int:
        """Optimizer steps per pass over this process's share of the data (at least 1)."""
        return max(1, math.ceil(len(self.dataloader) / self.accumulation))

    def record(self, entry: dict) -> None:
        """Append ``entry`` as one JSON line to ``<output_dir>/logs/metrics.jsonl`` (main process only)."""
        if self.accelerator.is_main_process:
            with (self.output_dir / "logs" / "metrics.jsonl").open("a") as stream:
                stream.write(json.dumps(entry) + "\n")


def prepare_run(config: DictConfig, accelerator: Accelerator) -> TrainingRun:
    """Build the model, optimizer, data, schedule and EMA, register the checkpoint hooks, let accelerate
    prepare them, and start the trackers; everything later phases need, in one :class:`TrainingRun`.
    Raises ``ValueError`` when this process's share of the data holds no batch."""
    model, vae, dropout, source = build_model(config, accelerator)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer_for(config, accelerator, params)
    dataset, dataloader = build_dataloader(config, model)
    lr_scheduler = build_lr_scheduler(
        optimizer,
        config.lr_scheduler,
        config.lr_warmup_steps,
        config.max_train_steps,
        accelerator.num_processes,
        config.lr_num_cycles,
        config.lr_power,
    )
    ema = None
    if config.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=float(config.ema_decay))
        accelerator.register_for_checkpointing(ema)
    register_checkpoint_hooks(accelerator, ema, params, source)

    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    if len(dataloader) == 0:
        raise ValueError("The dataloader yields no batch: the data holds fewer videos than processes.")
    if accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
        logger.warning(
            f"Gradient accumulation is {accelerator.gradient_accumulation_steps} steps (set by the launcher), "
            f"not the config's {config.gradient_accumulation_steps}."
        )
    if ema is not None:
        ema.to(accelerator.device)
    objective = FlowMatchingObjective(
        OmegaConf.to_container(config.noise_scheduler_kwargs),
        config.weighting_scheme,
        config.logit_mean,
        config.logit_std,
        config.mode_scale,
    )
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers(config.tracker_project_name, config=_flat_config(config))
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
        dropout=dropout,
        encode=_Encoder(vae, DTYPES.get(accelerator.mixed_precision, torch.float32), int(config.vae_batch_size)),
        objective=objective,
        threshold=float(config.robust_loss_threshold) if config.robust_training else None,
        ema=ema,
    )


@dataclass
class TrainState:
    """What the loop carries from batch to batch: the step, and the sums of the optimizer step under way."""

    step: int = 0
    """Optimizer steps done (the global step, as checkpoints and metrics name it)."""
    start_step: int = 0
    """The step this run started (or resumed) at."""
    last_saved: int | None = None
    """The step of the newest checkpoint of this run, None before the first."""
    last_loss: float | None = None
    """The mean loss of the last optimizer step."""
    replaced: int = 0
    """Samples the dataset replaced (unreadable files) so far, all processes together."""
    loss_sum: float = 0.0
    kept_sum: float = 0.0
    seen_sum: float = 0.0
    data_time: float = 0.0
    """Sums over the batches of the optimizer step under way: loss (means over processes), clips kept by the
    robust threshold, clips seen, seconds spent waiting for data."""
    tick: float = field(default_factory=time.perf_counter)
    """When the optimizer step under way began (``time.perf_counter``)."""


def resume_run(run: TrainingRun) -> TrainState:
    """Load the checkpoint ``config.resume_from_checkpoint`` names (none, a folder, or ``latest``) with
    accelerate, the optimizer, scheduler, random generators and EMA included, and log a ``resume`` event;
    the state starts at its step (at 0 without one)."""
    config, accelerator = run.config, run.accelerator
    state = TrainState()
    resume = resolve_resume(run.output_dir, config.resume_from_checkpoint)
    if resume is not None:
        accelerator.load_state(str(resume))
        if run.ema is not None:
            run.ema.to(accelerator.device)
        state.step = state.start_step = state.last_saved = checkpoint_step(resume)
        run.record(
            {
                "event": "resume",
                "checkpoint": str(resume),
                "step": state.step,
                "optimizer_steps": _optimizer_steps(run.optimizer),
                "lr": run.lr_scheduler.get_last_lr()[0],
            }
        )
        logger.info(f"Resumed from {resume} at step {state.step}")
    elif config.resume_from_checkpoint:
        logger.info(f"No checkpoint in {run.output_dir} yet; starting from step 0")
    return state


def epoch_batches(run: TrainingRun, start_step: int) -> Iterator[tuple[int, dict]]:
    """``(epoch, batch)`` from the epoch ``start_step`` falls in onwards, without end; a resumed run skips the
    batches its first epoch already trained on, so that it sees what an uninterrupted run would."""
    first_epoch = start_step // run.updates_per_epoch
    skip_batches = (start_step % run.updates_per_epoch) * run.accumulation
    for epoch in itertools.count(first_epoch):
        loader = run.dataloader
        if epoch == first_epoch and skip_batches:
            loader = run.accelerator.skip_first_batches(run.dataloader, skip_batches)
        for batch in loader:
            yield epoch, batch


@dataclass
class BatchResult:
    """What :func:`training_step` returns of one batch."""

    loss: torch.Tensor
    """The batch's (robust) mean loss, a 0-dim tensor."""
    kept: torch.Tensor
    """How many of its samples the robust threshold kept, a 0-dim tensor."""
    clips: int
    grad_norm: torch.Tensor | None
    """The gradient norm before clipping, on the batch that completes an optimizer step when clipping is on."""


def training_step(run: TrainingRun, batch: dict) -> BatchResult:
    """One batch under accelerate's gradient accumulation: encode, noise, drop conditions, predict, backward;
    on the batch that completes an optimizer step also clip, step the optimizer and the schedule."""
    config, accelerator = run.config, run.accelerator
    with accelerator.accumulate(run.model):
        pixels, references = batch["pixel_values"], batch["reference_values"]
        clips, frames = pixels.shape[:2]
        latents = run.encode(pixels.flatten(0, 1)).unflatten(0, (clips, frames)).transpose(1, 2)
        reference_latents = run.encode(references.flatten(0, 1))
        noise = torch.randn_like(latents)
        timesteps, sigmas = run.objective.sample_timesteps(clips, latents.device)
        noisy = run.objective.add_noise(latents, noise, sigmas)
        prediction = run.model(
            noisy,
            timesteps,
            reference_latents,
            batch["face_emb"],
            batch["audio_emb"],
            batch["emotion"],
            run.dropout.sample(clips, latents.device),
        )
        losses = run.objective.per_sample_loss(prediction, noisy, latents, sigmas)
        loss, kept = robust_mean(losses, run.threshold)
        accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients and config.max_grad_norm:
            grad_norm = accelerator.clip_grad_norm_(run.params, float(config.max_grad_norm))
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return BatchResult(loss=loss, kept=kept, clips=clips, grad_norm=grad_norm)


def add_batch_stats(run: TrainingRun, state: TrainState, batch: dict, result: BatchResult) -> None:
    """Gather the batch's loss, kept, seen and replaced counts from all processes into ``state``'s sums."""
    loss = result.loss
    stats = torch.stack(
        [
            loss.detach().float(),
            result.kept.float(),
            torch.tensor(float(result.clips), device=loss.device),
            batch["replaced"].sum().float().to(loss.device),
        ]
    )
    gathered = run.accelerator.gather(stats[None]).reshape(-1, 4)
    state.loss_sum += gathered[:, 0].mean().item()
    state.kept_sum += gathered[:, 1].sum().item()
    state.seen_sum += gathered[:, 2].sum().item()
    state.replaced += int(gathered[:, 3].sum().item())


def end_optimizer_step(run: TrainingRun, state: TrainState, epoch: int, grad_norm: torch.Tensor | None) -> None:
    """Count the optimizer step, update the EMA, log its metrics (trackers, metrics.jsonl, every
    ``logging_steps`` the console) and start the sums of the next one."""
    state.step += 1
    if run.ema is not None:
        run.ema.step(run.params)
    now = time.perf_counter()
    state.last_loss = state.loss_sum / run.accumulation
    metrics = {
        "step": state.step,
        "loss": state.last_loss,
        "lr": run.lr_scheduler.get_last_lr()[0],
        "samples_per_second": state.seen_sum / max(now - state.tick, 1e-9),
        "step_time": now - state.tick,
        "data_time": state.data_time,
        "robust_kept_fraction": state.kept_sum / max(state.seen_sum, 1.0),
        "replaced_samples": state.replaced,
        "epoch": epoch,
    }
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    if not math.isfinite(state.last_loss):
        logger.warning(f"Non-finite loss at step {state.step}")
    run.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=state.step)
    run.record(metrics)
    if state.step % run.config.logging_steps == 0:
        logger.info(
            f"step {state.step}: loss {state.last_loss:.4f}, lr {metrics['lr']:.3g}, "
            f"{metrics['samples_per_second']:.2f} clips/s"
        )
    state.loss_sum = state.kept_sum = state.seen_sum = state.data_time = 0.0
    state.tick = now


def save_checkpoint(run: TrainingRun, step: int) -> Path:
    """Write ``<output_dir>/checkpoint-<step>``, then remove the oldest beyond ``checkpoints_total_limit``.

    Every process writes its part into one hidden partial folder; the main process flushes it to disk and
    renames it onto ``checkpoint-<step>`` once all are done, and only then removes old checkpoints, so a run
    killed at any point of a save keeps a complete checkpoint for ``latest`` (the order is
    :data:`memo.training.checkpointing.SAVE_POINTS`; the next run removes what a killed save left)."""
    accelerator = run.accelerator
    path = run.output_dir / f"checkpoint-{step}"
    with contextlib.ExitStack() as stack:
        names = [None]
        if accelerator.is_main_process:
            partial = stack.enter_context(Partial(path, directory=True))
            names = [str(partial.path)]
            reached("partial_created")
        names = broadcast_object_list(names)
        accelerator.save_state(names[0])
        if accelerator.is_main_process:
            write_training_state(names[0], step)
            reached("state_written")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            sync_tree(partial.path)
            reached("synced")
            partial.publish()
            sync_folder(run.output_dir)
            reached("published")
    accelerator.wait_for_everyone()
    logger.info(f"Saved checkpoint {path}")
    if accelerator.is_main_process:
        for removed in prune_checkpoints(run.output_dir, run.config.checkpoints_total_limit, keep=path):
            logger.info(f"Removed old checkpoint {removed}")
    return path


def validate(run: TrainingRun, step: int) -> None:
    """Render the preview video ``<output_dir>/validation/step-<step>.mp4`` of ``validation.video_id`` (the
    first video without one) on the main process. A failed preview is logged, never ends the run."""
    accelerator, data, validation = run.accelerator, run.config.data, run.config.validation
    if accelerator.is_main_process:
        entries = run.dataset.entries
        wanted = validation.video_id
        entry = next((e for e in entries if e.get("id") == wanted), None) if wanted else entries[0]
        if entry is None:
            logger.warning(f"validation.video_id={wanted!r} is not in the data; skipping validation")
        else:
            try:
                path = render_validation(
                    accelerator.unwrap_model(run.model).networks(),
                    run.vae,
                    entry,
                    run.output_dir / "validation" / f"step-{step}.mp4",
                    width=data.width,
                    height=data.height,
                    frames_per_clip=data.num_generated_frames_per_clip,
                    past_frames=data.num_past_frames,
                    num_frames=validation.num_frames,
                    num_inference_steps=validation.inference_steps,
                    guidance_scale=validation.cfg_scale,
                    seed=validation.seed,
                    reference_image=validation.reference_image,
                )
                run.record({"event": "validation", "step": step, "video": str(path)})
                logger.info(f"Validation video: {path}")
            except Exception as err:  # noqa: BLE001 - a failed preview must not end a long run
                logger.error(f"Validation at step {step} failed: {type(err).__name__}: {err}")
    accelerator.wait_for_everyone()


def save_and_validate(run: TrainingRun, state: TrainState) -> None:
    """After an optimizer step: a checkpoint every ``checkpointing_steps`` and at the last step, a preview
    video every ``validation.steps``."""
    config = run.config
    if state.step % config.checkpointing_steps == 0 or state.step >= config.max_train_steps:
        save_checkpoint(run, state.step)
        state.last_saved = state.step
    if config.validation.steps and state.step % config.validation.steps == 0:
        validate(run, state.step)


def finish_run(run: TrainingRun, state: TrainState) -> dict:
    """Save the final step unless it is saved already, close the trackers, and return the summary."""
    if state.last_saved != state.step:
        save_checkpoint(run, state.step)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return {
        "step": state.step,
        "start_step": state.start_step,
        "loss": state.last_loss,
        "replaced_samples": state.replaced,
        "output_dir": str(run.output_dir),
    }


def train(config: DictConfig) -> dict:
    """Run (or resume) a finetuning run as configured (:mod:`memo.settings.training`).

    Returns the summary: ``step`` (the final global step), ``start_step``, ``loss`` (of the last optimizer
    step, None when no step ran), ``replaced_samples`` and ``output_dir``. Raises ``ValueError`` when the
    data yields no batch (:func:`prepare_run`)."""
    accelerator = make_accelerator(config)
    run = prepare_run(config, accelerator)
    state = resume_run(run)
    batch_size = int(config.train_batch_size)
    logger.info(
        f"Training: {len(run.dataset)} videos, {batch_size} per device x {accelerator.num_processes} processes x "
        f"{run.accumulation} accumulation = {batch_size * accelerator.num_processes * run.accumulation} clips per "
        f"step, steps {state.step} -> {config.max_train_steps}"
    )
    if state.step < config.max_train_steps:
        state.tick = data_tick = time.perf_counter()
        for epoch, batch in epoch_batches(run, state.step):
            state.data_time += time.perf_counter() - data_tick
            result = training_step(run, batch)
            add_batch_stats(run, state, batch, result)
            if accelerator.sync_gradients:
                end_optimizer_step(run, state, epoch, result.grad_norm)
                save_and_validate(run, state)
                if state.step >= config.max_train_steps:
                    break
            data_tick = time.perf_counter()
    return finish_run(run, state)
