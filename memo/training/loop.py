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
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
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
from memo.loading import ModelLocator, locate_checkpoint
from memo.pipeline import NETWORKS
from memo.settings.training import dataloader_workers
from memo.training.checkpointing import (
    checkpoint_step,
    load_networks,
    prune_checkpoints,
    resolve_resume,
    save_networks,
    write_training_state,
)
from memo.training.conditioning import ConditionDropout
from memo.training.flow_matching import FlowMatchingObjective, robust_mean
from memo.training.model import MemoTrainingModel
from memo.training.optim import build_lr_scheduler, build_optimizer
from memo.training.trainable import select_trainable
from memo.training.validation import render_validation

logger = get_logger(__name__, log_level="INFO")


def locate_training_models(model_name_or_path: str, vae_name_or_path: str) -> tuple[Path, Path]:
    """The local folders of the checkpoint and the VAE, found or fetched as inference finds them
    (:func:`memo.loading.locate_checkpoint`); one :class:`~memo.io.hub.MissingModelError` lists what cannot be
    had, with the command that downloads it. Cheap once downloaded, so it runs before anything else starts."""
    locator = ModelLocator()
    root, vae_dir = locate_checkpoint(locator, model_name_or_path, vae_name_or_path)
    locator.check()
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


def train(config: DictConfig) -> dict:
    """Run (or resume) a finetuning run as configured; returns a summary (final step, last loss, ...)."""
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

    # Networks, trainable parts, memory savers.
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
    params = [p for p in model.parameters() if p.requires_grad]
    logger.info(
        f"Trainable parameters: {sum(counts.values()) / 1e6:.3f} M "
        f"({', '.join(f'{k} {v / 1e6:.3f} M' for k, v in counts.items())})"
    )

    # Optimizer, data, schedule.
    batch_size = int(config.train_batch_size)
    learning_rate = float(config.learning_rate)
    if config.scale_lr:
        learning_rate *= accelerator.gradient_accumulation_steps * batch_size * accelerator.num_processes
    optimizer = build_optimizer(
        params,
        learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
        use_8bit_adam=config.use_8bit_adam,
    )
    audio_config = networks["audio_proj"].config
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
        face_dim=networks["image_proj"].config.clip_embeddings_dim,
        max_attempts=data.max_attempts,
        length_tolerance=data.length_tolerance,
    )
    workers = dataloader_workers(data.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    dataloader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=int(data.prefetch_factor) if workers > 0 else None,
        persistent_workers=workers > 0,
    )
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

    # Checkpoints keep the networks once, in the published layout, instead of accelerate's model file.
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
        if native:
            del weights[:]

    def load_hook(models, directory):
        if native:
            for wrapped in models:
                load_networks(accelerator.unwrap_model(wrapped).networks(), directory)
            del models[:]

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    accumulation = accelerator.gradient_accumulation_steps  # DeepSpeed's own setting wins when it has one
    if accumulation != config.gradient_accumulation_steps:
        logger.warning(
            f"Gradient accumulation is {accumulation} steps (set by the launcher), "
            f"not the config's {config.gradient_accumulation_steps}."
        )
    if ema is not None:
        ema.to(accelerator.device)
    encode = _Encoder(vae, weight_dtype, int(config.vae_batch_size))
    objective = FlowMatchingObjective(
        OmegaConf.to_container(config.noise_scheduler_kwargs),
        config.weighting_scheme,
        config.logit_mean,
        config.logit_std,
        config.mode_scale,
    )
    threshold = float(config.robust_loss_threshold) if config.robust_training else None

    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers(config.tracker_project_name, config=_flat_config(config))
    metrics_path = output_dir / "logs" / "metrics.jsonl"

    def record(entry: dict) -> None:
        if accelerator.is_main_process:
            with metrics_path.open("a") as stream:
                stream.write(json.dumps(entry) + "\n")

    # Resume.
    global_step = 0
    resume = resolve_resume(output_dir, config.resume_from_checkpoint)
    if resume is not None:
        accelerator.load_state(str(resume))
        if ema is not None:
            ema.to(accelerator.device)
        global_step = checkpoint_step(resume)
        event = {
            "event": "resume",
            "checkpoint": str(resume),
            "step": global_step,
            "optimizer_steps": _optimizer_steps(optimizer),
            "lr": lr_scheduler.get_last_lr()[0],
        }
        record(event)
        logger.info(f"Resumed from {resume} at step {global_step}")
    elif config.resume_from_checkpoint:
        logger.info(f"No checkpoint in {output_dir} yet; starting from step 0")
    start_step = global_step

    if len(dataloader) == 0:
        raise ValueError("The dataloader yields no batch: the data holds fewer videos than processes.")
    updates_per_epoch = max(1, math.ceil(len(dataloader) / accumulation))
    total_batch = batch_size * accelerator.num_processes * accumulation
    logger.info(
        f"Training: {len(dataset)} videos, {batch_size} per device x {accelerator.num_processes} processes x "
        f"{accumulation} accumulation = {total_batch} clips per step, steps {global_step} -> {config.max_train_steps}"
    )

    def save_checkpoint(step: int) -> Path:
        """Every process writes its part into one hidden partial folder; the main process renames it onto
        ``checkpoint-<step>`` once all are done, so a killed run never leaves a checkpoint ``latest`` would
        pick up half-written (the next run removes the partial, memo.io.partial)."""
        path = output_dir / f"checkpoint-{step}"
        with contextlib.ExitStack() as stack:
            names = [None]
            if accelerator.is_main_process:
                for removed in prune_checkpoints(output_dir, config.checkpoints_total_limit):
                    logger.info(f"Removed old checkpoint {removed}")
                partial = stack.enter_context(Partial(path, directory=True))
                names = [str(partial.path)]
            names = broadcast_object_list(names)
            accelerator.save_state(names[0])
            if accelerator.is_main_process:
                write_training_state(names[0], step)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                partial.publish()
        accelerator.wait_for_everyone()
        logger.info(f"Saved checkpoint {path}")
        return path

    validation = config.validation

    def validate(step: int) -> None:
        if accelerator.is_main_process:
            entries = dataset.entries
            wanted = validation.video_id
            entry = next((e for e in entries if e.get("id") == wanted), None) if wanted else entries[0]
            if entry is None:
                logger.warning(f"validation.video_id={wanted!r} is not in the data; skipping validation")
            else:
                try:
                    path = render_validation(
                        accelerator.unwrap_model(model).networks(),
                        vae,
                        entry,
                        output_dir / "validation" / f"step-{step}.mp4",
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
                    record({"event": "validation", "step": step, "video": str(path)})
                    logger.info(f"Validation video: {path}")
                except Exception as err:  # noqa: BLE001 - a failed preview must not end a long run
                    logger.error(f"Validation at step {step} failed: {type(err).__name__}: {err}")
        accelerator.wait_for_everyone()

    # Train.
    loss_sum = kept_sum = seen_sum = 0.0
    replaced_total = 0
    last_loss = None
    last_saved = global_step if resume is not None else None
    tick = data_tick = time.perf_counter()
    data_time = 0.0
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * accumulation
    finished = global_step >= config.max_train_steps
    for epoch in itertools.count(first_epoch):
        if finished:
            break
        loader = dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(dataloader, skip_batches)
        for batch in loader:
            data_time += time.perf_counter() - data_tick
            with accelerator.accumulate(model):
                pixels, references = batch["pixel_values"], batch["reference_values"]
                clips, frames = pixels.shape[:2]
                latents = encode(pixels.flatten(0, 1)).unflatten(0, (clips, frames)).transpose(1, 2)
                reference_latents = encode(references.flatten(0, 1))
                noise = torch.randn_like(latents)
                timesteps, sigmas = objective.sample_timesteps(clips, latents.device)
                noisy = objective.add_noise(latents, noise, sigmas)
                prediction = model(
                    noisy,
                    timesteps,
                    reference_latents,
                    batch["face_emb"],
                    batch["audio_emb"],
                    batch["emotion"],
                    dropout.sample(clips, latents.device),
                )
                losses = objective.per_sample_loss(prediction, noisy, latents, sigmas)
                loss, kept = robust_mean(losses, threshold)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and config.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(params, float(config.max_grad_norm))
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            stats = torch.stack(
                [
                    loss.detach().float(),
                    kept.float(),
                    torch.tensor(float(clips), device=loss.device),
                    batch["replaced"].sum().float().to(loss.device),
                ]
            )
            gathered = accelerator.gather(stats[None]).reshape(-1, 4)
            loss_sum += gathered[:, 0].mean().item()
            kept_sum += gathered[:, 1].sum().item()
            seen_sum += gathered[:, 2].sum().item()
            replaced_total += int(gathered[:, 3].sum().item())

            if accelerator.sync_gradients:
                global_step += 1
                if ema is not None:
                    ema.step(params)
                now = time.perf_counter()
                last_loss = loss_sum / accumulation
                metrics = {
                    "step": global_step,
                    "loss": last_loss,
                    "lr": lr_scheduler.get_last_lr()[0],
                    "samples_per_second": seen_sum / max(now - tick, 1e-9),
                    "step_time": now - tick,
                    "data_time": data_time,
                    "robust_kept_fraction": kept_sum / max(seen_sum, 1.0),
                    "replaced_samples": replaced_total,
                    "epoch": epoch,
                }
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                if not math.isfinite(last_loss):
                    logger.warning(f"Non-finite loss at step {global_step}")
                accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=global_step)
                record(metrics)
                if global_step % config.logging_steps == 0:
                    logger.info(
                        f"step {global_step}: loss {last_loss:.4f}, lr {metrics['lr']:.3g}, "
                        f"{metrics['samples_per_second']:.2f} clips/s"
                    )
                loss_sum = kept_sum = seen_sum = 0.0
                data_time = 0.0
                tick = now

                if global_step % config.checkpointing_steps == 0 or global_step >= config.max_train_steps:
                    save_checkpoint(global_step)
                    last_saved = global_step
                if validation.steps and global_step % validation.steps == 0:
                    validate(global_step)
                if global_step >= config.max_train_steps:
                    finished = True
                    break
            data_tick = time.perf_counter()

    if last_saved != global_step:
        save_checkpoint(global_step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {
        "step": global_step,
        "start_step": start_step,
        "loss": last_loss,
        "replaced_samples": replaced_total,
        "output_dir": str(output_dir),
    }
