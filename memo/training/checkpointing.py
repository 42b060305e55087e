"""Training checkpoints: naming, rotation, resumption, and the networks in the published layout.

A checkpoint is ``<output_dir>/checkpoint-<step>/`` holding

* accelerate's state (optimizer, LR scheduler, random generators, dataloader sampler, EMA when used;
  under DeepSpeed also its own model and optimizer shards) for an exact resume;
* ``reference_net/``, ``diffusion_net/``, ``image_proj/``, ``audio_proj/``: each a ``config.json`` and a
  float32 ``diffusion_pytorch_model.safetensors``, the layout of the published checkpoint, so that the
  folder can be given to ``MemoPipeline.from_checkpoint`` (or used as ``model_name_or_path``) as it is;
  ``misc/audio_emotion_classifier/`` is copied from the source checkpoint when it has one;
* ``ema/`` with the same four folders holding the EMA weights, when EMA is on;
* ``training_state.json``: the global step.

A save never leaves the run without a complete checkpoint, however it is stopped (``kill -9``, a power cut):
the new checkpoint is written under a hidden partial name, flushed to disk, renamed onto ``checkpoint-<step>``,
and only then are old checkpoints beyond ``checkpoints_total_limit`` removed, each first renamed to a hidden
partial name (so a removal cut short leaves no half checkpoint for ``latest`` to pick; the next run removes the
rest). The order is :data:`SAVE_POINTS`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from memo.io.hub import EMOTION_CLASSIFIER_FOLDER
from memo.io.partial import Partial

logger = logging.getLogger("memo")

PREFIX = "checkpoint-"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
STATE_NAME = "training_state.json"
EXTRA_FOLDERS = (EMOTION_CLASSIFIER_FOLDER,)
"""Folders of the source checkpoint that are copied into every checkpoint, so that it is a complete model."""

SAVE_POINTS = ("partial_created", "networks_written", "state_written", "synced", "published", "old_moved_aside")
"""The points of a save, in order: the hidden folder made, the networks written into it, accelerate's state and
``training_state.json`` written, everything flushed to disk, the folder renamed onto ``checkpoint-<step>``, an
old checkpoint renamed aside (before it is removed)."""

on_save_point: Callable[[str], None] | None = None
"""Called with each of :data:`SAVE_POINTS` as a save passes it; None (the default) does nothing. For tests that
stop a run at each point (``kill -9``) and check that a complete checkpoint remains."""


def reached(point: str) -> None:
    """Mark that a save has passed ``point`` (one of :data:`SAVE_POINTS`)."""
    if on_save_point is not None:
        on_save_point(point)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoint folders of a run, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := re.fullmatch(rf"{PREFIX}(\d+)", p.name))
    ]
    return [path for _, path in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    """The global step a checkpoint was saved at (from its training_state.json, else from its name)."""
    path = Path(path)
    state = path / STATE_NAME
    if state.is_file():
        return int(json.loads(state.read_text())["step"])
    match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
    if match is None:
        raise ValueError(f"{path} has no {STATE_NAME} and is not named {PREFIX}<step>.")
    return int(match.group(1))


def is_complete(path: str | Path) -> bool:
    """Whether a checkpoint folder was finished (its ``training_state.json``, written last, is there)."""
    return (Path(path) / STATE_NAME).is_file()


def resolve_resume(output_dir: str | Path, value: str | None) -> Path | None:
    """The checkpoint to resume from: None for a fresh start, "latest" (the newest complete checkpoint, None when
    the run has none yet), a checkpoint name in ``output_dir``, or a path."""
    if not value:
        return None
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        complete = [path for path in checkpoints if is_complete(path)]
        for path in checkpoints:
            if not is_complete(path):
                logger.warning(
                    f"{path} has no {STATE_NAME} (it was not finished); resume_from_checkpoint=latest skips it"
                )
        return complete[-1] if complete else None
    for candidate in (Path(output_dir) / value, Path(value).expanduser()):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"resume_from_checkpoint={value!r}: no such checkpoint in {output_dir} or on disk.")


def prune_checkpoints(output_dir: str | Path, limit: int | None, keep: str | Path) -> list[Path]:
    """Delete the oldest checkpoints so that at most ``limit`` remain, ``keep`` (the one just published) always
    among them; returns the removed ones. Call it only once ``keep`` is published: a run stopped at any point
    still has ``keep``. Each is renamed to a hidden partial name first, then removed, so one cut short is never
    taken for a checkpoint (the next run removes it, :mod:`memo.io.partial`)."""
    if limit is None:
        return []
    keep = Path(keep)
    others = [path for path in list_checkpoints(output_dir) if path.name != keep.name]
    doomed = others[: max(0, len(others) - (max(1, limit) - 1))]
    for path in doomed:
        with Partial(path, directory=True) as aside:
            os.rmdir(aside.path)
            os.replace(path, aside.path)
            reached("old_moved_aside")
        # leaving the block removes the renamed folder
    return doomed


def sync_tree(path: str | Path) -> None:
    """Flush every file and folder under ``path`` (and ``path`` itself) to disk, so that a power cut after a
    rename cannot leave the renamed folder with lost data."""
    root = Path(path)
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_folder(folder)


def sync_folder(path: str | Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk, where the system allows."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_training_state(directory: str | Path, step: int, **extra) -> None:
    (Path(directory) / STATE_NAME).write_text(json.dumps({"step": int(step), **extra}, indent=2))


def save_networks(networks: Mapping[str, nn.Module], directory: str | Path, source: str | Path | None = None) -> None:
    """Write each network as ``<directory>/<name>/{config.json, diffusion_pytorch_model.safetensors}``.

    Weights are stored in float32 whatever the training dtype. The config is copied from ``<source>/<name>``
    when the source checkpoint has one (keeping the published class names and settings), else written by
    the network's ``save_config``. ``EXTRA_FOLDERS`` of the source are copied along.
    """
    directory = Path(directory)
    for name, network in networks.items():
        target = directory / name
        target.mkdir(parents=True, exist_ok=True)
        source_config = Path(source) / name / "config.json" if source is not None else None
        if source_config is not None and source_config.is_file():
            shutil.copyfile(source_config, target / "config.json")
        else:
            network.save_config(target)
        state = {
            key: tensor.detach().to("cpu", torch.float32).clone().contiguous()
            for key, tensor in network.state_dict().items()
        }
        save_file(state, target / WEIGHTS_NAME, metadata={"format": "pt"})
    if source is not None:
        for folder in EXTRA_FOLDERS:
            extra = Path(source) / folder
            if extra.is_dir() and not (directory / folder).exists():
                shutil.copytree(extra, directory / folder)


def load_networks(networks: Mapping[str, nn.Module], directory: str | Path) -> None:
    """Load the weights written by :func:`save_networks` into ``networks`` (strictly, cast to their dtype)."""
    for name, network in networks.items():
        path = Path(directory) / name / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"The checkpoint {directory} has no {name}/{WEIGHTS_NAME}.")
        network.load_state_dict(load_file(path), strict=True)
