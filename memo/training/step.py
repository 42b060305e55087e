"""One batch of training and the bookkeeping of an optimizer step: encode, noise, drop conditions, predict,
backpropagate (:func:`training_step`); gather the batch's statistics from every process
(:func:`add_batch_stats`); count, log and reset at the end of each optimizer step (:func:`end_optimizer_step`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from accelerate.logging import get_logger

from memo.training.flow_matching import robust_mean

if TYPE_CHECKING:
    from memo.training.run import TrainingRun

logger = get_logger(__name__, log_level="INFO")


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
    warned_all_left_out: bool = False
    """Whether this run has warned of a step whose every sample the robust threshold left out."""


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
    accelerator, max_grad_norm = run.accelerator, run.config.optimizer.max_grad_norm
    with accelerator.accumulate(run.model):
        pixels, references = batch["pixel_values"], batch["reference_values"]
        clips, frames = pixels.shape[:2]
        latents = run.encode(pixels.flatten(0, 1)).unflatten(0, (clips, frames)).transpose(1, 2)
        reference_latents = run.encode(references.flatten(0, 1))
        noise = torch.randn_like(latents)
        timesteps, sigmas = run.objective.sample_timesteps(clips, latents.device)
        noisy = run.objective.add_noise(latents, noise, sigmas)
        model = accelerator.unwrap_model(run.model)
        prediction = run.model(
            noisy,
            timesteps,
            reference_latents,
            batch["face_emb"],
            batch["audio_emb"],
            batch["emotion"],
            model.dropout.sample(clips, latents.device),
        )
        losses = run.objective.per_sample_loss(prediction, noisy, latents, sigmas)
        loss, kept = robust_mean(losses, run.config.objective.threshold)
        accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients and max_grad_norm:
            grad_norm = accelerator.clip_grad_norm_(run.params, max_grad_norm)
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
    if state.seen_sum and not state.kept_sum and not state.warned_all_left_out:
        state.warned_all_left_out = True  # once a run: a model far from MEMO's weights may stay above it for long
        logger.warning(
            f"step {state.step}: every sample's loss was above robust_loss_threshold="
            f"{run.config.objective.robust_loss_threshold}, so nothing was learned from it; robust training "
            "expects MEMO's published weights (set robust_training=false, or raise the threshold, for others)"
        )
    run.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=state.step)
    run.record(metrics)
    if state.step % run.config.tracking.logging_steps == 0:
        logger.info(
            f"step {state.step}: loss {state.last_loss:.4f}, lr {metrics['lr']:.3g}, "
            f"{metrics['samples_per_second']:.2f} clips/s"
        )
    state.loss_sum = state.kept_sum = state.seen_sum = state.data_time = 0.0
    state.tick = now
