"""Every check runs once, at the program's boundary, and later code trusts what it found (issue 26).

One real run of each program, in this process, with counting wrappers around the checks: ``inference.py``
checks its output path once, decodes the image once and opens the audio file once (the generator and the mp4
writer take what the command line found); ``finetune.py`` locates the models and reads the prepared data's
metadata once (its checks before the run hand them to the run).
"""

from __future__ import annotations

import collections
import functools
from pathlib import Path

import pytest
import soundfile
from conftest import REPO, load_program, run_main
from test_field_inputs import speech_clip
from test_finetune import make_prepared_data, needs_decord, tiny_config

from memo.apps import cli
from memo.io import audio, image, video, video_writer
from memo.io.video import probe_video

EXAMPLE_IMAGE = REPO / "assets" / "examples" / "portrait.jpg"


def count_calls(monkeypatch, counts: collections.Counter, name: str, *places: tuple[object, str]) -> None:
    """Wrap the function at each ``(module, attribute)`` (one function imported into several modules) so that
    every call adds one to ``counts[name]``."""
    original = getattr(*places[0])

    @functools.wraps(original)
    def counted(*args, **kwargs):
        counts[name] += 1
        return original(*args, **kwargs)

    for module, attribute in places:
        monkeypatch.setattr(module, attribute, counted)


def test_inference_checks_the_output_and_reads_each_input_once(pack, tmp_path, monkeypatch):
    import memo.generator

    counts = collections.Counter()
    count_calls(monkeypatch, counts, "output path checked", (video, "check_output_path"))
    count_calls(monkeypatch, counts, "image loaded", (image, "load_image"), (memo.generator, "load_image"))
    count_calls(monkeypatch, counts, "image decoded", (image, "_decode"))
    count_calls(monkeypatch, counts, "audio file opened", (audio, "_open_audio"))
    image._load_cached.cache_clear()  # a decode another test left behind would hide one here
    samples, rate = speech_clip(0.5)
    speech = tmp_path / "speech.wav"
    soundfile.write(speech, samples, rate)
    out = tmp_path / "out"
    result = run_main(
        cli.main,
        [
            "--config", str(pack / "inference.yaml"),
            "--input_image", str(EXAMPLE_IMAGE),
            "--input_audio", str(speech),
            "--output_dir", str(out),
            "inference_steps=1", "cfg_scale=1", "vocal_separation=false", "emotion=neutral",
            "num_generated_frames_per_clip=4", "num_past_frames=2",
        ],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (written,) = out.glob("*.mp4")
    assert probe_video(written).num_frames > 0
    assert counts == {"output path checked": 1, "image loaded": 1, "image decoded": 1, "audio file opened": 1}


@needs_decord
def test_finetune_locates_the_models_and_reads_the_metadata_once(tmp_path, monkeypatch):
    import memo.data.dataset
    import memo.training.networks
    import memo.training.run

    data = make_prepared_data(tmp_path / "data", videos=1, frames=12)
    config = tiny_config(tmp_path, data, max_train_steps=1, checkpointing_steps=1)
    counts = collections.Counter()
    count_calls(
        monkeypatch,
        counts,
        "models located",
        (memo.training.networks, "locate_training_models"),
        (memo.training.run, "locate_training_models"),
    )
    count_calls(
        monkeypatch, counts, "metadata read", (memo.data.dataset, "load_metadata"), (memo.training.run, "load_metadata")
    )
    finetune = load_program("finetune.py")
    result = run_main(finetune.main, ["--config", str(config), "--exp_name", "once"])
    assert result.returncode == 0, result.stderr
    assert (Path(tmp_path) / "outputs" / "once" / "checkpoint-1" / "diffusion_net").is_dir()
    assert counts == {"models located": 1, "metadata read": 1}


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_checked_output_is_written_without_a_second_check(tmp_path, monkeypatch, overwrite):
    """The mp4 writer trusts a :class:`CheckedOutput`, with the overwrite it was checked for."""
    import torch

    target = tmp_path / "clip.mp4"
    if overwrite:
        target.write_bytes(b"old")
    checked = video.CheckedOutput.check(target, overwrite)
    counts = collections.Counter()
    count_calls(monkeypatch, counts, "checked", (video, "check_output_path"))
    with video_writer.VideoWriter(checked, 25.0, 16, 16) as writer:
        writer.write(torch.rand(3, 2, 16, 16))
    assert counts["checked"] == 0 and probe_video(target).num_frames == 2
