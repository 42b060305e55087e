"""The web app's record of the renders under way, so that one cut short by a restart of the server can be
offered to continue: a folder per render with its own copies of the two inputs and ``job.json`` (its settings
and output), removed when the render ends in the app, whatever the end. Only a killed server leaves one."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memo.io.partial import write_atomically

RECORD = "job.json"


@dataclass(frozen=True)
class RenderJob:
    """One render: its record's folder, its inputs (copies), its per-request settings and its output."""

    folder: Path
    image: Path
    audio: Path
    settings: dict[str, Any]
    output: Path


class RenderJobs:
    """The records under ``folder`` (a hidden folder of the web app's output folder)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.running: set[Path] = set()  # started by this process

    def start(self, image: Path, audio: Path, settings: dict[str, Any], output: Path) -> RenderJob:
        """Record a render about to start (the inputs copied, the record written last and atomically)."""
        folder = self.folder / output.stem
        folder.mkdir(parents=True, exist_ok=True)
        self.running.add(folder)
        job = RenderJob(
            folder,
            Path(shutil.copy2(image, folder / f"image{image.suffix}")),
            Path(shutil.copy2(audio, folder / f"audio{audio.suffix}")),
            dict(settings),
            output,
        )
        record = {"image": job.image.name, "audio": job.audio.name, "settings": settings, "output": str(output)}
        write_atomically(folder / RECORD, json.dumps(record, indent=2) + "\n")
        return job

    def end(self, job: RenderJob) -> None:
        """The render ended (done, refused, failed or stopped): forget it."""
        self.running.discard(job.folder)
        shutil.rmtree(job.folder, ignore_errors=True)

    def interrupted(self) -> list[RenderJob]:
        """Renders recorded by an earlier run of the server and never ended, oldest first; an unreadable
        record (a server killed while writing it) is skipped."""
        jobs = []
        for record in sorted(self.folder.glob(f"*/{RECORD}"), key=lambda path: path.stat().st_mtime):
            if record.parent in self.running:
                continue
            try:
                data = json.loads(record.read_text())
                jobs.append(
                    RenderJob(
                        record.parent,
                        record.parent / data["image"],
                        record.parent / data["audio"],
                        data["settings"],
                        Path(data["output"]),
                    )
                )
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return jobs
