"""The finetuning loop: resume, train, save and validate, finish.

Everything distributed is accelerate's: the same code runs on one process, several GPUs (DDP) or several
machines, with or without DeepSpeed, as ``accelerate launch`` sets it up. Each optimizer step:

1. the clip frames and the reference + past frames are VAE-encoded (a latent sample, as the original);
2. one timestep per sample is drawn and the clip latents are noised (:mod:`flow_matching`);
3. some samples lose their image, audio or emotion conditioning (:mod:`conditioning`);
4. the networks predict the velocity (:mod:`model`); the weighted x0 loss, filtered by the robust-training
   threshold, is backpropagated; gradients are clipped and accumulated as configured (:mod:`step`);
5. loss, learning rate, throughput and data replacements are logged to the trackers and to
   ``<output_dir>/logs/metrics.jsonl``; checkpoints (:mod:`saving`) and validation videos (:mod:`validation`)
   are written every so many steps.

:func:`train` runs the phases in order: :func:`~memo.training.run.make_accelerator` and
:func:`~memo.training.run.prepare_run` (the parts of the run, built once), :func:`resume_run` (the
:class:`~memo.training.step.TrainState` the loop carries), then per batch the functions of :mod:`step` and
:func:`save_and_validate`; :func:`finish_run` writes the last checkpoint and returns the summary.
"""

from __future__ import annotations

import time

from accelerate.logging import get_logger

from memo.io.model_files import ModelFolder
from memo.io.model_load import model_boundary
from memo.settings.training import TrainingConfig
from memo.training.batches import epoch_batches
from memo.training.checkpointing import checkpoint_step
from memo.training.run import RunInputs, TrainingRun, make_accelerator, prepare_run
from memo.training.saving import save_checkpoint
from memo.training.step import TrainState, add_batch_stats, end_optimizer_step, training_step
from memo.training.validation import validate

logger = get_logger(__name__, log_level="INFO")

RESUME_FIX = "resume from another checkpoint of the run, or start afresh without resume_from_checkpoint"


def _optimizer_steps(optimizer) -> int | None:
    """The step count stored in the (first parameter's) optimizer state, when the optimizer keeps one."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in getattr(inner, "state", {}).values():
        if isinstance(state, dict) and "step" in state:
            return int(state["step"])
    return None


def resume_run(run: TrainingRun) -> TrainState:
    """Load the checkpoint ``resume_from_checkpoint`` chose (:attr:`TrainingRun.resume`, checked whole before the
    run started) with accelerate, the optimizer, scheduler, random generators and EMA included, and log a
    ``resume`` event; the state starts at its step (at 0 without one). A file that still fails to load is one
    :class:`~memo.io.model_files.DamagedModelError` line."""
    accelerator, wanted = run.accelerator, run.config.checkpointing.resume_from_checkpoint
    state = TrainState()
    resume = run.resume
    if resume is not None:
        with model_boundary(ModelFolder("resume_from_checkpoint", wanted, resume, (), fix=RESUME_FIX)):
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
    elif wanted:
        logger.info(f"No checkpoint in {run.output_dir} yet; starting from step 0")
    return state


def save_and_validate(run: TrainingRun, state: TrainState) -> None:
    """After an optimizer step: a checkpoint every ``checkpointing_steps`` and at the last step, a preview
    video every ``validation.steps``."""
    every, last = run.config.checkpointing.checkpointing_steps, run.config.schedule.max_train_steps
    if state.step % every == 0 or state.step >= last:
        save_checkpoint(run, state.step)
        state.last_saved = state.step
    validation = run.config.validation
    if validation.steps and state.step % validation.steps == 0:
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


def train(config: TrainingConfig, inputs: RunInputs | None = None) -> dict:
    """Run (or resume) a finetuning run as configured (:mod:`memo.settings.training`), on the checkpoint, VAE
    and prepared videos of ``inputs`` (found here when not given: ``finetune.py`` finds them in its checks).

    Returns the summary: ``step`` (the final global step), ``start_step``, ``loss`` (of the last optimizer
    step, None when no step ran), ``replaced_samples`` and ``output_dir``. Raises ``ValueError`` when the
    data yields no batch (:func:`~memo.training.run.prepare_run`)."""
    accelerator = make_accelerator(config)
    run = prepare_run(config, accelerator, inputs)
    state = resume_run(run)
    batch_size, last_step = config.schedule.train_batch_size, config.schedule.max_train_steps
    logger.info(
        f"Training: {len(run.dataset)} videos, {batch_size} per device x {accelerator.num_processes} processes x "
        f"{run.accumulation} accumulation = {batch_size * accelerator.num_processes * run.accumulation} clips per "
        f"step, steps {state.step} -> {last_step}"
    )
    if state.step < last_step:
        state.tick = data_tick = time.perf_counter()
        batches = epoch_batches(accelerator, run.dataloader, state.step, run.updates_per_epoch, run.accumulation)
        for epoch, batch in batches:
            state.data_time += time.perf_counter() - data_tick
            result = training_step(run, batch)
            add_batch_stats(run, state, batch, result)
            if accelerator.sync_gradients:
                end_optimizer_step(run, state, epoch, result.grad_norm)
                save_and_validate(run, state)
                if state.step >= last_step:
                    break
            data_tick = time.perf_counter()
    return finish_run(run, state)
