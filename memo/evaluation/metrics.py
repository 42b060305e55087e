"""Per-video features and the distances computed from them: FID, FVD, SyncNet offset/confidence, CSIM, motion.

Features come from the networks of :mod:`memo.evaluation.models`; distances use the libraries' own functions
where there is one (torch-fidelity's FID statistics and Fréchet distance, cd-fvd's feature statistics and FVD),
so the numbers are theirs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np
import torch
import torch.nn.functional as F

from memo.conditions.face import FaceAnalyzer
from memo.constants import SAMPLE_RATE
from memo.errors import UserError, import_runtime
from memo.io.audio import AudioError, decode_audio
from memo.models.syncnet import CROP_SIZE, FPS, MFCC_PER_FRAME, MFCC_WINDOW, VIDEO_WINDOW, SyncNet

SYNC_SAMPLE_RATE = SAMPLE_RATE
"""SyncNet's audio rate (Hz); MFCCs at 100 Hz from 25 ms windows (python_speech_features' defaults)."""
SYNC_MAX_OFFSET = 15
"""Largest audio-video offset searched, in frames at 25 fps (syncnet_python's ``--vshift`` default)."""
SYNC_CROP_SCALE = 0.4
"""Margin added on each side of the face box for SyncNet's crop, as a fraction of the box size (syncnet_python's
``--crop_scale``)."""
FVD_CLIP_FRAMES = 16
"""Frames per FVD clip (the StyleGAN-V / TATS protocol)."""
FVD_CLIP_STRIDE = 16
"""Frames between the starts of consecutive FVD clips (non-overlapping clips)."""


class VideoReadError(UserError, ValueError):
    """A video file cannot be decoded."""


@dataclass
class Video:
    """A decoded video: ``frames`` (T, H, W, 3) uint8 RGB, ``fps``, and its sound as (S,) float32 mono at 16 kHz
    in [-1, 1] (None when it has no audio track)."""

    path: Path
    frames: np.ndarray
    fps: float
    audio: np.ndarray | None


def read_video(path: str | os.PathLike, with_audio: bool = True) -> Video:
    """Decode all frames of ``path`` (and, with ``with_audio``, its sound track, resampled to 16 kHz mono).

    Raises :class:`VideoReadError` for a missing, damaged or frameless file.
    """
    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path} has no video stream.")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            has_audio = bool(container.streams.audio)
    except (av.error.FFmpegError, OSError, ValueError) as error:
        if isinstance(error, VideoReadError):
            raise
        raise VideoReadError(f"{path} cannot be decoded ({error}); it may be damaged or not a video.") from error
    if not frames:
        raise VideoReadError(f"{path} has no decodable frames; it may be damaged.")
    audio = None
    if with_audio and has_audio:
        try:
            audio = decode_audio(path).mono(SYNC_SAMPLE_RATE).numpy().astype(np.float32)
        except AudioError:
            audio = None
    return Video(path, np.stack(frames), fps, audio)


# ---------------------------------------------------------------- FID


@torch.no_grad()
def inception_features(extractor, frames: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(T, 2048) float32 pool3 features of (T, H, W, 3) uint8 frames (torch-fidelity resizes them to 299)."""
    device = next(extractor.parameters()).device
    out = []
    for start in range(0, len(frames), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(frames[start : start + batch_size])).permute(0, 3, 1, 2)
        (features,) = extractor(batch.to(device))
        out.append(features.cpu())
    return torch.cat(out).numpy()


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two (N, 2048) feature sets, with torch-fidelity's own statistics and distance functions."""
    library = import_runtime("torch_fidelity.metric_fid")
    stats_a = library.fid_features_to_statistics(torch.from_numpy(features_a))
    stats_b = library.fid_features_to_statistics(torch.from_numpy(features_b))
    return float(library.fid_statistics_to_metric(stats_a, stats_b, verbose=False)[library.KEY_METRIC_FID])


# ---------------------------------------------------------------- FVD


def clips(frames: np.ndarray, length: int = FVD_CLIP_FRAMES, stride: int = FVD_CLIP_STRIDE) -> np.ndarray:
    """(N, length, H, W, 3) clips cut from (T, H, W, 3) frames every ``stride`` frames; N is 0 when T < length."""
    starts = range(0, len(frames) - length + 1, stride)
    if not starts:
        return np.zeros((0, length, *frames.shape[1:]), dtype=frames.dtype)
    return np.stack([frames[s : s + length] for s in starts])


@torch.no_grad()
def i3d_features(net, video_clips: np.ndarray, batch_size: int = 4) -> np.ndarray:
    """(N, 400) float32 I3D logits of (N, 16, H, W, 3) uint8 clips, through cd-fvd's preprocessing (bilinear
    resize to 224x224, values to [-1, 1])."""
    preprocess_i3d = import_runtime("cdfvd.third_party.i3d.utils").preprocess_i3d
    device = next(net.parameters()).device
    out = [np.zeros((0, 400), dtype=np.float32)]
    for start in range(0, len(video_clips), batch_size):
        batch = preprocess_i3d(video_clips[start : start + batch_size]).to(device)
        out.append(net(batch).float().cpu().numpy())
    return np.concatenate(out)


def fvd(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FVD between two (N, 400) I3D feature sets, with cd-fvd's feature statistics and Fréchet distance."""
    cdfvd = import_runtime("cdfvd.fvd").cdfvd
    feature_stats = import_runtime("cdfvd.utils.metric_utils").FeatureStats
    stats = []
    for features in (features_a, features_b):
        stat = feature_stats(capture_mean_cov=True)
        stat.append(features.astype(np.float32))
        stats.append(stat)
    # compute_fvd_from_stats uses its instance only for stats it is not given, so no I3D is loaded here.
    return float(cdfvd.compute_fvd_from_stats(None, fake_stats=stats[0], real_stats=stats[1]))


# ---------------------------------------------------------------- faces: CSIM and SyncNet crops


def face_embeddings(analyzer: FaceAnalyzer, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each frame, the largest face's ArcFace embedding (N, 512) and box (N, 4) x1 y1 x2 y2; NaN rows where
    no face is found."""
    embeddings = np.full((len(frames), 512), np.nan, dtype=np.float32)
    boxes = np.full((len(frames), 4), np.nan, dtype=np.float32)
    for i, frame in enumerate(frames):
        face = analyzer.analyze(np.ascontiguousarray(frame))
        if face is not None:
            embeddings[i], boxes[i] = face.embedding, face.bbox
    return embeddings, boxes


def csim(portrait_embedding: np.ndarray, frame_embeddings: np.ndarray) -> float:
    """Mean cosine similarity (-1..1) of the portrait's face embedding to each frame's (frames without a face
    are left out; NaN when none has one)."""
    found = frame_embeddings[~np.isnan(frame_embeddings).any(axis=1)]
    if not len(found):
        return float("nan")
    a = portrait_embedding / np.linalg.norm(portrait_embedding)
    b = found / np.linalg.norm(found, axis=1, keepdims=True)
    return float(np.mean(b @ a))


def resample_frames(frames: np.ndarray, fps: float, target_fps: float = FPS) -> np.ndarray:
    """Frames at ``target_fps`` by taking, for each output time, the frame showing then (as ``ffmpeg -r`` does)."""
    if abs(fps - target_fps) < 1e-3:
        return frames
    count = int(math.floor(len(frames) * target_fps / fps))
    index = np.minimum((np.arange(count) * fps / target_fps + 1e-6).astype(int), len(frames) - 1)
    return frames[index]


def face_crops(frames: np.ndarray, boxes: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """(T, size, size, 3) square crops around each frame's face box (boxes interpolated over frames without one),
    with :data:`SYNC_CROP_SCALE` margin, as SyncNet takes them; raises ValueError when no frame has a face."""
    valid = ~np.isnan(boxes).any(axis=1)
    if not valid.any():
        raise ValueError("no face found in any frame")
    t = np.arange(len(boxes))
    filled = np.stack([np.interp(t, t[valid], boxes[valid, k]) for k in range(4)], axis=1)
    crops = np.empty((len(frames), size, size, 3), dtype=np.uint8)
    for i, (frame, (x1, y1, x2, y2)) in enumerate(zip(frames, filled)):
        half = max(x2 - x1, y2 - y1) / 2 * (1 + 2 * SYNC_CROP_SCALE)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        pad = int(math.ceil(half)) + 1
        padded = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(110, 110, 110))
        x_lo, y_lo = int(round(cx - half)) + pad, int(round(cy - half)) + pad
        side = max(int(round(2 * half)), 1)
        crops[i] = cv2.resize(padded[y_lo : y_lo + side, x_lo : x_lo + side], (size, size))
    return crops


# ---------------------------------------------------------------- SyncNet


def mfcc(audio: np.ndarray) -> np.ndarray:
    """(13, F) MFCCs at 100 Hz of 16 kHz mono audio in [-1, 1], on the int16 scale SyncNet was trained on."""
    return (
        import_runtime("python_speech_features")
        .mfcc(audio.astype(np.float64) * 32768.0, SYNC_SAMPLE_RATE)
        .T.astype(np.float32)
    )


@torch.no_grad()
def lip_embeddings(net: SyncNet, crops: np.ndarray, batch_size: int = 16) -> torch.Tensor:
    """(T - 5, E) lip embeddings of the 5-frame windows starting at frames 0 .. T - 6 of (T, 224, 224, 3) uint8
    face crops at 25 fps (syncnet_python's count, which leaves out the last full window)."""
    device = next(net.parameters()).device
    video = torch.from_numpy(crops[..., ::-1].copy()).float().permute(3, 0, 1, 2)  # BGR, as cv2 gave SyncNet
    count = len(crops) - VIDEO_WINDOW
    out = []
    for start in range(0, count, batch_size):
        batch = torch.stack([video[:, i : i + VIDEO_WINDOW] for i in range(start, min(count, start + batch_size))])
        out.append(net.forward_lip(batch.to(device)).cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)


@torch.no_grad()
def audio_embeddings(net: SyncNet, coefficients: np.ndarray, count: int, batch_size: int = 64) -> torch.Tensor:
    """(count, E) audio embeddings of the MFCC windows aligned with the first ``count`` video windows."""
    device = next(net.parameters()).device
    cc = torch.from_numpy(coefficients)
    out = []
    for start in range(0, count, batch_size):
        windows = [
            cc[:, i * MFCC_PER_FRAME : i * MFCC_PER_FRAME + MFCC_WINDOW]
            for i in range(start, min(count, start + batch_size))
        ]
        out.append(net.forward_audio(torch.stack(windows).unsqueeze(1).to(device)).cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class SyncResult:
    """SyncNet's verdict on one video: ``offset`` in frames at 25 fps (positive: the sound comes that many frames
    before the picture), ``confidence`` (Sync-C: median minus minimum of the mean distance over offsets, higher
    is better) and ``distance`` (Sync-D: that minimum, lower is better)."""

    offset: int
    confidence: float
    distance: float


def sync_scores(lip: torch.Tensor, audio: torch.Tensor, max_offset: int = SYNC_MAX_OFFSET) -> SyncResult:
    """Sync-C, Sync-D and offset from aligned (W, E) lip and audio embeddings, searching ±``max_offset`` frames
    (audio windows beyond the ends count as zeros, as in syncnet_python)."""
    count = min(len(lip), len(audio))
    lip, audio = lip[:count], audio[:count]
    padded = F.pad(audio, (0, 0, max_offset, max_offset))
    shifts = 2 * max_offset + 1
    dists = torch.stack(
        [F.pairwise_distance(lip[i : i + 1].expand(shifts, -1), padded[i : i + shifts]) for i in range(count)]
    )
    mean = dists.mean(dim=0)
    minimum, index = torch.min(mean, dim=0)
    return SyncResult(int(max_offset - index), float(torch.median(mean) - minimum), float(minimum))


def sync_frames_ok(frames: int) -> bool:
    """Whether a video of ``frames`` frames at 25 fps is long enough for SyncNet (one 5-frame window)."""
    return frames > VIDEO_WINDOW


def video_sync_embeddings(net: SyncNet, frames: np.ndarray, boxes: np.ndarray, fps: float) -> torch.Tensor:
    """Lip embeddings (:func:`lip_embeddings`) of (T, H, W, 3) uint8 frames at ``fps`` with their (T, 4) face
    boxes (NaN rows where none was found), resampled to SyncNet's 25 fps; ValueError when shorter than one
    window or without any face."""
    frames, boxes = resample_frames(frames, fps), resample_frames(boxes, fps)
    if not sync_frames_ok(len(frames)):
        raise ValueError("is shorter than SyncNet's 5-frame window")
    return lip_embeddings(net, face_crops(frames, boxes))


def audio_sync_embeddings(net: SyncNet, audio: np.ndarray, windows: int) -> torch.Tensor:
    """Audio embeddings (:func:`audio_embeddings`) of (S,) 16 kHz mono sound for at most ``windows`` video
    windows (fewer when the sound is shorter); ValueError when it covers none."""
    count = min(windows, int(len(audio) // (SYNC_SAMPLE_RATE / FPS)) - VIDEO_WINDOW)
    if count < 1:
        raise ValueError("has less than 0.2 s of sound")
    return audio_embeddings(net, mfcc(audio), count)


# ---------------------------------------------------------------- motion


def motion(frames: np.ndarray, boxes: np.ndarray | None = None, side: int = 128) -> float:
    """Mean optical-flow magnitude between consecutive frames (OpenCV Farnebäck on grey frames scaled to
    ``side`` px wide), as a fraction of the frame width per frame, inside the mean face box when ``boxes``
    has one; 0 for a frozen video."""
    if len(frames) < 2:
        return 0.0
    height, width = frames.shape[1:3]
    scale = side / width
    size = (side, max(int(round(height * scale)), 1))
    grey = [cv2.cvtColor(cv2.resize(f, size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY) for f in frames]
    region = (slice(None), slice(None))
    if boxes is not None and not np.isnan(boxes).all():
        x1, y1, x2, y2 = (np.nanmean(boxes, axis=0) * scale).round().astype(int)
        region = (slice(max(y1, 0), max(y2, y1 + 1)), slice(max(x1, 0), max(x2, x1 + 1)))
    magnitudes = []
    for previous, current in zip(grey[:-1], grey[1:]):
        flow = cv2.calcOpticalFlowFarneback(previous, current, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        magnitudes.append(float(np.linalg.norm(flow[region], axis=-1).mean()))
    return float(np.mean(magnitudes)) / side
