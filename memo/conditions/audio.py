"""The input audio: decoding any format once, checks for bad input, and vocal separation.

Decoding uses PyAV, which ships FFmpeg's libraries, so every container and codec FFmpeg reads works (wav,
mp3, m4a/aac, flac, ogg, the audio track of a video...) without a system ``ffmpeg``. The file is decoded
once, at its own rate and channels (:class:`DecodedAudio`); the 16 kHz mono copy the audio models take is
made from those samples by FFmpeg's resampler (as the original MEMO does with the ``ffmpeg`` command), and
the output video's sound track is encoded from the same samples.

Vocal separation follows the original MEMO: audio-separator with UVR's MDX-Net model ``Kim_Vocal_2.onnx``
(``misc/vocal_separator/`` in the MEMO repo), run on the 16 kHz audio at audio-separator's 44.1 kHz, the
vocals converted back to 16 kHz. It never downloads anything: the files audio-separator would fetch from
the network (a list of known models and the parameters of each, looked up by a hash of the model file)
are written into a temporary folder next to a link to the model, so the model folder itself is only read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memo.errors import UserError, as_path
from memo.runtimes import import_runtime

logger = logging.getLogger("memo")

SAMPLE_RATE = 16000


class AudioError(UserError, ValueError):
    """The input audio cannot be used; the message names the file and what to do about it."""


# --------------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True, eq=False)
class DecodedAudio:
    """The user's audio, decoded once at its own sample rate: the one source of every use of the sound.

    ``samples`` is a float32 array (channels, frames) in [-1, 1] at ``rate`` Hz with FFmpeg channel layout
    ``layout``; ``lost_seconds`` is how much of the file was skipped as damaged (0 for an undamaged file).
    :meth:`mono` gives the 16 kHz copy the audio models take; the mp4 writer encodes its sound track from
    ``samples`` (``memo.io.video.VideoWriter``), so the file is never read again. Memory: 4 bytes per sample
    and channel, about 21 MB a minute for 44.1 kHz stereo.
    """

    samples: np.ndarray
    rate: int
    layout: str
    path: Path  # the file, or the name of audio that came from memory (audio_from_samples)
    lost_seconds: float = 0.0

    @property
    def channels(self) -> int:
        return self.samples.shape[0]

    @property
    def seconds(self) -> float:
        return self.samples.shape[1] / self.rate

    def mono(self, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        """(samples,) float32 mono at ``sample_rate``, clipped to [-1, 1].

        The channels are averaged (plain (L+R)/2, as librosa gives the original MEMO, rather than FFmpeg's
        layout-dependent downmix gains), then FFmpeg's resampler converts the rate, as the original MEMO's
        ``ffmpeg`` command does.
        """
        import av

        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive whole number of Hz, got {sample_rate!r}.")
        mixed = self.samples.mean(axis=0, dtype=np.float32)
        if sample_rate != self.rate:
            resampler = av.AudioResampler(format="fltp", layout="mono", rate=int(sample_rate))
            pieces = []
            for start in range(0, mixed.shape[0], _RESAMPLE_BLOCK):
                frame = av.AudioFrame.from_ndarray(mixed[None, start : start + _RESAMPLE_BLOCK], "fltp", "mono")
                frame.sample_rate = self.rate
                pieces += [out.to_ndarray()[0] for out in resampler.resample(frame)]
            pieces += [out.to_ndarray()[0] for out in resampler.resample(None)]
            mixed = np.concatenate(pieces).astype(np.float32, copy=False) if pieces else mixed[:0]
        np.clip(mixed, -1.0, 1.0, out=mixed)
        return torch.from_numpy(mixed)


_RESAMPLE_BLOCK = 1 << 16


def decode_audio(path: str | os.PathLike) -> DecodedAudio:
    """Decode the first audio stream of ``path`` once, at the file's own sample rate and channel layout.

    Damaged packets inside an otherwise readable file are skipped, as the ``ffmpeg`` command does, with a
    warning (shown by default) that says how much audio was lost. A stream whose rate or layout changes
    midway is converted to those of its first frame. Raises :class:`AudioError` when the file is missing,
    cannot be decoded, has no audio stream or decodes to no samples. Nothing is written anywhere.
    """
    path = as_path(path, "The audio path")
    container, stream = _open_audio(path)
    with container:
        chunks, target, damage = _decode_stream(container, stream)

    if not chunks or not sum(chunk.shape[1] for chunk in chunks):
        if damage.first_error is not None:
            raise AudioError(
                f"Cannot decode the audio of {path} ({_reason(damage.first_error)}). The file may be damaged; "
                "convert it to WAV, MP3 or M4A and try again."
            ) from damage.first_error
        raise AudioError(f"{path} contains no audio samples (its audio track is empty). Pass audio with sound in it.")
    samples = np.concatenate(chunks, axis=1)
    np.clip(samples, -1.0, 1.0, out=samples)
    rate, layout = target
    if damage.skipped:
        lost = f"about {damage.lost_seconds:.2f} s of audio lost" if damage.lost_seconds else "length lost unknown"
        logger.warning(
            "audio: %s is damaged: skipped %d unreadable part(s) (%s; %s); using the %.2f s that decode.",
            path,
            damage.skipped,
            _reason(damage.first_error),
            lost,
            samples.shape[1] / rate,
        )
    return DecodedAudio(samples=samples, rate=rate, layout=layout, path=path, lost_seconds=damage.lost_seconds)


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Decode ``path`` to a (samples,) float32 mono tensor at ``sample_rate``, in [-1, 1].

    Shorthand for ``decode_audio(path).mono(sample_rate)``; raises :class:`AudioError` as
    :func:`decode_audio` does. When the sound track is needed too, decode once and keep the
    :class:`DecodedAudio`.
    """
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive whole number of Hz, got {sample_rate!r}.")
    return decode_audio(path).mono(sample_rate)


def audio_from_samples(samples: torch.Tensor | np.ndarray, rate: int, name: str = "The audio") -> DecodedAudio:
    """Audio a host program already holds (ComfyUI's AUDIO, a notebook's array) as the :class:`DecodedAudio` a
    file decodes to, so it takes the same path: the 16 kHz copy from :meth:`DecodedAudio.mono`, the mp4's sound
    from the samples themselves.

    ``samples``: (channels, samples) or (samples,) floats in [-1, 1] at ``rate`` Hz (louder samples are
    clipped). ``name`` stands for the audio in messages. Raises :class:`AudioError` naming it when there are no
    samples, some are NaN or infinite, or the rate is not a positive whole number; ValueError for a wrong shape.
    """
    import av

    array = torch.as_tensor(samples).detach().to("cpu", torch.float32).numpy()
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise ValueError(f"Expected audio of shape (channels, samples) or (samples,), got {tuple(array.shape)}.")
    if int(rate) != rate or rate <= 0:
        raise AudioError(f"{name} has sample rate {rate!r}; it must be a positive whole number of Hz.")
    if array.shape[1] == 0:
        raise AudioError(f"{name} holds no audio samples. Pass audio with sound in it.")
    if not np.isfinite(array).all():
        raise AudioError(f"{name} contains NaN or infinite samples; check what produced it.")
    array = np.clip(array, -1.0, 1.0)
    layout = av.AudioLayout(f"{array.shape[0]}c").name  # FFmpeg's default layout for that many channels
    return DecodedAudio(samples=np.ascontiguousarray(array), rate=int(rate), layout=layout, path=Path(name))


def _open_audio(path: Path):
    """Open ``path`` and its first audio stream, or raise :class:`AudioError` saying what is wrong with it."""
    import av

    if not path.exists():
        raise AudioError(f"Audio file not found: {path}. Check the path and file name.")
    if path.is_dir():
        raise AudioError(f"The audio path {path} is a folder; pass the audio file itself.")
    if path.stat().st_size == 0:
        raise AudioError(f"The audio file {path} is empty (0 bytes); it may not have finished copying.")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise AudioError(
            f"Cannot read {path} as audio ({_reason(e)}). The file may be damaged or not an audio/video file; "
            "convert it to WAV, MP3 or M4A and try again."
        ) from e
    if not container.streams.audio:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
        container.close()
        raise AudioError(
            f"{path} has no audio stream (it contains {kinds}). Pass a file with a sound track, "
            "for example a WAV, MP3 or M4A file, or a video with sound."
        )
    return container, container.streams.audio[0]


def check_audio(path: str | os.PathLike) -> Path:
    """Fail early, cheaply, on audio that :func:`decode_audio` would refuse: a missing, empty or unreadable
    file, or one without an audio stream (only the container's header is read). Returns the path."""
    path = as_path(path, "The audio path")
    container, _ = _open_audio(path)
    container.close()
    return path


@dataclass
class _Damage:
    """What decoding had to skip: how many packets, their total duration, and the first error."""

    skipped: int = 0
    lost_seconds: float = 0.0
    first_error: Exception | None = None

    def add(self, error: Exception, seconds: float = 0.0) -> None:
        self.skipped += 1
        self.lost_seconds += seconds
        self.first_error = self.first_error or error


def _decode_stream(container, stream) -> tuple[list[np.ndarray], tuple[int, str], _Damage]:
    """Decode ``stream`` into float32 (channels, samples) chunks at the rate and layout of its first frame.

    A resampler is used only to convert the sample format (and a rate or layout that changes mid-stream);
    it is rebuilt whenever the incoming setup changes, as FFmpeg's resampler takes one input setup.
    """
    import av

    chunks: list[np.ndarray] = []
    damage = _Damage()
    target: tuple[int, str] | None = None
    resampler = None
    setup = None

    def take(frames) -> None:
        for out in frames:
            planes = out.to_ndarray()  # (channels, samples), planar float
            if planes.shape[-1]:
                chunks.append(planes.reshape(-1, planes.shape[-1]).astype(np.float32, copy=False))

    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except (av.error.FFmpegError, ValueError) as e:
                seconds = float(packet.duration * packet.time_base) if packet.duration and packet.time_base else 0.0
                damage.add(e, seconds)
                continue
            for frame in frames:
                if target is None:
                    target = (frame.sample_rate, frame.layout.name)
                key = (frame.format.name, frame.layout.name, frame.layout.nb_channels, frame.sample_rate)
                if key != setup:
                    if resampler is not None:
                        take(resampler.resample(None))
                    resampler = av.AudioResampler(format="fltp", layout=target[1], rate=target[0])
                    setup = key
                take(resampler.resample(frame))
    except (av.error.FFmpegError, ValueError) as e:  # the container itself breaks off (truncated file)
        damage.add(e)
    if resampler is not None:
        take(resampler.resample(None))
    return chunks, target or (stream.rate or SAMPLE_RATE, "mono"), damage


def _reason(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return text.rstrip(".")


# --------------------------------------------------------------------------------------------------
# Checks the caller reports


def rms_dbfs(waveform: torch.Tensor) -> float:
    """Root-mean-square level in dB relative to full scale (a full-scale sine is about -3 dBFS); -inf for
    silence or an empty waveform."""
    if waveform.numel() == 0:
        return -math.inf
    rms = float(waveform.detach().double().pow(2).mean().sqrt())
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def is_silent(waveform: torch.Tensor, threshold_dbfs: float = -60.0) -> bool:
    """Whether the whole waveform's RMS level is at or below ``threshold_dbfs`` (empty counts as silent).
    Meant for a warning: silent audio still makes a (still-mouthed) video."""
    return rms_dbfs(waveform) <= threshold_dbfs


def duration_seconds(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> float:
    """Length of a (samples,) waveform in seconds."""
    return waveform.shape[-1] / sample_rate


def check_min_duration(
    waveform: torch.Tensor, fps: float, path: str | os.PathLike | None = None, sample_rate: int = SAMPLE_RATE
) -> None:
    """Raise :class:`AudioError` if the audio is shorter than one video frame at ``fps``."""
    seconds = duration_seconds(waveform, sample_rate)
    if seconds * fps < 1:
        name = f"The audio {path}" if path is not None else "The audio"
        raise AudioError(
            f"{name} lasts {seconds:.3f} s, shorter than one video frame at {fps:g} fps ({1 / fps:.3f} s). "
            "Use a longer audio clip."
        )


# --------------------------------------------------------------------------------------------------
# Vocal separation


class VocalSeparatorError(UserError, RuntimeError):
    """The vocal separator cannot be set up or run; the message names the files involved and what to do."""


KIM_VOCAL_2_PARAMS: dict[str, Any] = {
    "compensate": 1.009,
    "mdx_dim_f_set": 3072,
    "mdx_dim_t_set": 8,
    "mdx_n_fft_scale_set": 7680,
    "primary_stem": "Vocals",
}
"""UVR's parameters for Kim_Vocal_2.onnx (66,759,214 bytes), keyed in UVR's model data by its hash below."""

KNOWN_MODEL_PARAMS: dict[str, dict[str, Any]] = {"970b3f9492014d18fefeedfe4773cb42": KIM_VOCAL_2_PARAMS}

_MODEL_DATA_KEYS = ("compensate", "mdx_dim_f_set", "mdx_dim_t_set", "mdx_n_fft_scale_set", "primary_stem")
_REQUIRED_MODEL_DATA = _MODEL_DATA_KEYS[:4]
_MDX_DEFAULTS: dict[str, Any] = {"hop_length": 1024, "overlap": 0.25, "batch_size": 1, "enable_denoise": False}
"""audio-separator's defaults, which the original MEMO uses. ``segment_size`` defaults to the model's dim_t,
so onnxruntime runs the model as it is (audio-separator converts it to torch otherwise)."""
_MDX_KEYS = ("hop_length", "segment_size", "overlap", "batch_size", "enable_denoise")
_DOWNLOAD_LISTS = (
    "vr_download_list",
    "mdx_download_list",
    "demucs_download_list",
    "mdx23c_download_list",
    "mdx_download_vip_list",
    "mdx23c_download_vip_list",
    "roformer_download_list",
)
_HASHED_BYTES = 10000 * 1024


def uvr_model_hash(path: str | os.PathLike) -> str:
    """The MD5 that UVR and audio-separator key model parameters by: of the whole file if it is smaller than
    10,240,000 bytes, else of its last 10,240,000 bytes."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _HASHED_BYTES) if size >= _HASHED_BYTES else 0)
        digest = hashlib.md5()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def params_sidecar_path(model_path: str | os.PathLike) -> Path:
    """Where parameters for a model file may be given beside it: ``Kim_Vocal_2.onnx`` ->
    ``Kim_Vocal_2.params.json``."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.params.json")


def _resolve_params(model_path: Path, model_hash: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Model data and MDX settings for ``model_path``: ``params`` over the sidecar file if there is one,
    else over UVR's parameters for the file's hash (built in, or from an ``mdx_model_data.json`` beside it)."""
    tried = []
    base: dict[str, Any] | None = None
    sidecar = params_sidecar_path(model_path)
    if sidecar.is_file():
        try:
            base = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise VocalSeparatorError(
                f"Cannot read the separator parameters in {sidecar}: {e}. Fix or delete it."
            ) from e
        if not isinstance(base, dict):
            raise VocalSeparatorError(f"{sidecar} must hold a JSON object of separator parameters.")
    else:
        tried.append(f"no {sidecar.name} beside it")
        base = KNOWN_MODEL_PARAMS.get(model_hash)
        uvr_data = model_path.parent / "mdx_model_data.json"
        if base is None and uvr_data.is_file():
            with contextlib.suppress(OSError, ValueError):
                base = json.loads(uvr_data.read_text(encoding="utf-8")).get(model_hash)
        if base is None:
            tried.append(f"its hash {model_hash} is not Kim_Vocal_2's nor in an mdx_model_data.json beside it")

    merged = {**(base or {}), **(params or {})}
    unknown = sorted(set(merged) - set(_MODEL_DATA_KEYS) - set(_MDX_KEYS))
    if unknown:
        raise VocalSeparatorError(
            f"Unknown separator parameters {unknown} for {model_path}; allowed: {list(_MODEL_DATA_KEYS + _MDX_KEYS)}."
        )
    missing = [k for k in _REQUIRED_MODEL_DATA if k not in merged]
    if missing:
        raise VocalSeparatorError(
            f"No separation parameters for {model_path} ({'; '.join(tried) or 'incomplete parameters'}): missing "
            f"{missing}. Use MEMO's Kim_Vocal_2.onnx, or write {sidecar} with UVR's model data for this model, "
            'e.g. {"compensate": 1.009, "mdx_dim_f_set": 3072, "mdx_dim_t_set": 8, "mdx_n_fft_scale_set": 7680, '
            '"primary_stem": "Vocals"}.'
        )
    merged.setdefault("primary_stem", "Vocals")
    n_fft, dim_f = int(merged["mdx_n_fft_scale_set"]), int(merged["mdx_dim_f_set"])
    hop = int(merged.get("hop_length", _MDX_DEFAULTS["hop_length"]))
    if not 0 < dim_f <= n_fft // 2 + 1 or not 0 < hop <= n_fft:
        raise VocalSeparatorError(
            f"Separator parameters for {model_path} are inconsistent: need 0 < dim_f ({dim_f}) <= n_fft/2+1 "
            f"({n_fft // 2 + 1}) and 0 < hop_length ({hop}) <= n_fft ({n_fft})."
        )
    if merged["primary_stem"] not in ("Vocals", "Instrumental"):
        raise VocalSeparatorError(
            f"{model_path} separates {merged['primary_stem']!r}, not vocals; use a vocals/instrumental model."
        )
    return merged


def _write_offline_data(folder: Path, model_filename: str, model_hash: str, model_data: Mapping[str, Any]) -> None:
    """The three files audio-separator downloads when they are missing from its model folder: UVR's model
    lists (all seven, the MDX one naming our file), and MDX and VR parameters keyed by the file's hash."""
    checks = {name: {} for name in _DOWNLOAD_LISTS}
    checks["mdx_download_list"] = {f"MDX-Net Model: {Path(model_filename).stem}": model_filename}
    (folder / "download_checks.json").write_text(json.dumps(checks), encoding="utf-8")
    (folder / "mdx_model_data.json").write_text(json.dumps({model_hash: dict(model_data)}), encoding="utf-8")
    (folder / "vr_model_data.json").write_text("{}", encoding="utf-8")


def _place(source: Path, target: Path) -> None:
    """Make ``target`` read as ``source``: a symbolic link, else a hard link, else a copy."""
    error = None
    for make in (os.symlink, os.link, shutil.copyfile):
        try:
            make(source, target)
            return
        except OSError as e:
            error = e
    raise error


def _separator_class():
    """audio-separator's Separator, without its ``ffmpeg -version`` check.

    audio-separator needs ffmpeg only for writing stems with pydub; we write them with soundfile
    (``use_soundfile=True``) and it reads WAV input with soundfile, so ffmpeg is never run. Its constructor
    nevertheless runs ``ffmpeg -version`` (``Separator.check_ffmpeg_installed``) and fails without a system
    ffmpeg; overriding that one method skips the check without touching PATH or the environment.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydub warns on import when there is no ffmpeg; it is not used
        Separator = import_runtime("audio_separator.separator").Separator  # noqa: N806 (audio-separator's class)

    class _NoFfmpegCheckSeparator(Separator):
        def check_ffmpeg_installed(self):  # see the docstring above
            self.logger.debug("Skipping the ffmpeg check: stems are written with soundfile.")

    return _NoFfmpegCheckSeparator


class VocalSeparator:
    """Vocals of a 16 kHz mono waveform, separated by an MDX-Net ONNX model through audio-separator.

    Build with :meth:`from_dir`. Each call works in a temporary folder (under ``work_dir`` if given) that is
    removed afterwards, whatever happens. Not safe to call from several threads at once.
    """

    def __init__(self, separator, model_path: Path, work_dir: str | os.PathLike | None = None):
        self._separator = separator
        self.model_path = model_path
        self.work_dir = work_dir

    @classmethod
    def from_dir(
        cls,
        model_dir: str | os.PathLike,
        model_filename: str = "Kim_Vocal_2.onnx",
        work_dir: str | os.PathLike | None = None,
        params: Mapping[str, Any] | None = None,
        log_level: int = logging.ERROR,
    ) -> VocalSeparator:
        """Load ``model_dir/model_filename`` (MEMO's ``misc/vocal_separator`` folder), offline.

        Parameters come from ``params`` (UVR model-data keys ``compensate``, ``mdx_dim_f_set``,
        ``mdx_dim_t_set`` (log2 of dim_t), ``mdx_n_fft_scale_set``, ``primary_stem``, and audio-separator's
        MDX settings ``hop_length``, ``segment_size``, ``overlap``, ``batch_size``, ``enable_denoise``), over
        a ``<model>.params.json`` file beside the model if present, else over UVR's parameters for the
        file's hash (Kim_Vocal_2's are built in). ``model_dir`` is only read.
        """
        model_dir = Path(model_dir)
        model_path = model_dir / model_filename
        if not model_dir.is_dir():
            raise VocalSeparatorError(
                f"The vocal separator folder {model_dir} does not exist. Download MEMO's "
                f"misc/vocal_separator/{model_filename} into it, or turn vocal separation off."
            )
        if not model_path.is_file():
            raise VocalSeparatorError(
                f"The vocal separator model {model_filename} is missing from {model_dir}. Download MEMO's "
                f"misc/vocal_separator/{model_filename} into that folder, or turn vocal separation off."
            )
        model_hash = uvr_model_hash(model_path)
        settings = _resolve_params(model_path, model_hash, params)
        model_data = {k: settings[k] for k in _MODEL_DATA_KEYS}
        mdx_params = {**_MDX_DEFAULTS, "segment_size": 2 ** int(settings["mdx_dim_t_set"])}
        mdx_params.update({k: settings[k] for k in _MDX_KEYS if k in settings})

        separator_class = _separator_class()
        if work_dir is not None:
            Path(work_dir).mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(prefix="memo-separator-", dir=work_dir) as tmp:
                staged = Path(tmp) / "models"
                staged.mkdir()
                _place(model_path.resolve(), staged / model_filename)
                _write_offline_data(staged, model_filename, model_hash, model_data)
                with warnings.catch_warnings():  # Separator() silences all warnings process-wide otherwise
                    separator = separator_class(
                        log_level=log_level,
                        model_file_dir=str(staged),
                        output_dir=str(Path(tmp) / "out"),
                        output_single_stem="Vocals",
                        use_soundfile=True,
                        mdx_params=mdx_params,
                    )
                    # AUDIO_SEPARATOR_MODEL_DIR in the environment would redirect it; the staged folder wins.
                    separator.model_file_dir = str(staged)
                    separator.load_model(model_filename)
                # The model is in memory now (an onnxruntime session); the staged folder can go.
        except VocalSeparatorError:
            raise
        except Exception as e:
            raise VocalSeparatorError(
                f"Cannot load the vocal separator {model_path}: {type(e).__name__}: {e}. The file may be damaged "
                "or not an MDX-Net model (input named 'input', shape [batch, 4, dim_f, dim_t]); download it again "
                "or turn vocal separation off."
            ) from e
        return cls(separator, model_path, work_dir)

    def __call__(self, waveform_16k: torch.Tensor) -> torch.Tensor:
        """Vocals of a (samples,) 16 kHz mono waveform: a float32 (samples,) 16 kHz tensor of the same length."""
        import soundfile as sf

        waveform = torch.as_tensor(waveform_16k).detach()
        if waveform.dim() == 2 and 1 in waveform.shape:
            waveform = waveform.reshape(-1)
        if waveform.dim() != 1:
            raise ValueError(f"Expected a (samples,) mono waveform, got shape {tuple(waveform.shape)}.")
        if waveform.numel() == 0:
            raise ValueError("Cannot separate vocals from an empty waveform.")
        samples = waveform.to(torch.float32).cpu().numpy()
        if not np.isfinite(samples).all():
            raise ValueError("The waveform contains NaN or infinite values.")

        separator = self._separator
        with tempfile.TemporaryDirectory(prefix="memo-vocals-", dir=self.work_dir) as tmp:
            source = Path(tmp) / "speech.wav"
            sf.write(source, samples, SAMPLE_RATE, subtype="FLOAT")
            separator.output_dir = tmp
            separator.model_instance.output_dir = tmp
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with contextlib.redirect_stderr(io.StringIO()):  # audio-separator's own progress bars
                        outputs = separator.separate(str(source), custom_output_names={"Vocals": "vocals"})
            except Exception as e:
                raise VocalSeparatorError(
                    f"Vocal separation with {self.model_path} failed: {type(e).__name__}: {e}. Check the model "
                    "file, or turn vocal separation off."
                ) from e
            finally:
                separator.output_dir = separator.model_instance.output_dir = None
            if len(outputs) != 1 or not (Path(tmp) / outputs[0]).is_file():
                raise VocalSeparatorError(
                    f"Vocal separation with {self.model_path} wrote {outputs}, not one vocals file."
                )
            vocals = load_audio(Path(tmp) / outputs[0], SAMPLE_RATE)

        n = samples.shape[0]  # the 16 -> 44.1 -> 16 kHz round trip can be a sample or two off
        if vocals.shape[0] >= n:
            return vocals[:n].clone()
        return torch.nn.functional.pad(vocals, (0, n - vocals.shape[0]))
