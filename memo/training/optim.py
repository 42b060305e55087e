"""The optimizer (AdamW, or bitsandbytes' 8-bit AdamW) and the learning-rate schedule."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.optimization import get_scheduler

from memo.settings.training import OptimizerSettings, ScheduleSettings


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter],
    learning_rate: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.01,
    eps: float = 1e-8,
    use_8bit_adam: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over ``parameters``; with ``use_8bit_adam``, bitsandbytes' AdamW8bit (needs a CUDA GPU)."""
    optimizer_class = torch.optim.AdamW
    if use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError as err:
            raise ImportError(
                "use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or set use_8bit_adam=false)."
            ) from err
        optimizer_class = bitsandbytes.optim.AdamW8bit
    return optimizer_class(
        list(parameters),
        lr=learning_rate,
        betas=betas,
        weight_decay=weight_decay,
        eps=eps,
    )


def optimizer_for(
    parameters: Iterable[torch.nn.Parameter], settings: OptimizerSettings, clips_per_step: int
) -> torch.optim.Optimizer:
    """:func:`build_optimizer` as the ``optimizer`` settings say; with ``scale_lr`` the learning rate is
    multiplied by ``clips_per_step`` (accumulation x per-device batch x processes)."""
    return build_optimizer(
        parameters,
        settings.learning_rate * (clips_per_step if settings.scale_lr else 1),
        betas=(settings.adam_beta1, settings.adam_beta2),
        weight_decay=settings.adam_weight_decay,
        eps=settings.adam_epsilon,
        use_8bit_adam=settings.use_8bit_adam,
    )


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    warmup_steps: int,
    training_steps: int,
    num_processes: int = 1,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' schedule ``name`` ("constant", "constant_with_warmup", "linear", "cosine", ...).

    Once prepared by accelerate, a scheduler steps once per process for each optimizer step, hence the
    step counts are multiplied by ``num_processes`` (as diffusers' training scripts do).
    """
    return get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=warmup_steps * num_processes,
        num_training_steps=training_steps * num_processes,
        num_cycles=num_cycles,
        power=power,
    )


def lr_scheduler_for(
    optimizer: torch.optim.Optimizer, settings: ScheduleSettings, num_processes: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """:func:`build_lr_scheduler` as the ``schedule`` settings say."""
    return build_lr_scheduler(
        optimizer,
        settings.lr_scheduler,
        settings.lr_warmup_steps,
        settings.max_train_steps,
        num_processes,
        settings.lr_num_cycles,
        settings.lr_power,
    )
