"""The video as a growing list of segments: one H.264 + AAC MPEG-TS file per clip, a live HLS playlist listing
them, and the mp4 assembled from them at the end by remuxing (no second encode).

Every render goes through the segments, resumed or not, so a resumed video is made of the same encoded pieces
as an uninterrupted one. Each segment is encoded by an encoder of its own (libx264 on its CPU-independent
algorithms, :data:`memo.io.video.X264_PARAMS`), starting on a key frame, its timestamps continuing the
previous segment's: the same frames give the same bytes. The sound is encoded once for the whole video
(:func:`encode_sound`, one AAC stream, so no priming samples or gaps at the joins); each segment carries the
AAC packets that start within its time, and the mp4 takes the whole stream.

Every file is written through :class:`memo.io.partial.Partial` (hidden name, renamed when complete), so a
reader of the playlist never meets half a segment and a killed run leaves no half-written one behind.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
import torch

from memo.io.partial import Partial, write_atomically
from memo.io.video import _AAC_RATES, X264_PARAMS, OutputExistsError, _make_folders, to_pixels

if TYPE_CHECKING:
    from memo.io.audio import DecodedAudio

SOUND_NAME = "sound.m4a"
"""The video's whole sound track, AAC, encoded once per job (:func:`encode_sound`)."""
PLAYLIST_NAME = "live.m3u8"
"""The live HLS playlist (EVENT type) of the segments written so far."""
SEGMENT_SUFFIX = ".ts"


def segment_name(clip: int) -> str:
    """The file name of clip ``clip``'s segment (0-based): ``clip-00041.ts``."""
    return f"clip-{clip:05d}{SEGMENT_SUFFIX}"


def encode_sound(audio: DecodedAudio, seconds: Fraction, path: str | os.PathLike) -> Path:
    """Encode ``audio``'s first ``seconds`` (the video's length) as one AAC stream into an m4a at ``path``,
    atomically; at the file's own rate when AAC allows it (else 48 kHz), mono or stereo. Returns ``path``.

    The same samples give the same packets: a resumed job may encode it again."""
    path = Path(path)
    rate = audio.rate if audio.rate in _AAC_RATES else 48000
    layout = "mono" if audio.channels == 1 else "stereo"
    with Partial(path, suffix=".m4a") as partial:
        with av.open(str(partial.path), "w", format="mp4") as container:
            stream = container.add_stream("aac", rate=rate, layout=layout)
            resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
            fifo = av.AudioFifo()
            source = np.ascontiguousarray(audio.samples[:, : math.ceil(seconds * audio.rate) + audio.rate])
            block = av.AudioFrame.from_ndarray(source, format="fltp", layout=audio.layout)
            block.sample_rate = audio.rate
            for converted in [*resampler.resample(block), *resampler.resample(None)]:
                converted.pts = None
                fifo.write(converted)
            take = min(round(seconds * rate), fifo.samples)
            if take > 0:
                frame = fifo.read(take)
                frame.pts, frame.time_base = 0, Fraction(1, rate)
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        return partial.publish()


def _sound_packets(sound: av.container.InputContainer) -> list[av.Packet]:
    return [packet for packet in sound.demux(sound.streams.audio[0]) if packet.size]


class SegmentWriter:
    """Encode frames ``first_frame``.. of the video, at ``rate`` frames per second and ``width`` x ``height``, as
    they come into an MPEG-TS segment at ``path`` with the AAC packets of ``sound`` (an m4a from
    :func:`encode_sound`, or None) that start in its time; :meth:`publish` renames it onto ``path`` once the
    last frame is in. Leaving a ``with`` block without publishing removes the hidden file."""

    def __init__(
        self,
        path: str | os.PathLike,
        first_frame: int,
        rate: Fraction,
        width: int,
        height: int,
        crf: int,
        sound: str | os.PathLike | None,
    ) -> None:
        self.path, self.first_frame, self.rate = Path(path), first_frame, rate
        self.width, self.height = width, height
        self.num_frames = 0
        self._sound = sound
        self._partial = Partial(self.path, suffix=SEGMENT_SUFFIX)
        try:
            self._container = av.open(
                str(self._partial.path), "w", format="mpegts", container_options={"avoid_negative_ts": "disabled"}
            )
            self._video = self._container.add_stream(
                "libx264", rate=rate, options={"crf": str(crf), "x264-params": X264_PARAMS}
            )
            self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
            self._packets: list[tuple[Fraction, av.Packet]] = []
            if sound is not None:
                with av.open(str(sound)) as source:
                    audio = self._container.add_stream_from_template(source.streams.audio[0])
                    self._packets = [(packet.pts * packet.time_base, packet) for packet in _sound_packets(source)]
                    for _, packet in self._packets:
                        packet.stream = audio
        except BaseException:
            self.discard()
            raise

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """Encode frames: a float (3, n, H, W) tensor or array in [0, 1], or a uint8 (n, H, W, 3) array."""
        for image in to_pixels(frames, self.height, self.width):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = self.first_frame + self.num_frames, 1 / self.rate
            self._container.mux(self._video.encode(frame))
            self.num_frames += 1

    def publish(self) -> Path:
        """Finish the segment (its sound: the packets starting in its time, the first segment's priming too)
        and rename it onto :attr:`path`; returns it."""
        start = Fraction(self.first_frame) / self.rate
        end = Fraction(self.first_frame + self.num_frames) / self.rate
        self._container.mux(self._video.encode(None))
        for at, packet in self._packets:
            if (self.first_frame == 0 or at >= start) and at < end:
                self._container.mux(packet)
        self._container.close()
        return self._partial.publish()

    def discard(self) -> None:
        """Stop without publishing (safe after :meth:`publish`)."""
        if not self._partial.done:
            with contextlib.suppress(av.FFmpegError, OSError, AttributeError):
                self._container.close()
        self._partial.discard()


def playlist_text(durations: Sequence[float], ended: bool) -> str:
    """An HLS playlist (EVENT type, or VOD once ``ended``) of segments ``clip-00000.ts``... of ``durations``
    seconds each, in order."""
    lines = [
        "#EXTM3U",
        "#EXT-X-VERSION:3",
        f"#EXT-X-TARGETDURATION:{math.ceil(max(durations, default=1))}",
        "#EXT-X-MEDIA-SEQUENCE:0",
        f"#EXT-X-PLAYLIST-TYPE:{'VOD' if ended else 'EVENT'}",
    ]
    for clip, seconds in enumerate(durations):
        lines += [f"#EXTINF:{seconds:.6f},", segment_name(clip)]
    if ended:
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


def write_playlist(folder: str | os.PathLike, durations: Sequence[float], ended: bool = False) -> Path:
    """Rewrite the live playlist of ``folder`` atomically (:func:`playlist_text`); returns its path."""
    return write_atomically(Path(folder) / PLAYLIST_NAME, playlist_text(durations, ended))


def assemble(
    segments: Sequence[str | os.PathLike],
    sound: str | os.PathLike | None,
    output: str | os.PathLike,
    overwrite: bool,
    comment: str = "Generated by MEMO",
) -> Path:
    """Remux the segments' H.264 (in order) and ``sound``'s whole AAC stream into the mp4 ``output`` (fast start),
    published atomically; no frame is encoded again. Raises :class:`memo.io.video.OutputExistsError` when the
    output appeared meanwhile and ``overwrite`` is off. Returns ``output``."""
    output = Path(output)
    created = _make_folders(output.parent)
    try:
        with Partial(output, suffix=".mp4") as partial:
            with contextlib.ExitStack() as inputs:
                # named, not probed: FFmpeg's probe gives up on a short segment of flat frames (a few KiB)
                opened = [inputs.enter_context(av.open(str(path), format="mpegts")) for path in segments]
                source = inputs.enter_context(av.open(str(sound))) if sound is not None else None
                container = inputs.enter_context(
                    av.open(str(partial.path), "w", format="mp4", options={"movflags": "+faststart"})
                )
                container.metadata.update({"comment": comment, "description": comment})
                video = container.add_stream_from_template(opened[0].streams.video[0])
                sound_packets = []
                if source is not None:
                    audio = container.add_stream_from_template(source.streams.audio[0])
                    sound_packets = _sound_packets(source)
                    for packet in sound_packets:
                        packet.stream = audio
                sound_packets.reverse()  # popped from the end, in time order
                for segment in opened:
                    for packet in segment.demux(segment.streams.video[0]):
                        if not packet.size:
                            continue
                        at = packet.dts * packet.time_base
                        while sound_packets and sound_packets[-1].dts * sound_packets[-1].time_base <= at:
                            container.mux(sound_packets.pop())
                        packet.stream = video
                        container.mux(packet)
                while sound_packets:
                    container.mux(sound_packets.pop())
            if not overwrite and output.exists():
                raise OutputExistsError(f"Output {str(output)!r} appeared while writing; pass --overwrite.")
            return partial.publish()
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
