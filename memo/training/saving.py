"""Writing a run's checkpoints with accelerate: the networks held once, in the published layout, and a save
that a kill at any point leaves with a complete checkpoint (the folder rules are :mod:`checkpointing`'s)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, broadcast_object_list

from memo.io.partial import Partial
from memo.training.checkpointing import (
    load_networks,
    prune_checkpoints,
    reached,
    save_networks,
    sync_folder,
    sync_tree,
    write_training_state,
)

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

    from memo.training.run import TrainingRun

logger = get_logger(__name__, log_level="INFO")


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
        limit = run.config.checkpointing.checkpoints_total_limit
        for removed in prune_checkpoints(run.output_dir, limit, keep=path):
            logger.info(f"Removed old checkpoint {removed}")
    return path
