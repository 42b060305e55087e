"""The streaming mp4 writer: real files encoded and decoded back with PyAV."""

from __future__ import annotations

import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from memo.io.video import OutputExistsError, VideoWriter, check_output_path, probe_video

FPS, SIZE = 30, 64


def colour(index: int) -> tuple[int, int, int]:
    """A distinct colour per frame, different in every channel so order and channel layout both show."""
    value = 10 + 5 * index
    return value, 255 - value, 128


def clip(start: int, count: int) -> torch.Tensor:
    """Frames ``start .. start + count`` as the pipeline hands them out: float (3, n, H, W) in [0, 1]."""
    colours = torch.tensor([colour(i) for i in range(start, start + count)], dtype=torch.float32) / 255
    return colours.T[:, :, None, None].expand(3, count, SIZE, SIZE).contiguous()


def write_tone(path: Path, seconds: float, rate: int = 16000) -> Path:
    samples = round(seconds * rate)
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / rate)
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes((tone * 32767).astype(np.int16).tobytes())
    return path


def write_video(path: Path, frames: int = 8, **kwargs) -> None:
    with VideoWriter(path, FPS, SIZE, SIZE, **kwargs) as writer:
        writer.write(clip(0, frames))


def test_clips_are_streamed_with_audio_and_metadata(tmp_path):
    audio = write_tone(tmp_path / "voice.wav", 42 / FPS)
    output = tmp_path / "out" / "video.mp4"
    with VideoWriter(output, FPS, SIZE, SIZE, audio_path=audio) as writer:
        writer.write(clip(0, 16))
        writer.write(clip(16, 16))
        last = clip(32, 10).mul(255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        writer.write(last)  # uint8 (n, H, W, 3) is accepted too
    assert sorted(p.name for p in output.parent.iterdir()) == ["video.mp4"]

    info = probe_video(output)
    assert (info.num_frames, info.fps, info.width, info.height) == (42, FPS, SIZE, SIZE)
    assert (info.video_codec, info.audio_codec, info.has_audio) == ("h264", "aac", True)
    assert info.audio_duration == pytest.approx(42 / FPS, abs=1 / FPS)
    assert "MEMO" in info.metadata["comment"]

    with av.open(str(output)) as container:
        frames = list(container.decode(video=0))
    assert {frame.format.name for frame in frames} == {"yuv420p"}
    means = [frame.to_ndarray(format="rgb24").reshape(-1, 3).mean(0) for frame in frames]
    assert len(means) == 42
    np.testing.assert_allclose(np.array(means), np.array([colour(i) for i in range(42)]), atol=6)


def test_video_without_audio(tmp_path):
    output = tmp_path / "silent.mp4"
    write_video(output, frames=5)
    info = probe_video(output)
    assert (info.num_frames, info.has_audio, info.audio_duration) == (5, False, None)


def test_longer_audio_is_cut_to_the_video(tmp_path):
    output = tmp_path / "video.mp4"
    write_video(output, frames=10, audio_path=write_tone(tmp_path / "voice.wav", 2.0, rate=44100))
    info = probe_video(output)
    assert info.num_frames == 10
    assert info.audio_duration == pytest.approx(10 / FPS, abs=1 / FPS)


def test_exception_inside_with_leaves_nothing(tmp_path):
    output = tmp_path / "video.mp4"
    with pytest.raises(RuntimeError, match="diffusion failed"), VideoWriter(output, FPS, SIZE, SIZE) as writer:
        writer.write(clip(0, 4))
        raise RuntimeError("diffusion failed")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_untouched_when_writing_fails(tmp_path):
    output = tmp_path / "video.mp4"
    output.write_bytes(b"earlier result")
    writer = VideoWriter(output, FPS, SIZE, SIZE, overwrite=True)
    with pytest.raises(ValueError, match=r"\(3, n, H, W\)"), writer:
        writer.write(clip(0, 4))
        writer.write(torch.zeros(3, 2, SIZE, SIZE + 2))
    assert output.read_bytes() == b"earlier result"
    assert list(tmp_path.iterdir()) == [output]


def test_overwrite_replaces_the_file_only_at_the_end(tmp_path):
    output = tmp_path / "video.mp4"
    output.write_bytes(b"earlier result")
    with VideoWriter(output, FPS, SIZE, SIZE, overwrite=True) as writer:
        writer.write(clip(0, 6))
        assert output.read_bytes() == b"earlier result"
    assert probe_video(output).num_frames == 6
    assert list(tmp_path.iterdir()) == [output]


def test_check_output_path(tmp_path):
    existing = tmp_path / "video.mp4"
    existing.write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="--overwrite") as error:
        check_output_path(existing, overwrite=False)
    assert "video.mp4" in str(error.value)
    with pytest.raises(OutputExistsError):
        VideoWriter(existing, FPS, SIZE, SIZE)
    assert check_output_path(existing, overwrite=True) == existing
    nested = tmp_path / "a" / "b" / "video.mp4"
    assert check_output_path(nested, overwrite=False) == nested and nested.parent.is_dir()
    with pytest.raises(OutputExistsError, match="directory"):
        check_output_path(tmp_path, overwrite=True)


def test_odd_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="even"):
        VideoWriter(tmp_path / "video.mp4", FPS, 63, 64)
    assert list(tmp_path.iterdir()) == []


def test_undecodable_audio_fails_early_and_leaves_nothing(tmp_path):
    audio = tmp_path / "voice.wav"
    audio.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="Cannot decode audio file .*voice.wav"):
        write_video(tmp_path / "video.mp4", audio_path=audio)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        write_video(tmp_path / "video.mp4", audio_path=tmp_path / "missing.wav")
    assert list(tmp_path.iterdir()) == [audio]


def test_closing_without_frames_fails_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="No frames"), VideoWriter(tmp_path / "video.mp4", FPS, SIZE, SIZE):
        pass
    assert list(tmp_path.iterdir()) == []
