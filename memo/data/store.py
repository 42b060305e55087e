"""The prepared-data directory that ``scripts/prepare_data.py`` writes and training reads.

Layout, paths in ``metadata.jsonl`` being relative to the directory::

    metadata.jsonl                      one JSON object per finished video (see :func:`metadata_entry`)
    failures.jsonl                      {"id", "video", "reason"} of each video the last run could not use
    audio_emb/<id>.safetensors          {"audio_emb": float32 (frames, 5, layers, dim)}
    face_emb/<id>.safetensors           {"face_emb": float32 (512,)}
    audio_emotion/<id>.safetensors      {"emotion": int64 (frames,)}
    vocals/<id>.safetensors             {"vocals": float32 (samples,)} at 16 kHz

A run killed at any moment leaves no half-written entry: each file is written under a temporary name
(:class:`memo.io.partial.Partial`; the next run removes those of killed runs, never those of a shard still
running), synced and renamed, and a video's metadata line is appended (synced) only after all its files are
in place. A video is finished when a metadata line names it and its files exist. A shard ``i`` of ``n`` writes
``metadata.shard-i-of-n.jsonl`` and ``failures.shard-i-of-n.jsonl``; :func:`merge` joins them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from memo.io.partial import Partial, remove_abandoned, write_atomically

KINDS = ("audio_emb", "face_emb", "audio_emotion", "vocals")
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".flv", ".mpg", ".mpeg", ".wmv", ".ts"})
METADATA = "metadata.jsonl"
FAILURES = "failures.jsonl"
SHARD_PATTERN = re.compile(r"^metadata\.shard-(\d+)-of-(\d+)\.jsonl$")
MAX_ID_LENGTH = 150


def find_videos(root: str | os.PathLike) -> list[Path]:
    """Every video file under ``root`` (recursively, by extension, hidden files left out), sorted."""
    root = Path(root)
    found = [
        path
        for path in root.rglob("*")
        if path.suffix.lower() in VIDEO_EXTENSIONS
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    return sorted(found)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def video_ids(paths: Iterable[Path], root: str | os.PathLike) -> dict[Path, str]:
    """A filesystem-safe id per video: its path under ``root`` without the extension, ``/`` written ``__``.

    Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``. Where two videos would get
    the same id (also ignoring case, for case-insensitive filesystems), or an id is too long, a short hash
    of the relative path is appended, so ids stay unique and the same from run to run.
    """
    root = Path(root)
    relative = {path: path.relative_to(root).as_posix() for path in paths}
    base = {}
    for path, rel in relative.items():
        stem = rel[: -len(path.suffix)] if path.suffix else rel
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", stem.replace("/", "__"))
        base[path] = "_" + safe[1:] if safe.startswith(".") else safe
    counts: dict[str, int] = {}
    for name in base.values():
        counts[name.casefold()] = counts.get(name.casefold(), 0) + 1
    ids = {}
    for path, name in base.items():
        if counts[name.casefold()] > 1 or len(name) > MAX_ID_LENGTH:
            name = f"{name[:MAX_ID_LENGTH]}-{_digest(relative[path])[:8]}"
        ids[path] = name
    return ids


def shard_of(video_id: str, num_shards: int) -> int:
    """The shard a video belongs to: a stable hash of its id modulo ``num_shards``."""
    return int(_digest(video_id)[:12], 16) % num_shards


def shard_tag(shard: int | None, num_shards: int | None) -> str:
    """``shard-i-of-n`` for a shard, ``all`` for a run over every video."""
    return "all" if shard is None or num_shards is None else f"shard-{shard}-of-{num_shards}"


def metadata_entry(video_id: str, video: Path, fps: float, num_frames: int, width: int, height: int) -> dict:
    """A video's line of ``metadata.jsonl``."""
    entry = {
        "id": video_id,
        "video": os.path.abspath(video),
        "fps": float(fps),
        "num_frames": int(num_frames),
        "width": int(width),
        "height": int(height),
    }
    entry.update({kind: f"{kind}/{video_id}.safetensors" for kind in KINDS})
    return entry


def read_entries(path: Path) -> Iterator[dict]:
    """The JSON objects of a JSON-lines file, skipping lines that do not parse (a line cut by a crash)."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                yield entry


def _write_lines_atomically(path: Path, entries: Iterable[dict]) -> None:
    write_atomically(path, "".join(json.dumps(entry) + "\n" for entry in entries), sync=True)


@dataclass
class PreparedStore:
    """One run's view of the output directory: which videos are finished, and writing new ones."""

    root: Path
    tag: str = "all"

    @property
    def metadata_path(self) -> Path:
        return self.root / (METADATA if self.tag == "all" else f"metadata.{self.tag}.jsonl")

    @property
    def failures_path(self) -> Path:
        return self.root / (FAILURES if self.tag == "all" else f"failures.{self.tag}.jsonl")

    def is_complete(self, entry: dict) -> bool:
        """Whether every file an entry names exists."""
        return all(isinstance(entry.get(kind), str) and (self.root / entry[kind]).is_file() for kind in KINDS)

    def open(self) -> set[str]:
        """Start a run: remove temporary files left by killed runs (:func:`memo.io.partial.remove_abandoned`),
        drop its metadata lines whose files are gone, start a new failures file, and return the ids of the
        finished videos (of any shard).

        A run over every video first merges shard metadata left by earlier sharded runs into its own.
        """
        if self.tag == "all" and shard_counts(self.root):
            merge(self.root)
        for kind in KINDS:
            (self.root / kind).mkdir(parents=True, exist_ok=True)
            remove_abandoned(self.root / kind)
        remove_abandoned(self.root)
        own = {entry["id"]: entry for entry in read_entries(self.metadata_path) if self.is_complete(entry)}
        _write_lines_atomically(self.metadata_path, own.values())
        self.failures_path.write_text("", encoding="utf-8")
        finished = set(own)
        for path in self.root.glob("metadata*.jsonl"):
            finished.update(entry["id"] for entry in read_entries(path) if self.is_complete(entry))
        return finished

    def save(self, entry: dict, files: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write a video's files, then append its metadata line; a crash leaves either all of it or no line."""
        for kind in KINDS:
            target = self.root / entry[kind]
            with Partial(target, suffix=target.suffix) as partial:
                save_file(files[kind], str(partial.path))
                partial.publish(sync=True)
        self._append(self.metadata_path, entry)

    def fail(self, video_id: str, video: Path, reason: str) -> None:
        """Record a video that could not be used, and why."""
        self._append(self.failures_path, {"id": video_id, "video": os.path.abspath(video), "reason": reason})

    @staticmethod
    def _append(path: Path, entry: dict) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())


def shard_counts(root: Path) -> dict[int, set[int]]:
    """{n: the shard indices i of ``metadata.shard-i-of-n.jsonl`` files present}."""
    found: dict[int, set[int]] = {}
    for path in root.glob("metadata.shard-*-of-*.jsonl"):
        match = SHARD_PATTERN.match(path.name)
        if match:
            found.setdefault(int(match[2]), set()).add(int(match[1]))
    return found


@contextlib.contextmanager
def _merge_lock(root: Path) -> Iterator[None]:
    """Serialise merges of shards finishing at the same time (the last one to merge sees every line)."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: merges are not serialised
        yield
        return
    with open(root / ".merge.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def merge(root: str | os.PathLike) -> tuple[int, int]:
    """Join ``metadata.jsonl`` and every shard's metadata into ``metadata.jsonl`` (one line per id, the
    shards' newer lines winning, entries whose files are gone dropped, sorted by id), and the shards'
    failures of videos not finished since into ``failures.jsonl``. Returns (videos, failures)."""
    root = Path(root)
    store = PreparedStore(root)
    with _merge_lock(root):
        shard_files = sorted(path for path in root.glob("metadata.shard-*.jsonl") if SHARD_PATTERN.match(path.name))
        entries: dict[str, dict] = {}
        for path in [root / METADATA, *shard_files]:
            for entry in read_entries(path):
                if store.is_complete(entry):
                    entries[entry["id"]] = entry
        _write_lines_atomically(root / METADATA, (entries[key] for key in sorted(entries)))
        failures: dict[str, dict] = {}
        for path in sorted(root.glob("failures.shard-*-of-*.jsonl")):
            for entry in read_entries(path):
                if entry["id"] not in entries:
                    failures[entry["id"]] = entry
        if shard_files:
            _write_lines_atomically(root / FAILURES, (failures[key] for key in sorted(failures)))
    return len(entries), len(failures)
