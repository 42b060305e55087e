"""Odd output places: a dangling symbolic link, a loop of links, a named pipe, a path through a file,
``/dev/null``, a folder that cannot be entered. Each is one ``error:`` line naming the culprit, exit status
2, before any model loads, and nothing created (memo.io.video.check_output_folder).

A dangling link is refused, not followed: creating its target would put the videos wherever the link's
author meant something else to be. Tests run as root, whom permissions do not stop; the folder without
execute permission is tried in a process without the capabilities that let root in (``setpriv``), and
skipped where that cannot be had.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_main

from memo.apps import cli
from memo.io.video import OutputLocationError, check_output_folder, check_output_path

EXAMPLE_IMAGE = REPO / "assets" / "examples" / "portrait.jpg"
EXAMPLE_AUDIO = REPO / "assets" / "examples" / "speech.wav"
NO_ROOT_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def place(kind: str, area: Path) -> tuple[Path, list[str]]:
    """An output folder of ``kind`` made in ``area``, and what the error line must name."""
    if kind == "dangling_link":
        (area / "out").symlink_to(area / "gone")
        return area / "out", [f"{area / 'out'} is a symbolic link to {area / 'gone'}, which does not exist"]
    if kind == "through_dangling_link":
        (area / "out").symlink_to(area / "gone")
        return area / "out" / "videos", [f"{area / 'out'} (on the way to", "which does not exist"]
    if kind == "link_loop":
        (area / "a").symlink_to(area / "b")
        (area / "b").symlink_to(area / "a")
        return area / "a" / "videos", [f"{area / 'a'} is a symbolic link that loops back on itself"]
    if kind == "fifo":
        os.mkfifo(area / "pipe")
        return area / "pipe", [f"{area / 'pipe'} is a named pipe (FIFO), not a folder"]
    if kind == "through_a_file":
        (area / "notes.txt").write_text("a file")
        return area / "notes.txt" / "videos", [f"(it is inside {area / 'notes.txt'})", "is a file, not a folder"]
    if kind == "dev_null":
        return Path("/dev/null"), ["/dev/null is a device, not a folder"]
    if kind == "not_enterable":
        (area / "locked").mkdir(mode=0o600)
        return area / "locked" / "videos", [f"{area / 'locked'} cannot be entered", "chmod u+x"]
    raise ValueError(kind)


KINDS = ["dangling_link", "through_dangling_link", "link_loop", "fifo", "through_a_file", "dev_null", "not_enterable"]


def without_root_override() -> list[str]:
    """The wrapper that makes permissions count for root; skips the test when there is none."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None or subprocess.run([*NO_ROOT_OVERRIDE, "true"], check=False).returncode:
        pytest.skip("running as root without setpriv able to drop CAP_DAC_OVERRIDE: permissions cannot be tried")
    return NO_ROOT_OVERRIDE


def listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind != "not_enterable"])
def test_odd_output_folders_are_named_in_one_message(tmp_path, kind):
    folder, fragments = place(kind, tmp_path)
    before = listing(tmp_path)
    for check in (check_output_folder, lambda folder: check_output_path(folder / "out.mp4", overwrite=True)):
        with pytest.raises(OutputLocationError) as caught:
            check(folder)
        assert str(caught.value).startswith(f"Cannot write to the output folder {folder}")
        for fragment in fragments:
            assert fragment in str(caught.value)
    assert listing(tmp_path) == before


def test_a_folder_that_cannot_be_entered_is_named(tmp_path):
    wrap = without_root_override()
    folder, fragments = place("not_enterable", tmp_path)
    code = "import sys; from memo.io.video import check_output_path; check_output_path(sys.argv[1], False)"
    try:
        result = subprocess.run(
            [*wrap, sys.executable, "-c", code, str(folder / "out.mp4")], capture_output=True, text=True, check=False
        )
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert "OutputLocationError" in result.stderr and "PermissionError" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert listing(tmp_path) == ["locked"]


@pytest.mark.parametrize(
    "kind", [*(kind for kind in KINDS if kind != "not_enterable"), pytest.param("not_enterable", marks=pytest.mark.e2e)]
)
def test_inference_refuses_odd_output_folders_before_loading(pack, tmp_path, kind):
    """The command line in this process for each kind; ``inference.py`` started as a program (``e2e``) for the
    folder that cannot be entered, which needs a process of its own without root's capabilities."""
    area = tmp_path / "area"
    area.mkdir()
    folder, fragments = place(kind, area)
    before = listing(tmp_path)
    args = ["--config", str(pack / "inference.yaml"), "--input_image", str(EXAMPLE_IMAGE)]
    args += ["--input_audio", str(EXAMPLE_AUDIO), "--output_dir", str(folder)]
    if kind == "not_enterable":
        wrap = without_root_override()
        command = [*wrap, sys.executable, str(REPO / "inference.py"), *args]
        try:
            result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
        finally:
            (area / "locked").chmod(0o755)
    else:
        result = run_main(cli.main, args, cwd=REPO)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: Cannot write to the output folder {folder}"), lines
    for fragment in fragments:
        assert fragment in lines[0]
    assert listing(tmp_path) == before
