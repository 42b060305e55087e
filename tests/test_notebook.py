"""notebooks/quickstart.ipynb run top to bottom in a real Jupyter kernel on the tiny model pack: it renders the
example into an mp4 (decoded and counted here), shows it inline, and draws its plots (the ``e2e`` tier; the
notebook's form and its install cell are checked in the default tier)."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import nbformat
import pytest
from conftest import REPO
from nbclient import NotebookClient

from memo.io.video import probe_video

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_install_cell_opened_outside_the_checkout_says_so(tmp_path):
    install = "".join(nbformat.read(NOTEBOOK, as_version=4).cells[2].source)
    assert "import subprocess" in install  # the install cell
    run = subprocess.run([sys.executable, "-c", install], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert f"{tmp_path} is not inside a checkout of the memo repository" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.e2e
def test_quickstart_runs_top_to_bottom_and_makes_the_video(tmp_path, monkeypatch):
    # The kernel imports this checkout's memo package and writes everything under tmp_path.
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("MEMO_QUICKSTART_DIR", str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()

    info = probe_video(tmp_path / "portrait_speech.mp4")
    assert info.num_frames == math.ceil(1.0 * 30) and info.has_audio
    assert probe_video(tmp_path / "portrait_speech_sad.mp4").num_frames == info.num_frames
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    shown = [output.get("data", {}) for output in outputs if output.output_type == "display_data"]
    assert any("<video" in data.get("text/html", "") for data in shown)
    assert sum("image/png" in data for data in shown) == 3  # emotion plot, face crop, first frame of each clip
    printed = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert re.search(r"^0\.00-[0-9.]+ s: [a-z]+$", printed, re.MULTILINE) and "-1.00 s: " in printed  # the labels
    assert re.findall(r"clip (\d): \(3, (\d+), 64, 64\)", printed) == [("0", "16"), ("1", "14")]  # 30 frames
