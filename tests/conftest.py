"""Shared paths and fixtures: the reference data in ../shared/reference and the tiny checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
def tiny_pipeline(tiny_checkpoint):
    from memo.pipeline import MemoPipeline

    pipe = MemoPipeline.from_checkpoint(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def pack(tmp_path_factory) -> Path:
    """The tiny random model pack written by scripts/make_tiny_checkpoint.py, with its inference.yaml."""
    root = tmp_path_factory.mktemp("tiny_pack")
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_checkpoint.py"), str(root)], check=True)
    return root
