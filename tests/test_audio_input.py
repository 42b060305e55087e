"""The input audio: decoding real files of several formats, the bad-input messages, the silence check, and
vocal separation with the tiny stand-in for Kim_Vocal_2.onnx (offline, without ffmpeg, leaving no files)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from memo.conditions.vocals import VocalSeparator, VocalSeparatorError, uvr_model_hash
from memo.constants import SAMPLE_RATE
from memo.io.audio import AudioError, check_min_duration, is_silent, load_audio, rms_dbfs
from memo.tiny.separator import TINY_SEPARATOR_PARAMS, write_tiny_vocal_separator

SECONDS = 1.7
FRAME = SAMPLE_RATE // 30  # one video frame at 30 fps, in samples


def _signal(rate: int, noise: bool) -> np.ndarray:
    """(2, samples) float32: a 440 Hz tone left and a 660 Hz tone right under a slow swell, plus noise."""
    t = np.arange(round(SECONDS * rate)) / rate
    swell = 0.55 - 0.45 * np.cos(2 * np.pi * t / 0.85)
    x = np.stack([0.6 * swell * np.sin(2 * np.pi * 440 * t), 0.4 * swell * np.sin(2 * np.pi * 660 * t + 1.0)])
    if noise:
        x = x + 0.01 * np.random.default_rng(0).standard_normal(x.shape)
    return x.astype(np.float32)


def _encode(path: Path, codec: str, samples: np.ndarray, rate: int, with_video: bool = False) -> Path:
    """Encode (channels, samples) float audio with PyAV, in chunks with timestamps as a real encoder would."""
    channels = samples.shape[0]
    layout = "stereo" if channels == 2 else "mono"
    packed = codec in ("pcm_s16le", "flac")
    with av.open(str(path), "w") as out:
        audio = out.add_stream(codec, rate=rate, layout=layout)
        if with_video:  # every stream is added before anything is written
            video = out.add_stream("mpeg4", rate=30)
            video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
            for i in range(round(SECONDS * 30)):
                image = np.full((64, 64, 3), i * 4 % 256, np.uint8)
                out.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            out.mux(video.encode(None))
        for start in range(0, samples.shape[1], 1000):
            piece = samples[:, start : start + 1000]
            if packed:
                data = (piece.T.reshape(1, -1) * 32767).round().astype(np.int16)
                frame = av.AudioFrame.from_ndarray(data, format="s16", layout=layout)
            else:
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(piece), format="fltp", layout=layout)
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media")
    stereo = _signal(44100, noise=True)
    files = {
        "wav": _encode(folder / "speech.wav", "pcm_s16le", stereo, 44100),
        "mp3": _encode(folder / "speech.mp3", "mp3", stereo, 44100),
        "m4a": _encode(folder / "speech.m4a", "aac", stereo, 44100),
        "mp4": _encode(folder / "talk.mp4", "aac", stereo, 44100, with_video=True),
        "flac": _encode(folder / "mono.flac", "flac", _signal(22050, noise=True)[:1], 22050),
    }
    video_only = folder / "video_only.mp4"
    with av.open(str(video_only), "w") as out:
        video = out.add_stream("mpeg4", rate=30)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        for _ in range(5):
            out.mux(video.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")))
        out.mux(video.encode(None))
    files["video_only"] = video_only
    files["empty"] = folder / "empty.wav"  # a WAV header and no samples
    sf.write(files["empty"], np.zeros(0, np.int16), 16000, subtype="PCM_16")
    files["zero_bytes"] = folder / "zero.m4a"
    files["zero_bytes"].touch()
    files["garbage"] = folder / "noise.mp3"
    files["garbage"].write_bytes(np.random.default_rng(1).bytes(20000))
    return files


@pytest.mark.parametrize("kind", ["wav", "mp3", "m4a", "mp4", "flac"])
def test_load_audio_decodes_formats_to_16k_mono(media, kind):
    waveform = load_audio(media[kind])
    assert waveform.dtype == torch.float32 and waveform.dim() == 1
    assert abs(waveform.shape[0] - SECONDS * SAMPLE_RATE) <= FRAME
    assert waveform.abs().max() <= 1.0
    reference = _signal(SAMPLE_RATE, noise=False)
    reference = reference[:1] if kind == "flac" else reference
    reference = torch.from_numpy(reference.mean(0))
    n = min(waveform.shape[0], reference.shape[0])
    correlation = torch.corrcoef(torch.stack([waveform[:n], reference[:n]]))[0, 1]
    assert correlation > 0.95, f"{kind}: correlation {correlation:.3f}"


def test_load_audio_other_rate(media):
    waveform = load_audio(media["wav"], sample_rate=8000)
    assert abs(waveform.shape[0] - SECONDS * 8000) <= 8000 // 30


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="does not exist") as info:
        load_audio(missing)
    assert str(missing) in str(info.value)


def test_undecodable_file(media):
    with pytest.raises(AudioError, match="Cannot read") as info:
        load_audio(media["garbage"])
    assert "noise.mp3" in str(info.value) and "convert it" in str(info.value)


def test_video_without_audio(media):
    with pytest.raises(AudioError, match="no audio stream") as info:
        load_audio(media["video_only"])
    assert "video_only.mp4" in str(info.value) and "video" in str(info.value)


def test_zero_length_audio(media):
    with pytest.raises(AudioError, match="no audio samples") as info:
        load_audio(media["empty"])
    assert "empty.wav" in str(info.value)
    with pytest.raises(AudioError, match="empty") as info:
        load_audio(media["zero_bytes"])
    assert "zero.m4a" in str(info.value)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(AudioError, match="folder"):
        load_audio(tmp_path)


def test_silence_detection(media):
    assert is_silent(torch.zeros(16000))
    assert is_silent(torch.zeros(0))
    assert is_silent(1e-5 * torch.randn(16000, generator=torch.Generator().manual_seed(0)))
    assert not is_silent(load_audio(media["wav"]))
    assert rms_dbfs(torch.full((100,), 0.5)) == pytest.approx(-6.02, abs=0.01)


def test_shorter_than_one_frame():
    with pytest.raises(AudioError, match="shorter than one video frame") as info:
        check_min_duration(torch.zeros(FRAME - 10), fps=30, path="clip.wav")
    assert "clip.wav" in str(info.value)
    check_min_duration(torch.zeros(FRAME + 1), fps=30)


def test_uvr_hash_of_large_file_uses_the_tail(tmp_path):
    big = tmp_path / "big.onnx"
    data = np.random.default_rng(2).bytes(10_240_000 + 12345)
    big.write_bytes(data)
    assert uvr_model_hash(big) == hashlib.md5(data[-10_240_000:]).hexdigest()
    small = tmp_path / "small.onnx"
    small.write_bytes(data[:1000])
    assert uvr_model_hash(small) == hashlib.md5(data[:1000]).hexdigest()


# ------------------------------------------------------------------------------------------------
# Vocal separation with the tiny stand-in


@pytest.fixture(scope="module")
def tiny_separator_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("memo") / "misc" / "vocal_separator"
    write_tiny_vocal_separator(folder)
    return folder


@pytest.fixture
def offline(monkeypatch):
    """Any HTTP(S) request would go to a closed local port and fail."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_tiny_stand_in_is_small_and_follows_the_contract(tiny_separator_dir):
    import onnxruntime as ort

    model = tiny_separator_dir / "Kim_Vocal_2.onnx"
    assert model.stat().st_size < 1_000_000
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    dim_f, dim_t = TINY_SEPARATOR_PARAMS["mdx_dim_f_set"], 2 ** TINY_SEPARATOR_PARAMS["mdx_dim_t_set"]
    assert inp.name == "input" and inp.shape[1:] == [4, dim_f, dim_t]
    x = np.random.default_rng(0).standard_normal((2, 4, dim_f, dim_t)).astype(np.float32)
    assert session.run(None, {"input": x})[0].shape == x.shape


def test_vocal_separation_offline_without_ffmpeg_leaves_no_files(
    tiny_separator_dir, media, tmp_path, monkeypatch, offline
):
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if not (Path(d) / "ffmpeg").exists())
    monkeypatch.setenv("PATH", path)
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)  # audio-separator skips its ffmpeg check under pytest
    assert shutil.which("ffmpeg") is None

    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))  # the default temporary folder, watched below
    model_files = _listing(tiny_separator_dir)

    separator = VocalSeparator.from_dir(tiny_separator_dir)
    speech = load_audio(media["wav"])
    vocals = separator(speech)
    assert vocals.dtype == torch.float32 and vocals.shape == speech.shape
    assert torch.isfinite(vocals).all() and vocals.abs().max() <= 1.0
    assert vocals.abs().max() > 0
    again = separator(speech)
    torch.testing.assert_close(again, vocals)

    assert _listing(tiny_separator_dir) == model_files
    # torch makes its compile cache folder (torchinductor_<user>) there when torch._dynamo is first imported
    assert [p for p in _listing(temp_root) if not p.startswith("torchinductor_")] == []


def test_vocal_separation_ten_seconds_in_a_work_dir(tiny_separator_dir, tmp_path, offline):
    work = tmp_path / "work"
    separator = VocalSeparator.from_dir(tiny_separator_dir, work_dir=work)
    t = torch.arange(10 * SAMPLE_RATE) / SAMPLE_RATE
    speech = 0.3 * torch.sin(2 * torch.pi * 220 * t) * (t % 1 < 0.6)
    vocals = separator(speech)
    assert vocals.shape == speech.shape and torch.isfinite(vocals).all()
    assert separator(torch.zeros(SAMPLE_RATE)).abs().max() == 0  # silence in, silence out
    assert _listing(work) == []


def test_parameters_without_sidecar(tiny_separator_dir, tmp_path, offline):
    folder = tmp_path / "vocal_separator"
    folder.mkdir()
    shutil.copy(tiny_separator_dir / "Kim_Vocal_2.onnx", folder)
    with pytest.raises(VocalSeparatorError, match="No separation parameters") as info:
        VocalSeparator.from_dir(folder)
    assert "Kim_Vocal_2.params.json" in str(info.value) and str(folder) in str(info.value)

    separator = VocalSeparator.from_dir(folder, params=TINY_SEPARATOR_PARAMS)
    assert separator(torch.zeros(4000)).shape == (4000,)
    assert _listing(folder) == ["Kim_Vocal_2.onnx"]


def test_missing_separator_model(tmp_path):
    with pytest.raises(VocalSeparatorError, match="Kim_Vocal_2.onnx is missing") as info:
        VocalSeparator.from_dir(tmp_path)
    assert str(tmp_path) in str(info.value) and "turn vocal separation off" in str(info.value)
    with pytest.raises(VocalSeparatorError, match="does not exist"):
        VocalSeparator.from_dir(tmp_path / "absent")


def test_damaged_separator_model(tmp_path, offline):
    (tmp_path / "Kim_Vocal_2.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(VocalSeparatorError, match="Cannot load the vocal separator"):
        VocalSeparator.from_dir(tmp_path, params=TINY_SEPARATOR_PARAMS)
