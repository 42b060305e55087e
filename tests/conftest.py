"""Shared paths and fixtures: the reference data in ../shared/reference and the tiny checkpoint.

Session-wide fixtures are either handed out as copies (``tiny_pipeline``) or checked unchanged at the end of
the session (``pack``), so no test sees another's changes and the suite passes in any order
(``-p randomly``, on by default with pytest-randomly installed).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import subprocess
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
TINY_CHECKPOINT = Path(os.environ.get("MEMO_REFERENCE_CHECKPOINT", REFERENCE / "checkpoint"))
REFERENCE_CASES = Path(os.environ.get("MEMO_REFERENCE_CASES", REFERENCE / "cases"))
PUBLISHED = REFERENCE / "published"


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    if not (TINY_CHECKPOINT / "diffusion_net").is_dir():
        pytest.skip(f"reference checkpoint not found at {TINY_CHECKPOINT}")
    return TINY_CHECKPOINT


@pytest.fixture(scope="session")
def loaded_tiny_pipeline(tiny_checkpoint):
    """The reference checkpoint's pipeline, loaded once; tests get copies of it (``tiny_pipeline``)."""
    from memo.pipeline import MemoPipeline

    pipe = MemoPipeline.from_checkpoint(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_pipeline(loaded_tiny_pipeline):
    """A private copy of the tiny pipeline: a test may cast, move or reschedule it without touching others."""
    return copy.deepcopy(loaded_tiny_pipeline)


def tree_state(root: Path) -> list[tuple[str, int, int]]:
    """Every file under ``root`` with its size and modification time: equal lists mean nothing was changed."""
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.fixture(scope="session")
def pack(tmp_path_factory) -> Path:
    """The tiny random model pack (what scripts/make_tiny_checkpoint.py writes), with its inference.yaml.

    Shared by the whole session and read-only: the session fails at its end if any test changed a file in it
    (copy it into ``tmp_path`` to change it).
    """
    import torch

    from memo.tiny.pack import write_tiny_pack

    root = tmp_path_factory.mktemp("tiny_pack")
    with torch.random.fork_rng(devices=[]):  # the pack's seed must not move the tests' random numbers
        write_tiny_pack(root)
    before = tree_state(root)
    yield root
    assert tree_state(root) == before, f"a test changed the shared tiny pack in {root}; copy it to change it"


LOGGERS = ("memo", "diffusers", "transformers", "huggingface_hub", "audio_separator", "insightface")


def run_main(main: Callable[[list[str]], int], argv: Sequence[str], cwd: Path | None = None):
    """Call a program's ``main(argv)`` in this process as its command line would: stdout and stderr captured,
    exit status returned (``SystemExit`` from argparse included), the logging and warning settings it makes
    undone afterwards. Returns a ``subprocess.CompletedProcess`` so tests read it like a real run's."""
    stdout, stderr = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_root_level = root.handlers[:], root.level
    saved_levels = {name: logging.getLogger(name).level for name in LOGGERS}
    here = Path.cwd()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            if cwd is not None:
                os.chdir(cwd)
            try:
                code = main(list(argv))
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        os.chdir(here)
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_root_level)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
    return subprocess.CompletedProcess(list(argv), code, stdout.getvalue(), stderr.getvalue())


def load_program(relative: str):
    """A program of the repository (``finetune.py``, ``scripts/prepare_data.py``...) as a module, for its
    ``main``: the scripts folder is not a package, and the repository root need not be on ``sys.path``."""
    import importlib.util

    name = "program_" + relative.removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def link_example_files(folder: Path, **names: str) -> None:
    """Files named as a manifest's rows name them, linked to the example portrait (``.jpg``/``.png``) or speech
    (``.wav``), since manifests' paths are checked when they load; e.g. ``link_example_files(tmp, a="a.jpg")``."""
    examples = REPO / "assets" / "examples"
    for name in names.values():
        source = "speech.wav" if name.endswith(".wav") else "portrait.jpg"
        (folder / name).symlink_to(examples / source)


def decoded_video(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A video's frames (n, H, W, 3) and its sound's samples (channels, n), decoded with PyAV."""
    import av

    with av.open(str(path)) as container:
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    with av.open(str(path)) as container:
        sound = np.concatenate([frame.to_ndarray() for frame in container.decode(audio=0)], axis=1)
    return frames, sound
