"""The import contract of pyproject.toml (``lint-imports``, run in CI) holds on the package and fails on a
deliberately upward import: a copy of the package where the hub downloader imports the command line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytest.importorskip("importlinter")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the project's own contract, on the ``memo`` package found under ``root``."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    command = [sys.executable, "-c", code, "--config", str(REPO / "pyproject.toml"), "--no-cache"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}
    return subprocess.run(command, capture_output=True, text=True, cwd=root, env=env, timeout=300, check=False)


def test_contract_passes_on_the_package_and_fails_on_an_upward_import(tmp_path):
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    for root in (clean, broken):
        shutil.copytree(REPO / "memo", root / "memo", ignore=shutil.ignore_patterns("__pycache__"))
    hub = broken / "memo" / "io" / "hub.py"
    hub.write_text(hub.read_text() + "\nimport memo.apps.cli  # upward: io may not import apps\n")

    kept = lint_imports(clean)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "1 kept, 0 broken" in kept.stdout

    failed = lint_imports(broken)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "BROKEN" in failed.stdout and "memo.io.hub -> memo.apps.cli" in failed.stdout, failed.stdout
