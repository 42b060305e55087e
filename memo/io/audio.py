"""Decoding the user's audio: any format, once, at its own rate; the 16 kHz mono copy; checks for bad input.

Decoding uses PyAV, which ships FFmpeg's libraries, so every container and codec FFmpeg reads works (wav,
mp3, m4a/aac, flac, ogg, the audio track of a video...) without a system ``ffmpeg``. The file is decoded
once, at its own rate and channels (:class:`DecodedAudio`); the 16 kHz mono copy the audio models take is
made from those samples by FFmpeg's resampler (as the original MEMO does with the ``ffmpeg`` command), and
the output video's sound track is encoded from the same samples (``memo.io.video``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memo.constants import SAMPLE_RATE
from memo.errors import UserError, as_path
from memo.io.inputs import input_problem

logger = logging.getLogger("memo")


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
    ``samples`` (``memo.io.video_writer.VideoWriter``), so the file is never read again. Memory: 4 bytes per sample
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

    @functools.cached_property
    def downmix(self) -> Downmix:
        """Which channels :meth:`mono` averages, and why when not all of them (:func:`choose_downmix`); a
        warning, shown by default, says so the first time it is asked for."""
        choice = choose_downmix(self.samples, self.rate, self.layout)
        if choice.reason is not None:
            logger.warning("audio: %s: %s", self.path, choice.reason)
        return choice

    def mono(self, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        """(samples,) float32 mono at ``sample_rate``, clipped to [-1, 1].

        The channels are averaged (plain (L+R)/2, as librosa gives the original MEMO, rather than FFmpeg's
        layout-dependent downmix gains), then FFmpeg's resampler converts the rate, as the original MEMO's
        ``ffmpeg`` command does. Where the average would lose the voice (channels that cancel, a dead
        channel, a delayed copy: :func:`choose_downmix`), only the channels that keep it are used, with a
        warning; the sound track of the video keeps every channel as given.
        """
        import av

        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive whole number of Hz, got {sample_rate!r}.")
        used = self.downmix.channels
        source = self.samples if len(used) == self.channels else self.samples[list(used)]
        mixed = source.mean(axis=0, dtype=np.float32)
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


# --------------------------------------------------------------------------------------------------
# Downmixing to mono

KEPT_ENERGY = 0.25
"""The least share of the channels' mean energy the average must keep (6 dB down): below it the channels
cancel, as for a phase-inverted channel (average 0). Two unrelated channels keep 0.5, identical ones 1."""
EQUALLY_LOUD = 0.8
"""Channels within this share of the loudest one's energy (1 dB) count as equally loud: the first is taken, so
(x, -x) gives x even when rounding made -x a hair louder."""
DEAD_CHANNEL = 1e-4
"""A channel with under this share of the loudest channel's energy (40 dB down) is dead (a disconnected input,
an empty track): averaging it in would only halve the voice's level."""
DELAY_CORRELATION = 0.9
"""Two channels are one signal delayed when their normalised cross-correlation reaches this at some lag..."""
ALIGNED_CORRELATION = 0.5
"""...while at lag 0 it stays at or below this one (else summing them loses little)."""
DELAY_RANGE = (0.0005, 0.040)
"""Delays in seconds looked for: from 0.5 ms (summing comb-filters the voice from 1 kHz up) to 40 ms (the
longest delay of a Haas "widener"; longer ones are heard as an echo on the sound track)."""
DELAY_EXCERPT = 10.0
"""Seconds of audio the delay is measured on: the loudest stretch of that length (a delay does not change)."""


@dataclass(frozen=True)
class Downmix:
    """The channels averaged into the mono copy (indices, in order) and why not all of them (None: all)."""

    channels: tuple[int, ...]
    reason: str | None = None


def _channel_names(layout: str, count: int) -> list[str]:
    """The channels' names for messages: from ``layout``, or FFmpeg's default order for ``count`` channels when
    the layout gives none (a WAV's "2 channels"); plain left and right for stereo."""
    import av

    for name in (layout, f"{count}c"):
        try:
            names = [channel.description for channel in av.AudioLayout(name).channels]
        except (ValueError, av.error.FFmpegError):
            continue
        if len(names) == count and "none" not in names:
            return ["left", "right"] if names == ["front left", "front right"] else names
    return [f"channel {i + 1}" for i in range(count)]


def _energies(samples: np.ndarray) -> np.ndarray:
    """The channels' (C, C) float64 matrix of mean products, energies on the diagonal (float32 dot products
    over blocks of a million samples, summed in float64: well within what the thresholds need)."""
    count, block = samples.shape[0], 1 << 20
    gram = np.zeros((count, count))
    for start in range(0, samples.shape[1], block):
        part = samples[:, start : start + block]
        for i in range(count):
            for j in range(i, count):
                gram[i, j] += float(np.dot(part[i], part[j]))
    gram = np.triu(gram) + np.triu(gram, 1).T
    return gram / max(samples.shape[1], 1)


def channel_delay(first: np.ndarray, second: np.ndarray, rate: int) -> tuple[float, float, float]:
    """How far ``second`` lags ``first`` (seconds, negative when it leads), within :data:`DELAY_RANGE`,
    measured on the loudest :data:`DELAY_EXCERPT` seconds: (delay, normalised cross-correlation there, at
    lag 0). Correlations are in [-1, 1]; (0, 0, 0) for silence."""
    length = min(first.shape[0], round(DELAY_EXCERPT * rate))
    if first.shape[0] > length:
        windows = first.shape[0] // length
        stretches = first[: windows * length].reshape(windows, length)
        power = np.einsum("ij,ij->i", stretches, stretches)
        start = int(np.argmax(power)) * length
        first, second = first[start : start + length], second[start : start + length]
    a = first.astype(np.float64) - first.mean()
    b = second.astype(np.float64) - second.mean()
    norm = math.sqrt(float(a @ a) * float(b @ b))
    if norm == 0:
        return 0.0, 0.0, 0.0
    lowest, longest = (max(1, math.ceil(bound * rate)) for bound in DELAY_RANGE)
    longest = min(longest, length - 1)
    if lowest > longest:
        return 0.0, 0.0, float(a @ b) / norm
    size = 1 << math.ceil(math.log2(length + longest))
    correlation = np.fft.irfft(np.conj(np.fft.rfft(a, size)) * np.fft.rfft(b, size), size) / norm
    lags = np.concatenate([np.arange(lowest, longest + 1), -np.arange(lowest, longest + 1)])
    best = lags[int(np.argmax(correlation[lags]))]
    return best / rate, float(correlation[best]), float(correlation[0])


def choose_downmix(samples: np.ndarray, rate: int, layout: str = "") -> Downmix:
    """The channels whose average keeps the voice, for ``samples`` (channels, frames) at ``rate`` Hz.

    Normally all of them: the plain average the original MEMO takes, so ordinary stereo gives exactly its
    samples. Three faults make the average lose the voice, and each is answered with the channels that keep
    it (the alternative, a mix that undoes the fault, would need a guess at what the fault was):

    * channels that cancel: their average keeps under :data:`KEPT_ENERGY` of their mean energy (a
      phase-inverted channel keeps none). The loudest channel is used alone (the first of equally loud
      ones, :data:`EQUALLY_LOUD`), so (x, -x) gives exactly what mono x gives.
    * dead channels (:data:`DEAD_CHANNEL`): averaged in, they halve the level; the live ones are averaged.
    * one channel a delayed copy of the other (:data:`DELAY_CORRELATION`, :data:`DELAY_RANGE`): the average
      is comb-filtered (notches every 1/delay Hz through the voice). The leading channel is used, since the
      voice is heard first there and the lips follow it.

    ``layout`` (FFmpeg's name) only names the channels in the reason. Silence is left to the silence check.
    """
    count = samples.shape[0]
    everything = Downmix(tuple(range(count)))
    if count < 2:
        return everything
    gram = _energies(samples)
    energy = np.diag(gram)
    if energy.max() <= 0:
        return everything
    names = _channel_names(layout, count)
    live = [c for c in range(count) if energy[c] >= DEAD_CHANNEL * energy.max()]
    kept = gram[np.ix_(live, live)].sum() / (len(live) * energy[live].sum())
    if kept < KEPT_ENERGY:
        loudest = next(c for c in live if energy[c] >= EQUALLY_LOUD * energy.max())
        return Downmix(
            (loudest,),
            f"its channels cancel out when averaged (the average keeps {100 * kept:.0f}% of their energy: "
            f"a channel is likely phase-inverted); using the {names[loudest]} channel alone for the audio "
            "features (the video's sound keeps every channel)",
        )
    if len(live) == 2:
        delay, correlation, aligned = channel_delay(samples[live[0]], samples[live[1]], rate)
        if correlation >= DELAY_CORRELATION and aligned <= ALIGNED_CORRELATION:
            leading, lagging = live if delay > 0 else live[::-1]
            return Downmix(
                (leading,),
                f"its {names[lagging]} channel is the {names[leading]} one delayed by {1000 * abs(delay):.1f} ms, "
                f"and averaging them would comb-filter the voice; using the {names[leading]} channel alone for "
                "the audio features (the video's sound keeps every channel)",
            )
    if len(live) < count:
        dead = ", ".join(names[c] for c in range(count) if c not in live)
        return Downmix(
            tuple(live),
            f"its {dead} channel is silent, and averaging it in would halve the voice's level; using "
            f"{' and '.join(names[c] for c in live)} for the audio features",
        )
    return everything


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
        declared = _declared_seconds(container, stream)
        chunks, target, damage = _decode_stream(container, stream)

    if not chunks or not sum(chunk.shape[1] for chunk in chunks):
        if damage.first_error is not None:
            raise AudioError(
                f"Cannot decode the audio of {path} ({_reason(damage.first_error)}). The file may be damaged; "
                "convert it to WAV, MP3 or M4A and try again."
            ) from damage.first_error
        raise AudioError(f"{path} contains no audio samples (its audio track is empty). Pass audio with sound in it.")
    samples = np.concatenate(chunks, axis=1)
    rate, layout = target
    _silence_non_finite(samples, rate, path)
    np.clip(samples, -1.0, 1.0, out=samples)
    missing = _missing_seconds(path, declared, samples.shape[1] / rate)
    if damage.skipped:
        damage.lost_seconds = max(damage.lost_seconds, missing)
        lost = f"about {damage.lost_seconds:.2f} s of audio lost" if damage.lost_seconds else "length lost unknown"
        logger.warning(
            "audio: %s is damaged: skipped %d unreadable part(s) (%s; %s); using the %.2f s that decode.",
            path,
            damage.skipped,
            _reason(damage.first_error),
            lost,
            samples.shape[1] / rate,
        )
    elif missing:
        damage.lost_seconds = missing
        logger.warning(
            "audio: %s decodes to %.2f s, about %.2f s less than its header gives: the file is likely cut short "
            "(an unfinished download, copy or recording); using the %.2f s that decode.",
            path,
            samples.shape[1] / rate,
            missing,
            samples.shape[1] / rate,
        )
    return DecodedAudio(samples=samples, rate=rate, layout=layout, path=path, lost_seconds=damage.lost_seconds)


CUT_SHORT = (0.1, 0.05)
"""A file is taken as cut short when it decodes to at least this many seconds and this share of its declared
length less than its header declares (codec priming and padding differ by a few hundredths of a second)."""


def _declared_seconds(container, stream) -> float | None:
    """The length the file's header declares, in seconds, or None when it declares none."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / 1e6 if container.duration else None


def _missing_seconds(path: Path, declared: float | None, decoded: float) -> float:
    """How much shorter than its header declares the file decodes (seconds; 0 when not by :data:`CUT_SHORT`).

    FFmpeg shortens a WAV's declared length to what the file holds, so for a RIFF file the header's own byte
    count is compared with the file's size (a streaming writer's 0 or 0xFFFFFFFF declares nothing)."""
    with path.open("rb") as file:
        head = file.read(12)
    if len(head) == 12 and head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        riff = int.from_bytes(head[4:8], "little")
        size = path.stat().st_size
        if 0 < riff < 0xFFFFFFFF and riff + 8 > size:
            declared = decoded * (riff + 8) / size
    if declared is None:
        return 0.0
    missing = declared - decoded
    least, share = CUT_SHORT
    return missing if missing >= least and missing >= share * declared else 0.0


def _silence_non_finite(samples: np.ndarray, rate: int, path: Path) -> None:
    """Replace NaN and infinite samples (a float WAV from a faulty effect or export) by silence, in place, with
    a warning: they would turn the audio features, and so every frame, into NaN."""
    bad = ~np.isfinite(samples)
    count = int(np.count_nonzero(bad))
    if count:
        samples[bad] = 0.0
        logger.warning(
            "audio: %s holds %d sample(s) that are not numbers (NaN or infinite, about %.3f s); they are replaced "
            "by silence. Re-export the audio for a clean result.",
            path,
            count,
            count / samples.shape[0] / rate,
        )


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

    problem = input_problem(path, "audio file")
    if problem is not None:
        raise AudioError(f"The audio {path} {problem}.")
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
