"""Batch manifests a breaker wrote (round 4): each is refused at the manifest check, in one line naming the
line, before anything is rendered; a row whose output leaves the output folder is refused by the whole batch
program too, and nothing is written anywhere."""

from __future__ import annotations

import shutil

import pytest
from conftest import REPO, run_main
from test_field_inputs import EXAMPLE_AUDIO, EXAMPLE_IMAGE

from memo.apps import batch

ROW = "portrait.jpg,speech.wav"


def manifest_with(tmp_path, name: str, data: bytes):
    shutil.copy(EXAMPLE_IMAGE, tmp_path / "portrait.jpg")
    shutil.copy(EXAMPLE_AUDIO, tmp_path / "speech.wav")
    manifest = tmp_path / name
    manifest.write_bytes(data)
    return manifest


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("abs.csv", f"image,audio,output\n{ROW},/etc/evil.mp4\n".encode(), "must be a name under the output folder"),
        ("up.csv", f"image,audio,output\n{ROW},../../escape.mp4\n".encode(), "must be a name under the output folder"),
        ("big.csv", f"image,audio,emotion\n{ROW},{'x' * 200_000}\n".encode(), "field larger than field limit"),
        ("deep.jsonl", b"[" * 100_000 + b"\n", "nested too deeply"),
        ("u16.csv", f"image,audio\n{ROW}\n".encode("utf-16-le"), "UTF-8"),
        ("quote.csv", b'image,audio\n"portrait.jpg,speech.wav\n', "quote is not closed"),
        ("dup.csv", f"image,image,audio\n{ROW},speech.wav\n".encode(), "image"),
        ("num.jsonl", b'{"image": 5, "audio": "speech.wav"}\n', "image must be a path (text), got 5"),
    ],
)
def test_bad_manifests_are_refused_in_one_line(tmp_path, name, data, fragment):
    manifest = manifest_with(tmp_path, name, data)
    with pytest.raises(batch.ManifestError) as refused:
        batch.load_jobs(manifest, tmp_path / "out", None, [])
    assert fragment in str(refused.value)
    assert "Traceback" not in str(refused.value) and "\x00" not in str(refused.value)


def test_a_row_writing_outside_the_output_folder_stops_the_batch_and_writes_nothing(pack, tmp_path):
    manifest = manifest_with(tmp_path, "jobs.csv", f"image,audio,output\n{ROW},../escape.mp4\n".encode())
    out = tmp_path / "sub" / "out"
    result = run_main(
        batch.main,
        ["--manifest", str(manifest), "--output_dir", str(out), "--config", str(pack / "inference.yaml")],
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr
    assert "must be a name under the output folder" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "sub").exists() and not (tmp_path / "escape.mp4").exists()
