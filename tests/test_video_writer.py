"""The streaming mp4 writer: real files encoded and decoded back with PyAV."""

from __future__ import annotations

import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from memo.io.audio import DecodedAudio, decode_audio
from memo.io.video import OutputExistsError, check_output_path, probe_video
from memo.io.video_writer import VideoWriter

FPS, SIZE = 30, 64


def colour(index: int) -> tuple[int, int, int]:
    """A distinct colour per frame, different in every channel so order and channel layout both show."""
    value = 10 + 5 * index
    return value, 255 - value, 128


def clip(start: int, count: int) -> torch.Tensor:
    """Frames ``start .. start + count`` as the pipeline hands them out: float (3, n, H, W) in [0, 1]."""
    colours = torch.tensor([colour(i) for i in range(start, start + count)], dtype=torch.float32) / 255
    return colours.T[:, :, None, None].expand(3, count, SIZE, SIZE).contiguous()


def write_tone(path: Path, seconds: float, rate: int = 16000) -> DecodedAudio:
    """A 440 Hz tone written as a 16-bit WAV file and decoded back, as inference decodes the user's audio."""
    samples = round(seconds * rate)
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / rate)
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes((tone * 32767).astype(np.int16).tobytes())
    return decode_audio(path)


def write_video(path: Path, frames: int = 8, **kwargs) -> None:
    with VideoWriter(path, FPS, SIZE, SIZE, **kwargs) as writer:
        writer.write(clip(0, frames))


def test_clips_are_streamed_with_audio_and_metadata(tmp_path):
    audio = write_tone(tmp_path / "voice.wav", 42 / FPS)
    output = tmp_path / "out" / "video.mp4"
    with VideoWriter(output, FPS, SIZE, SIZE, audio=audio) as writer:
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
    write_video(output, frames=10, audio=write_tone(tmp_path / "voice.wav", 2.0, rate=44100))
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
    assert check_output_path(nested, overwrite=False) == nested
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]  # checked by trying, nothing left
    with pytest.raises(OutputExistsError, match="directory"):
        check_output_path(tmp_path, overwrite=True)


def test_folders_are_made_with_the_video_and_removed_if_it_fails(tmp_path):
    nested = tmp_path / "a" / "b" / "video.mp4"
    write_video(nested, frames=3)
    assert probe_video(nested).num_frames == 3
    failed = tmp_path / "c" / "d" / "video.mp4"
    with pytest.raises(RuntimeError, match="diffusion failed"), VideoWriter(failed, FPS, SIZE, SIZE) as writer:
        writer.write(clip(0, 2))
        raise RuntimeError("diffusion failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize("rate, channels", [(44100, 2), (22050, 1), (11000, 2), (48000, 6)])
def test_sound_track_is_the_decoded_samples(tmp_path, rate, channels):
    """The AAC track holds the decoded input's samples, at its rate when AAC has it (else 48 kHz), as long as
    the input; more than two channels are mixed down to stereo."""
    seconds = 1.3
    t = np.arange(round(seconds * rate)) / rate
    tones = np.stack([0.4 * np.sin(2 * np.pi * (300 + 100 * c) * t) for c in range(channels)], 1)
    import soundfile

    soundfile.write(tmp_path / "voice.wav", tones.astype(np.float32), rate, subtype="PCM_24")
    audio = decode_audio(tmp_path / "voice.wav")
    assert (audio.rate, audio.channels) == (rate, channels) and abs(audio.seconds - seconds) < 1e-9
    output = tmp_path / "video.mp4"
    write_video(output, frames=round(seconds * FPS), audio=audio)
    with av.open(str(output)) as container:
        stream = container.streams.audio[0]
        assert stream.rate == (rate if rate != 11000 else 48000)
        assert stream.channels == min(channels, 2)
        decoded = np.concatenate([frame.to_ndarray() for frame in container.decode(stream)], axis=1)
    # The decoder drops AAC's priming samples (the mp4's edit list); one frame of padding may remain at the end.
    assert 0 <= decoded.shape[1] - stream.rate * seconds < 1024
    if stream.rate == rate and channels <= 2:  # (six channels are downmixed: no channel is kept as it is)
        n = audio.samples.shape[1]
        for channel in range(channels):
            correlation = np.corrcoef(decoded[channel, :n], audio.samples[channel])[0, 1]
            assert correlation > 0.98, (channel, correlation)


def test_odd_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="even"):
        VideoWriter(tmp_path / "video.mp4", FPS, 63, 64)
    assert list(tmp_path.iterdir()) == []


def test_closing_without_frames_fails_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="No frames"), VideoWriter(tmp_path / "video.mp4", FPS, SIZE, SIZE):
        pass
    assert list(tmp_path.iterdir()) == []


def test_the_same_frames_give_the_same_video_every_time(tmp_path):
    # Textured, moving frames: with x264's CPU-specific algorithms, 5 encodes of such a clip gave 5 different
    # decoded videos; a rerun (or a video split over two processes) must give the same pixels.
    texture = torch.rand(3, 1, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    texture = texture.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    frames = torch.cat([torch.roll(texture, 3 * i, dims=3) for i in range(30)], dim=1)
    decoded = []
    for attempt in range(5):
        path = tmp_path / f"video{attempt}.mp4"
        with VideoWriter(path, FPS, SIZE, SIZE) as writer:
            writer.write(frames[:, :16])
            writer.write(frames[:, 16:])
        with av.open(str(path)) as container:
            decoded.append(np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]))
    assert all(np.array_equal(decoded[0], other) for other in decoded[1:])


@pytest.mark.parametrize("frames", [1, 3])
def test_a_short_video_of_flat_frames_is_written(tmp_path, frames):
    """A few flat frames make a segment of a few KiB, too short for FFmpeg to recognise by probing (a render's
    last clip may show a single frame): the remux names its format instead."""
    path = tmp_path / "short.mp4"
    write_video(path, frames=frames, audio=write_tone(tmp_path / "tone.wav", 1.0))
    info = probe_video(path)
    assert info.num_frames == frames and info.has_audio
