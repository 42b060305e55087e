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


def test_latest_skips_an_unfinished_checkpoint(tmp_path, caplog):
    (tmp_path / "checkpoint-1").mkdir()
    checkpointing.write_training_state(tmp_path / "checkpoint-1", 1)
    (tmp_path / "checkpoint-2").mkdir()  # e.g. copied by hand, cut short
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-1"
    assert "checkpoint-2 has no training_state.json" in caplog.text
