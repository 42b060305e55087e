"""A finetuning checkpoint survives ``kill -9`` at every point of a save (issue 29, kind 1).

The run's real setup (model, optimizer, data, checkpoint hooks, accelerate) saves ``checkpoint-1``; then, for
each point of :data:`memo.training.checkpointing.SAVE_POINTS`, a forked copy of this process saves
``checkpoint-2`` with ``checkpoints_total_limit: 1`` and is killed with SIGKILL at that point (no handler runs,
as under ``kill -9``). What it leaves must hold a complete checkpoint that ``resume_from_checkpoint=latest``
picks and accelerate loads, and the next save must clean up after it. The whole program killed mid-save and
resumed: tests/test_finetune.py::test_finetune_killed_mid_save_resumes_from_the_last_checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import make_prepared_data, tiny_config

from memo.training import checkpointing
from memo.training.checkpointing import SAVE_POINTS, checkpoint_step, resolve_resume

NETWORKS = ("reference_net", "diffusion_net", "image_proj", "audio_proj")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_checkpoint):
    """A prepared training run whose output folder holds ``checkpoint-1``; the folder is ``run.base``."""
    from memo.settings.training import load_config
    from memo.training.run import make_accelerator, prepare_run
    from memo.training.saving import save_checkpoint

    root = tmp_path_factory.mktemp("kill_saves")
    data = make_prepared_data(root / "data", videos=1, frames=12)
    config = load_config(tiny_config(root, data, checkpoints_total_limit=1, checkpointing_steps=1), [], exp_name="run")
    prepared = prepare_run(config, make_accelerator(config))
    save_checkpoint(prepared, 1)
    prepared.base = Path(config.output_dir)
    yield prepared
    prepared.accelerator.end_training()


def killed_save(run, folder: Path, point: str) -> int:
    """Save ``checkpoint-2`` into ``folder`` (a copy of the run's folder) in a forked child killed at ``point``;
    returns the signal that ended the child."""
    from memo.training.saving import save_checkpoint

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            torch.set_num_threads(1)  # no OpenMP pool after fork
            run.output_dir = folder

            def kill_at(reached: str) -> None:
                if reached == point:
                    os.kill(os.getpid(), signal.SIGKILL)

            checkpointing.on_save_point = kill_at
            save_checkpoint(run, 2)
        finally:
            os._exit(3)  # the point was not reached (or the save failed)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("point", SAVE_POINTS)
def test_a_save_killed_at_any_point_keeps_a_complete_checkpoint(run, tmp_path, point):
    from memo.training.saving import save_checkpoint

    folder = tmp_path / "run"
    shutil.copytree(run.base, folder)
    assert killed_save(run, folder, point) == signal.SIGKILL

    # latest is a complete checkpoint: checkpoint-1 until checkpoint-2 is published, then checkpoint-2.
    latest = resolve_resume(folder, "latest")
    assert latest is not None
    assert checkpoint_step(latest) == (2 if SAVE_POINTS.index(point) >= SAVE_POINTS.index("published") else 1)
    for name in NETWORKS:
        assert load_file(latest / name / "diffusion_pytorch_model.safetensors")
    assert (latest / "optimizer.bin").is_file() and (latest / "scheduler.bin").is_file()
    run.accelerator.load_state(str(latest))

    # The next save removes what the killed one left (its partial folder, or the old checkpoint moved aside).
    saved_to = run.output_dir
    try:
        run.output_dir = folder
        save_checkpoint(run, 3)
    finally:
        run.output_dir = saved_to
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-3", "config.yaml", "logs"]


def test_pruning_keeps_the_new_checkpoint_whatever_its_number(tmp_path):
    """A run resumed from checkpoint-2 while checkpoint-5 of the abandoned run is still there saves checkpoint-3:
    with a limit of 1 the new one stays and the others go (the oldest first)."""
    for step in (2, 3, 5):
        (tmp_path / f"checkpoint-{step}").mkdir()
        checkpointing.write_training_state(tmp_path / f"checkpoint-{step}", step)
    removed = checkpointing.prune_checkpoints(tmp_path, 1, keep=tmp_path / "checkpoint-3")
    assert [p.name for p in removed] == ["checkpoint-2", "checkpoint-5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


def whole_run(run, tmp_path: Path, *steps: int) -> Path:
    """A copy of the run's folder whose ``checkpoint-1`` is copied as each of ``steps`` too."""
    folder = tmp_path / "run"
    shutil.copytree(run.base, folder)
    for step in steps:
        shutil.copytree(folder / "checkpoint-1", folder / f"checkpoint-{step}")
        checkpointing.write_training_state(folder / f"checkpoint-{step}", step)
    return folder


def test_latest_skips_an_unfinished_checkpoint(run, tmp_path, caplog):
    folder = whole_run(run, tmp_path)
    (folder / "checkpoint-2").mkdir()  # e.g. copied by hand, cut short
    assert resolve_resume(folder, "latest") == folder / "checkpoint-1"
    assert f"{folder / 'checkpoint-2' / 'training_state.json'} is missing" in caplog.text


def cut_short(path: Path, keep: int = 1000) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


@pytest.mark.parametrize(
    ("damaged", "problem"),
    [
        ("diffusion_net/diffusion_pytorch_model.safetensors", "is cut short (1,000 bytes"),
        ("optimizer.bin", "is cut short or damaged"),
        ("training_state.json", "is damaged"),
        ("audio_proj/config.json", "holds none of AudioProjModel's settings"),
    ],
)
def test_latest_falls_back_from_a_damaged_checkpoint_to_the_newest_whole_one(run, tmp_path, caplog, damaged, problem):
    """issue 29: resume_from_checkpoint=latest with the newest checkpoint damaged warns in one line naming it and
    what is wrong, and resumes from the newest whole one; accelerate loads that one."""
    folder = whole_run(run, tmp_path, 2, 3)
    path = folder / "checkpoint-3" / damaged
    if damaged.endswith(".json") and damaged != "training_state.json":
        path.write_text("{}")
    elif damaged == "training_state.json":
        path.write_text('{"step": ')
    else:
        cut_short(path)
    assert resolve_resume(folder, "latest") == folder / "checkpoint-2"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert f"{path} {problem}" in warnings[0] and "checkpoint-3 is skipped" in warnings[0], warnings[0]
    run.accelerator.load_state(str(folder / "checkpoint-2"))


def test_latest_with_every_checkpoint_damaged_starts_afresh_saying_so(run, tmp_path, caplog):
    folder = whole_run(run, tmp_path, 2)
    for step in (1, 2):
        cut_short(folder / f"checkpoint-{step}" / "image_proj" / "diffusion_pytorch_model.safetensors", 100)
    assert resolve_resume(folder, "latest") is None
    assert f"no whole checkpoint in {folder}; starting from step 0" in caplog.text


def test_a_checkpoint_named_that_is_not_there_or_damaged_is_one_line(run, tmp_path):
    from memo.training.checkpointing import CheckpointError

    folder = whole_run(run, tmp_path, 2)
    with pytest.raises(CheckpointError) as missing:
        resolve_resume(folder, "checkpoint-9")
    assert "resume_from_checkpoint=checkpoint-9: no such checkpoint" in str(missing.value)
    assert "checkpoint-1, checkpoint-2" in str(missing.value) and "\n" not in str(missing.value)
    # another network's weights in place of the diffusion net's: named, with the checkpoints to use instead
    shutil.copyfile(
        folder / "checkpoint-2" / "audio_proj" / "diffusion_pytorch_model.safetensors",
        folder / "checkpoint-2" / "diffusion_net" / "diffusion_pytorch_model.safetensors",
    )
    with pytest.raises(CheckpointError) as damaged:
        resolve_resume(folder, "checkpoint-2")
    line = str(damaged.value)
    assert "diffusion_net/diffusion_pytorch_model.safetensors holds other weights" in line and "\n" not in line
    assert "resume from another (checkpoint-1)" in line
