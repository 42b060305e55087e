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

from memo.errors import UserError
from memo.io.hub import EMOTION_CLASSIFIER_FOLDER
from memo.io.model_files import ModelFolder, find_problems
from memo.io.model_load import find_model_problems
from memo.io.partial import Partial
from memo.pipeline import checkpoint_specs

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


class CheckpointError(UserError, FileNotFoundError):
    """``resume_from_checkpoint`` names a checkpoint that is not there, or one that is damaged."""


def checkpoint_problems(path: str | Path, setting: str, fix: str) -> list[str]:
    """What is wrong with the checkpoint folder ``path``, one line each (``setting: FILE problem: fix``), checked
    as every model file is (:mod:`memo.io.model_load`: each file's structure, the networks' weights against
    their configs, headers only): its ``training_state.json`` and accelerate's files, and the four networks
    in the published layout that resuming loads. Empty when it is whole."""
    path = Path(path)
    lines = []
    state = path / STATE_NAME
    try:
        step = json.loads(state.read_text(encoding="utf-8")).get("step")
        if type(step) is not int:
            raise ValueError("no whole step number in it")
    except (OSError, ValueError, AttributeError, UnicodeDecodeError) as error:
        reason = "is missing (the save was not finished)" if not state.exists() else f"is damaged ({error})"
        lines.append(f"{setting}: {state} {reason}: {fix}")
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    folder = ModelFolder(setting.split("=", 1)[0], setting.split("=", 1)[-1], path, files, fix=fix)
    specs = checkpoint_specs(folder, folder)
    specs.pop("vae")
    lines += find_problems([folder]) + find_model_problems(specs.values())
    return list(dict.fromkeys(lines))


def resolve_resume(output_dir: str | Path, value: str | None) -> Path | None:
    """The checkpoint to resume from: None for a fresh start, "latest" (the newest whole checkpoint, None when
    the run has none yet), a checkpoint name in ``output_dir``, or a path.

    ``latest`` skips an unfinished or damaged checkpoint with a one-line warning naming it and what is wrong,
    and says so when it starts from step 0 for want of a whole one. A name that is not there, or a damaged
    checkpoint given by name, is a :class:`CheckpointError` (one line: the checkpoints there are). Checks files'
    structure and headers only, so it runs before anything is written."""
    if not value:
        return None
    checkpoints = list_checkpoints(output_dir)
    names = ", ".join(path.name for path in checkpoints) or "none yet"
    if value == "latest":
        for path in reversed(checkpoints):
            problems = checkpoint_problems(path, "resume_from_checkpoint=latest", f"{path.name} is skipped")
            if not problems:
                return path
            logger.warning(problems[0])
        if checkpoints:
            logger.warning(f"resume_from_checkpoint=latest: no whole checkpoint in {output_dir}; starting from step 0")
        return None
    for candidate in (Path(output_dir) / value, Path(value).expanduser()):
        if candidate.is_dir():
            others = [path.name for path in checkpoints if path != candidate]
            fix = (
                f"resume from another ({', '.join(others)}) or with resume_from_checkpoint=latest"
                if others
                else ("start afresh without resume_from_checkpoint")
            )
            problems = checkpoint_problems(candidate, f"resume_from_checkpoint={value}", fix)
            if problems:
                raise CheckpointError(problems[0])
            return candidate
    raise CheckpointError(
        f"resume_from_checkpoint={value}: no such checkpoint in {output_dir} or on disk (the run's checkpoints: "
        f"{names}); give one of them, latest, or a checkpoint folder's path."
    )


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
