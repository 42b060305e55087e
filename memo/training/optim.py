"""The optimizer (AdamW, or bitsandbytes' 8-bit AdamW) and the learning-rate schedule."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.optimization import get_scheduler


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
        lr=float(learning_rate),
        betas=(float(betas[0]), float(betas[1])),
        weight_decay=float(weight_decay),
        eps=float(eps),
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
        num_warmup_steps=int(warmup_steps) * num_processes,
        num_training_steps=int(training_steps) * num_processes,
        num_cycles=int(num_cycles),
        power=float(power),
    )
