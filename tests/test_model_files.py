"""Damaged model files (issue 29, kind 2): every file is checked before any model loads, and each damaged or
missing one is one line naming the file, what is wrong and the command that fixes it, exit status 2.

The damaged packs are links to the shared tiny pack with the damaged files written in their place.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
from conftest import load_program, run_main
from test_field_inputs import EXAMPLE_AUDIO, EXAMPLE_IMAGE, FAST, assert_stopped_early, run

from memo.io.model_files import file_problem

LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 3438167536\n"


def linked_pack(pack: Path, root: Path) -> Path:
    """A copy of the pack made of links to its files (its inference.yaml rewritten for the new place)."""
    for path in pack.rglob("*"):
        if path.is_file():
            target = root / path.relative_to(pack)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.name == "inference.yaml":
                target.write_text(path.read_text().replace(str(pack), str(root)))
            else:
                os.symlink(path, target)
    return root


def damage(root: Path, relative: str, how: str) -> Path:
    """Write a damaged ``relative`` in place of its link: ``truncated`` (the first 1000 bytes), ``empty``,
    ``junk`` (random bytes of the same length), ``lfs`` (a git-lfs pointer), ``invalid_json``, or ``missing``
    (its whole folder removed)."""
    path = root / relative
    data = path.read_bytes()
    path.unlink()
    if how == "missing":
        for child in sorted(path.parent.rglob("*"), reverse=True):
            child.unlink() if not child.is_dir() else child.rmdir()
        path.parent.rmdir()
    else:
        path.write_bytes(
            {
                "truncated": data[:1000],
                "empty": b"",
                "junk": os.urandom(len(data)),
                "lfs": LFS,
                "invalid_json": data[: len(data) // 2],
            }[how]
        )
    return path


CASES = [
    ("diffusion_net/diffusion_pytorch_model.safetensors", "truncated", "is cut short (1,000 bytes", "networks --force"),
    ("vae/diffusion_pytorch_model.safetensors", "empty", "is empty (0 bytes)", "--only vae --force"),
    ("reference_net/diffusion_pytorch_model.safetensors", "junk", "is not a safetensors file", "networks --force"),
    ("wav2vec2/model.safetensors", "lfs", "is a git-lfs pointer", "--only wav2vec --force"),
    ("image_proj/config.json", "invalid_json", "is not valid JSON", "networks --force"),
    ("misc/audio_emotion_classifier/config.json", "missing", "is missing", "networks --force"),
    ("misc/face_analysis/models/glintr100.onnx", "truncated", "is cut short", "face_analysis --force"),
    ("emotion2vec/model.pt", "truncated", "is cut short or damaged", "--only emotion2vec --force"),
    ("emotion2vec/config.yaml", "empty", "is empty", "--only emotion2vec --force"),
]


@pytest.mark.parametrize(("relative", "how", "problem", "fix"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_inference_names_the_damaged_file_before_loading(pack, tmp_path, relative, how, problem, fix):
    root = linked_pack(pack, tmp_path / "pack")
    path = damage(root, relative, how)
    out = tmp_path / "out"
    # emotion=auto: emotion2vec is checked with the others, not after everything else has loaded
    args = [a for a in FAST if not a.startswith("emotion=")]
    result = run(
        root, "--input_image", str(EXAMPLE_IMAGE), "--input_audio", str(EXAMPLE_AUDIO), "--output_dir", str(out), *args
    )
    named = f"the folder {path.parent}" if how == "missing" else str(path)  # one line for a missing folder
    line = assert_stopped_early(result, named, problem, fix)
    assert "models: loaded" not in result.stderr and not out.exists(), line


def test_finetune_names_a_damaged_checkpoint_before_training(pack, tmp_path):
    root = linked_pack(pack, tmp_path / "pack")
    path = damage(root, "audio_proj/diffusion_pytorch_model.safetensors", "lfs")
    config = tmp_path / "finetune.yaml"
    config.write_text(
        f"model_name_or_path: {root}\nvae: {root / 'vae'}\nreport_to: none\noutput_dir: {tmp_path / 'runs'}\n"
        f"data:\n  data_dirs: [{tmp_path / 'nodata'}]\n"
    )
    result = run_main(load_program("finetune.py").main, ["--config", str(config), "--exp_name", "x"])
    assert result.returncode == 2, result.stderr
    assert f"{path} is a git-lfs pointer" in result.stderr and "--only networks --force" in result.stderr


def test_whole_files_pass_and_each_format_is_read(pack, tmp_path):
    for path in pack.rglob("*"):
        if path.is_file():
            assert file_problem(path) is None, path
    model = tmp_path / "model.pt"
    with zipfile.ZipFile(model, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00." * 1000)
    assert file_problem(model) is None
    model.write_bytes(model.read_bytes()[:-30])
    assert "is cut short or damaged" in file_problem(model)
    (tmp_path / "config.yaml").write_text("model:\n\tlayers: 2\n")
    assert "is not valid YAML" in file_problem(tmp_path / "config.yaml")
    (tmp_path / "config.json").write_text("[1, 2]")
    assert "not an object" in file_problem(tmp_path / "config.json")
    assert file_problem(tmp_path / "absent.safetensors") == "is missing"
