"""The run's batches: the dataset of the ``data`` section, its shuffling loader, and the endless stream of
``(epoch, batch)`` a run (or a resumed run) trains on."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from memo.data.dataset import TalkingVideoDataset
from memo.settings.training import DataSettings, dataloader_workers
from memo.training.model import MemoTrainingModel


def build_dataloader(
    settings: DataSettings, entries: list[dict], batch_size: int, model: MemoTrainingModel
) -> tuple[TalkingVideoDataset, DataLoader]:
    """The dataset of the prepared videos ``entries`` (audio windows and face embeddings shaped as ``model``'s
    projections expect them) and its shuffling loader of ``batch_size`` clips, with the worker count shared
    among this machine's processes."""
    audio_config = model.audio_proj.config
    dataset = TalkingVideoDataset.from_settings(
        settings,
        entries,
        audio_window_shape=(audio_config.seq_len, audio_config.blocks, audio_config.channels),
        face_dim=model.image_proj.config.clip_embeddings_dim,
    )
    workers = dataloader_workers(settings.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    dataloader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=settings.prefetch_factor if workers > 0 else None,
        persistent_workers=workers > 0,
    )
    return dataset, dataloader


def epoch_batches(
    accelerator: Accelerator, dataloader: DataLoader, start_step: int, updates_per_epoch: int, accumulation: int
) -> Iterator[tuple[int, dict]]:
    """``(epoch, batch)`` from the epoch ``start_step`` falls in onwards, without end; a resumed run skips the
    batches its first epoch already trained on, so that it sees what an uninterrupted run would."""
    first_epoch = start_step // updates_per_epoch
    skip_batches = (start_step % updates_per_epoch) * accumulation
    for epoch in itertools.count(first_epoch):
        loader = dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(dataloader, skip_batches)
        for batch in loader:
            yield epoch, batch
