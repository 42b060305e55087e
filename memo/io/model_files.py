"""Checking model files before they load: one line per damaged or missing file, with the command that fixes it.

A model file can be damaged in ways its loader reports as a traceback, or late (after the other models have
loaded): a download cut short, an empty file, a git-lfs pointer left by a clone without ``git lfs``, junk under
the right name, a ``config.json`` edited by hand, a folder copied without one of its subfolders.
:func:`check_model_files` reads each file's structure cheaply (headers and indexes, never the weights) and
raises one :class:`DamagedModelError` naming every file that is missing or damaged, what is wrong with it and
what to do: the download command for the published files (``--force`` fetches a damaged cached file anew), or
where a local folder is the problem, a good copy. Formats: ``.json``, ``.yaml``, ``.safetensors`` (header and
length), ``.onnx`` (protobuf fields and length), PyTorch files (zip index, or a legacy pickle's first byte).
"""

from __future__ import annotations

import fnmatch
import json
import os
import struct
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from memo.errors import UserError
from memo.io.hub import DOWNLOAD_COMMAND, REGISTRY

LFS_POINTER = b"version https://git-lfs"
"""How a git-lfs pointer file begins (a small text file standing in for the real one)."""
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
"""safetensors' own limit on its JSON header."""
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".model", ".pkl")


class DamagedModelError(UserError, OSError):
    """A model file is missing or damaged; the message names each file, what is wrong and the fix."""


def _size_text(size: int) -> str:
    return f"{size:,} bytes"


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets; ``__metadata__``).
    Raises ``ValueError`` when the file holds no such header."""
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise ValueError("the file is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_SAFETENSORS_HEADER:
            raise ValueError("its first bytes are no safetensors header")
        header = json.loads(file.read(length))
    if not isinstance(header, dict):
        raise ValueError("its header is not the safetensors index")
    return header


def _safetensors_problem(path: Path, size: int) -> str | None:
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            return f"is cut short ({_size_text(size)}, less than a safetensors header)"
        (length,) = struct.unpack("<Q", head)
        if length > MAX_SAFETENSORS_HEADER:
            return "is not a safetensors file (its first bytes are no safetensors header)"
        header = file.read(length)
    if len(header) < length:
        if header[:1] == b"{":
            return f"is cut short ({_size_text(size)}, its header alone needs {_size_text(8 + length)})"
        return "is not a safetensors file (its first bytes are no safetensors header)"
    try:
        entries = json.loads(header)
        end = max((int(entry["data_offsets"][1]) for key, entry in entries.items() if key != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "is not a safetensors file (its header is not the safetensors index)"
    expected = 8 + length + end
    if size < expected:
        return f"is cut short ({_size_text(size)} of {_size_text(expected)})"
    if size > expected:
        return f"is longer than its header says ({_size_text(size)}, the header gives {_size_text(expected)})"
    return None


def _varint(file) -> int:
    value = shift = 0
    while True:
        byte = file.read(1)
        if not byte:
            raise EOFError
        if shift > 63:
            raise ValueError("varint")
        value |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            return value


def _onnx_problem(path: Path, size: int) -> str | None:
    """Walk the protobuf's top-level fields (an ONNX ModelProto): each must fit in the file and the last end at
    its end. Only the field headers are read; the (large) graph is skipped by its length."""
    with open(path, "rb") as file:
        try:
            while file.tell() < size:
                key = _varint(file)
                wire, field = key & 7, key >> 3
                if field == 0 or wire not in (0, 1, 2, 5):
                    raise ValueError("field")
                if wire == 0:
                    _varint(file)
                    continue
                skip = {1: 8, 5: 4}.get(wire) or _varint(file)
                end = file.tell() + skip
                if end > size:
                    return f"is cut short ({_size_text(size)}; its last part needs {_size_text(end)})"
                file.seek(end)
        except EOFError:
            return f"is cut short ({_size_text(size)})"
        except ValueError:
            return "is not an ONNX model (its bytes are no protobuf)"
    return None


def _torch_problem(path: Path, size: int) -> str | None:
    with open(path, "rb") as file:
        head = file.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                last = max((info.header_offset + info.compress_size for info in archive.infolist()), default=0)
        except (zipfile.BadZipFile, OSError, ValueError):
            return f"is cut short or damaged ({_size_text(size)}; its zip index cannot be read)"
        if last > size:
            return f"is cut short ({_size_text(size)})"
        return None
    if head[:1] == b"\x80":  # a legacy torch.save pickle
        return None
    return "is not a PyTorch file (neither a zip archive nor a pickle)"


def file_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with the model file ``path`` ("is empty", "is cut short (...)", ...), None when it looks whole
    or its format is not one checked here. Reads headers and indexes only."""
    path = Path(path)
    if not path.exists():
        return "is missing"
    if path.is_dir():
        return "is a folder, not a file"
    try:
        size = path.stat().st_size
        if size == 0:
            return "is empty (0 bytes)"
        with open(path, "rb") as file:
            head = file.read(len(LFS_POINTER))
        if head == LFS_POINTER:
            return "is a git-lfs pointer, not the model (the folder was cloned without `git lfs`: run `git lfs pull`)"
        suffix = path.suffix.lower()
        if suffix == ".json":
            try:
                value = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as error:
                return f"is not valid JSON ({error})"
            return None if isinstance(value, dict) else "is JSON but not an object of settings"
        if suffix in (".yaml", ".yml"):
            try:
                value = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as error:
                reason = " ".join(str(error).replace('in "<unicode string>", ', "").split())
                return f"is not valid YAML ({reason})"
            return None if isinstance(value, dict) else "is YAML but not a mapping of settings"
        if suffix == ".safetensors":
            return _safetensors_problem(path, size)
        if suffix == ".onnx":
            return _onnx_problem(path, size)
        if suffix in TORCH_SUFFIXES:
            return _torch_problem(path, size)
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    return None


@dataclass(frozen=True)
class ModelFolder:
    """One model's folder to check: the setting that chose it, the name given (a hub id or a path), the local
    folder, and the files it must hold (paths relative to it, glob patterns allowed)."""

    setting: str
    name: str
    folder: Path
    files: Sequence[str]
    component: str | None = None
    """The registry row the files come from (for ``download_models.py --only``); None: found by file name."""
    fix: str | None = None
    """What to do about a damaged file of this folder, where it is no downloaded model (a run's checkpoint)."""


def _component(model: ModelFolder, relative: str) -> str | None:
    """The registry row ``relative`` of ``model`` comes from: its own, else the row of its setting whose files
    hold ``relative``."""
    if model.component is not None:
        return model.component
    setting = "model_name_or_path" if model.setting == "misc_model_dir" else model.setting
    for row in REGISTRY.values():
        if row.setting == setting and any(fnmatch.fnmatch(relative, pattern) for pattern in row.files):
            return row.component
    return None


def fix_for(model: ModelFolder, relative: str) -> str:
    """What to do about a damaged or missing file ``relative`` of ``model``: download it again (the command), or
    for a local folder, a good copy (rebuild the tiny pack for its files)."""
    if model.fix is not None:
        return model.fix
    folder = model.folder
    parts = folder.resolve().parts
    tiny = next((Path(*parts[: i + 1]) for i, part in enumerate(parts) if part.startswith("tiny-pack-")), None)
    if tiny is not None:
        return f"delete {tiny} and run `inference.py --tiny` again to rebuild the tiny pack"
    component = _component(model, relative)
    command = f"`{DOWNLOAD_COMMAND} --only {component} --force`" if component else None
    from_hub = "models--" in str(folder) or model.name.count("/") == 1 and not Path(model.name).expanduser().exists()
    if from_hub and command:
        return f"download it again: {command}"
    if command:
        repo = REGISTRY[component].repo_id
        return f"replace {folder} with a good copy of {repo} ({command} fetches one; then {model.setting}={repo})"
    return f"replace {folder} with a good copy"


def find_problems(models: Iterable[ModelFolder]) -> list[str]:
    """One line per missing or damaged file of ``models``: ``setting=name: FILE is/lacks ...: FIX``."""
    lines = []
    for model in models:
        for pattern in model.files:
            if any(char in pattern for char in "*?["):
                paths = sorted(model.folder.glob(pattern))
                if not paths:
                    lines.append(
                        f"{model.setting}={model.name}: {model.folder} has no {pattern}: {fix_for(model, pattern)}"
                    )
            else:
                paths = [model.folder / pattern]
            for path in paths:
                missing_folder = next(
                    (
                        p
                        for p in reversed(path.relative_to(model.folder).parents[:-1])
                        if not (model.folder / p).is_dir()
                    ),
                    None,
                )
                if missing_folder is not None:
                    folder = model.folder / missing_folder
                    lines.append(
                        f"{model.setting}={model.name}: the folder {folder} is missing: "
                        f"{fix_for(model, path.relative_to(model.folder).as_posix())}"
                    )
                    continue
                problem = file_problem(path)
                if problem is not None:
                    relative = path.relative_to(model.folder).as_posix()
                    lines.append(f"{model.setting}={model.name}: {path} {problem}: {fix_for(model, relative)}")
    return lines


def check_model_files(models: Iterable[ModelFolder]) -> None:
    """Raise one :class:`DamagedModelError` listing every missing or damaged file of ``models`` (one line each:
    the file, what is wrong, the fix); return quietly when all look whole. Cheap: headers only."""
    lines = list(dict.fromkeys(find_problems(models)))
    if lines:
        raise DamagedModelError("\n".join(lines))
