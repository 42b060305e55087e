"""Score a folder of generated videos against reference videos: pairing, per-video feature cache, report.

Videos pair by file stem (``NAME.mp4`` in both folders). The reference portrait for CSIM is ``NAME.png`` /
``NAME.jpg`` in the reference folder when there is one (``scripts/make_eval_set.py`` writes it), else the
reference video's first frame. Sync metrics use ``AUDIO/NAME.wav`` when an audio folder is given, else the
generated video's own sound track. Each problem is one line; a video that cannot be scored is left out of the
set figures and makes the command exit with status 2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from memo.errors import UserError
from memo.evaluation import metrics as m
from memo.evaluation.models import MetricModels
from memo.io.audio import AudioError, decode_audio
from memo.io.partial import Partial, write_atomically
from memo.io.video import probe_video
from memo.models.syncnet import FPS
from memo.progress import work_bar

logger = logging.getLogger("memo")

METRICS = ("fid", "fvd", "sync", "csim", "motion")
"""What can be asked for; ``sync`` fills ``sync_c``, ``sync_d`` and ``sync_offset``."""
DEFAULT_METRICS = ("fid", "fvd", "sync", "csim")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".m4a", ".ogg")
CACHE_VERSION = "1"


class EvaluationError(UserError, ValueError):
    """The folders or settings given to the evaluation cannot be used at all."""


@dataclass
class Pair:
    """One generated video and what it is scored against."""

    name: str
    generated: Path
    reference: Path
    portrait: Path | None = None
    audio: Path | None = None


def _find(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    for suffix in suffixes:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _sizes(video: Path, reference: Path) -> tuple[str, str] | None:
    """``("WxH", "WxH")`` of a generated video and its reference when they differ (read from the headers),
    None when they match or a header cannot be read (decoding reports that)."""
    try:
        sizes = [probe_video(path) for path in (video, reference)]
    except Exception:  # noqa: BLE001 - an unreadable file is reported where it is decoded
        return None
    shown = [f"{info.width}x{info.height}" for info in sizes]
    return None if shown[0] == shown[1] else (shown[0], shown[1])


def pair_videos(generated: Path, reference: Path, audio: Path | None = None) -> tuple[list[Pair], list[str]]:
    """The pairs of videos to score and one ``error:`` line for each generated video that has no reference
    (or no audio file, when an audio folder is given). Raises EvaluationError for a missing or empty folder."""
    for folder, what in ((generated, "--generated"), (reference, "--reference"), (audio, "--audio")):
        if folder is not None and not folder.is_dir():
            raise EvaluationError(f"{what} {folder} is not a folder; give the folder that holds the files.")
    found = sorted(p for p in generated.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    # Hidden files are not videos of the set: macOS's ._NAME metadata, a killed run's .NAME.<pid>-<hex>.partial.mp4
    hidden = [p for p in found if p.name.startswith(".")]
    videos = [p for p in found if not p.name.startswith(".")]
    if hidden:
        logger.info("skipped %d hidden file(s) in %s: %s", len(hidden), generated, ", ".join(p.name for p in hidden))
    if not videos:
        raise EvaluationError(f"--generated {generated} holds no videos ({', '.join(VIDEO_SUFFIXES)}).")
    pairs, problems = [], []
    for video in videos:
        ref = _find(reference, video.stem, VIDEO_SUFFIXES)
        if ref is None:
            problems.append(f"error: {video.name}: no reference video {video.stem}.* in {reference}; not scored.")
            continue
        sizes = _sizes(video, ref)
        if sizes is not None:
            problems.append(
                f"warning: {video.name} is {sizes[0]} but its reference {ref.name} is {sizes[1]}: scored as they are, "
                "so FID, FVD and CSIM compare different detail; render at the reference's size to compare like "
                "with like."
            )
        pair = Pair(video.stem, video, ref, _find(reference, video.stem, IMAGE_SUFFIXES))
        if audio is not None:
            pair.audio = _find(audio, video.stem, AUDIO_SUFFIXES)
            if pair.audio is None:
                problems.append(f"error: {video.name}: no audio {video.stem}.* in {audio} for Sync; Sync not scored.")
        pairs.append(pair)
    return pairs, problems


class FeatureCache:
    """Features of one video file under one network, stored as ``.npz`` in ``folder`` and keyed by the file's
    path, size and modification time and the network's fingerprint: a changed file or network is recomputed."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.computed = 0
        self.reused = 0

    def get(self, path: Path, kind: str, fingerprint: str, compute: Callable[[], dict[str, np.ndarray]]):
        """``compute()``'s arrays for (``path``, ``kind``), from the cache when they are there."""
        file = None
        if self.folder is not None:
            stat = path.stat()
            key = f"{CACHE_VERSION}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{kind}|{fingerprint}"
            file = self.folder / f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:20]}.npz"
            if file.is_file():
                with np.load(file) as stored:
                    self.reused += 1
                    return {name: stored[name] for name in stored.files}
        arrays = compute()
        self.computed += 1
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            with Partial(file, suffix=".npz") as partial:
                np.savez(partial.path, **arrays)
                partial.publish()
        return arrays


@dataclass
class _Decoded:
    """Decodes a file at most once, when a feature that is not cached needs its frames."""

    path: Path
    _video: m.Video | None = None

    def get(self) -> m.Video:
        if self._video is None:
            self._video = m.read_video(self.path)
        return self._video


@dataclass
class Evaluation:
    """What :func:`evaluate` found: per-video and set figures, problem lines, cache use."""

    videos: dict[str, dict[str, Any]] = field(default_factory=dict)
    set: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    unscored: int = 0
    """Videos with at least one asked-for figure missing."""

    def as_json(self) -> dict[str, Any]:
        return {"set": self.set, "videos": self.videos, "problems": self.problems, "protocol": PROTOCOL}


PROTOCOL = {
    "fid": "torch-fidelity Inception-v3 pool3 (2048-d) on every frame, frames resized by torch-fidelity to 299x299",
    "fvd": f"cd-fvd I3D logits (400-d) on {m.FVD_CLIP_FRAMES}-frame clips every {m.FVD_CLIP_STRIDE} frames, "
    "resized bilinearly to 224x224",
    "sync": f"SyncNet v2 on 224x224 face crops at {FPS} fps, offsets searched within +-{m.SYNC_MAX_OFFSET} frames",
    "csim": "mean cosine similarity of ArcFace (glintr100) embeddings: reference portrait vs each generated frame",
    "motion": "mean Farneback optical-flow magnitude in the face box, fraction of the frame width per frame",
}


def _clean(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def evaluate(
    pairs: list[Pair],
    metrics: tuple[str, ...],
    models: MetricModels,
    cache: FeatureCache,
    progress: bool = True,
) -> Evaluation:
    """Score every pair for ``metrics`` (names of :data:`METRICS`); a problem with one video is one line in
    ``problems`` and the others are still scored. Model files that are missing raise MissingModelError before
    any video is read."""
    for name, network in (("fid", "inception"), ("fvd", "i3d"), ("sync", "syncnet")):
        if name in metrics:
            models.path(network)
    fingerprints = {
        net: models.fingerprint(net)
        for metric, net in (("fid", "inception"), ("fvd", "i3d"), ("sync", "syncnet"))
        if metric in metrics
    }
    if "csim" in metrics or "sync" in metrics or "motion" in metrics:
        fingerprints["face"] = models.fingerprint("face")
    result = Evaluation()
    pooled: dict[str, list[np.ndarray]] = {"gen_fid": [], "ref_fid": [], "gen_fvd": [], "ref_fvd": []}
    for pair in work_bar(pairs, total=len(pairs), desc="evaluate", disable=not progress):
        scores, failed = _score_pair(pair, metrics, models, cache, fingerprints, pooled, result.problems)
        result.videos[pair.name] = scores
        result.unscored += failed
    set_figures: dict[str, Any] = {"videos": len(result.videos)}
    if "fid" in metrics and pooled["gen_fid"]:
        set_figures["fid"] = _clean(m.fid(np.concatenate(pooled["gen_fid"]), np.concatenate(pooled["ref_fid"])))
    if "fvd" in metrics and pooled["gen_fvd"]:
        set_figures["fvd"] = _clean(m.fvd(np.concatenate(pooled["gen_fvd"]), np.concatenate(pooled["ref_fvd"])))
    for key in ("sync_c", "sync_d", "sync_offset", "csim", "motion"):
        values = [v[key] for v in result.videos.values() if v.get(key) is not None]
        if values:
            set_figures[key] = _clean(float(np.mean(values)))
    result.set = set_figures
    logger.info("features: %d computed, %d from the cache", cache.computed, cache.reused)
    return result


def _score_pair(pair, metrics, models, cache, fingerprints, pooled, problems) -> tuple[dict[str, Any], int]:
    gen, ref = _Decoded(pair.generated), _Decoded(pair.reference)
    scores: dict[str, Any] = {}
    failed = 0

    def problem(text: str) -> None:
        nonlocal failed
        failed = 1
        problems.append(f"error: {pair.generated.name}: {text}")

    try:
        shape = {
            k: cache.get(p, "shape", "", lambda d=d: _shape(d.get()))
            for k, p, d in (("g", pair.generated, gen), ("r", pair.reference, ref))
        }
    except m.VideoReadError as error:
        problem(f"{error} Not scored.")
        return scores, failed
    gen_fps, ref_fps = float(shape["g"]["fps"]), float(shape["r"]["fps"])
    if abs(gen_fps - ref_fps) > 1e-3:
        problem(
            f"frame rate {gen_fps:g} fps differs from the reference's {ref_fps:g} fps; "
            "render at the reference's rate. Not scored."
        )
        return scores, failed
    if int(shape["g"]["frames"]) != int(shape["r"]["frames"]):
        problems.append(
            f"warning: {pair.generated.name}: {int(shape['g']['frames'])} frames, the reference "
            f"{int(shape['r']['frames'])}; scored on all frames of each."
        )
    scores["frames"] = int(shape["g"]["frames"])
    if "fid" in metrics:
        fp = fingerprints["inception"]
        a = cache.get(
            pair.generated, "inception", fp, lambda: {"f": m.inception_features(models.inception(), gen.get().frames)}
        )["f"]
        b = cache.get(
            pair.reference, "inception", fp, lambda: {"f": m.inception_features(models.inception(), ref.get().frames)}
        )["f"]
        scores["fid"] = _clean(m.fid(a, b))
        pooled["gen_fid"].append(a)
        pooled["ref_fid"].append(b)
    if "fvd" in metrics:
        fp = fingerprints["i3d"]
        a = cache.get(
            pair.generated, "i3d", fp, lambda: {"f": m.i3d_features(models.i3d(), m.clips(gen.get().frames))}
        )["f"]
        b = cache.get(
            pair.reference, "i3d", fp, lambda: {"f": m.i3d_features(models.i3d(), m.clips(ref.get().frames))}
        )["f"]
        if len(a) and len(b):
            scores["fvd"] = _clean(m.fvd(a, b))
            pooled["gen_fvd"].append(a)
            pooled["ref_fvd"].append(b)
        else:
            problem(f"shorter than one {m.FVD_CLIP_FRAMES}-frame FVD clip; FVD not scored.")
    faces = None
    if {"csim", "sync", "motion"} & set(metrics):
        faces = cache.get(pair.generated, "faces", fingerprints["face"], lambda: _faces(models, gen.get().frames))
        if np.isnan(faces["boxes"]).all():
            faces = None
            problem("no face found in any frame; CSIM, Sync and motion not scored.")
    if "csim" in metrics and faces is not None:
        portrait = _portrait_embedding(pair, models, cache, fingerprints["face"], ref)
        if portrait is None:
            problem(
                f"no face found in the reference portrait {(pair.portrait or pair.reference).name}; CSIM not scored."
            )
        else:
            scores["csim"] = _clean(m.csim(portrait, faces["embeddings"]))
    if "sync" in metrics and faces is not None:
        try:
            scores.update(_sync(pair, models, cache, fingerprints["syncnet"], gen, faces, shape["g"]))
        except (AudioError, ValueError) as error:
            problem(f"{error}; Sync not scored.")
    if "motion" in metrics and faces is not None:
        scores["motion"] = _clean(
            float(
                cache.get(
                    pair.generated,
                    "motion",
                    fingerprints["face"],
                    lambda: {"v": np.array(m.motion(gen.get().frames, faces["boxes"]))},
                )["v"]
            )
        )
    return scores, failed


def _shape(video: m.Video) -> dict[str, np.ndarray]:
    return {
        "fps": np.array(video.fps),
        "frames": np.array(len(video.frames)),
        "audio": np.array(video.audio is not None),
    }


def _faces(models: MetricModels, frames: np.ndarray) -> dict[str, np.ndarray]:
    embeddings, boxes = m.face_embeddings(models.faces(), frames)
    return {"embeddings": embeddings, "boxes": boxes}


def _portrait_embedding(pair, models, cache, fingerprint, ref) -> np.ndarray | None:
    if pair.portrait is not None:

        def compute():
            image = np.asarray(Image.open(pair.portrait).convert("RGB"))
            return _faces(models, image[None])

        stored = cache.get(pair.portrait, "portrait", fingerprint, compute)
    else:
        stored = cache.get(pair.reference, "portrait", fingerprint, lambda: _faces(models, ref.get().frames[:1]))
    embedding = stored["embeddings"][0]
    return None if np.isnan(embedding).any() else embedding


def _sync(pair, models, cache, fingerprint, gen, faces, shape) -> dict[str, Any]:
    if pair.audio is None and not bool(shape["audio"]):
        raise ValueError("has no sound track (give --audio with NAME.wav files)")
    fps = float(shape["fps"])

    def lips():
        video = gen.get()
        return {"e": m.video_sync_embeddings(models.syncnet(), video.frames, faces["boxes"], fps).numpy()}

    lip = cache.get(pair.generated, "syncnet-lip", fingerprint, lips)["e"]
    source = pair.audio or pair.generated

    def sound():
        if pair.audio is not None:
            audio = decode_audio(pair.audio).mono(m.SYNC_SAMPLE_RATE).numpy()
        else:
            audio = gen.get().audio
            if audio is None:
                raise ValueError("has no decodable sound track")
        return {"e": m.audio_sync_embeddings(models.syncnet(), audio, len(lip)).numpy()}

    audio = cache.get(source, "syncnet-audio", fingerprint, sound)["e"]
    result = m.sync_scores(torch.from_numpy(lip), torch.from_numpy(audio))
    return {"sync_c": _clean(result.confidence), "sync_d": _clean(result.distance), "sync_offset": result.offset}


def score_frames(
    frames: np.ndarray,
    target: np.ndarray,
    models: MetricModels,
    fps: float,
    audio: np.ndarray | None = None,
) -> dict[str, float]:
    """The figures of :func:`evaluate` for frames held in memory (``scripts/measure_fidelity.py``): ``fid``,
    ``fvd`` (when both have a 16-frame clip), ``csim`` against ``target``'s first frame as the portrait,
    ``motion``, and with ``audio`` ((S,) 16 kHz mono, the sound the frames should speak) ``sync_c``, ``sync_d``,
    ``sync_offset``. ``frames`` and ``target`` are (T, H, W, 3) uint8 at ``fps``; a figure that cannot be
    computed (no face found, too short) is left out."""
    out: dict[str, float] = {
        "fid": m.fid(m.inception_features(models.inception(), frames), m.inception_features(models.inception(), target))
    }
    clips_a, clips_b = m.clips(frames), m.clips(target)
    if len(clips_a) and len(clips_b):
        out["fvd"] = m.fvd(m.i3d_features(models.i3d(), clips_a), m.i3d_features(models.i3d(), clips_b))
    embeddings, boxes = m.face_embeddings(models.faces(), frames)
    (portrait,), _ = m.face_embeddings(models.faces(), target[:1])
    if not np.isnan(portrait).any():
        value = m.csim(portrait, embeddings)
        if math.isfinite(value):
            out["csim"] = value
    out["motion"] = m.motion(frames, boxes)
    if audio is not None and not np.isnan(boxes).all():
        try:
            lip = m.video_sync_embeddings(models.syncnet(), frames, boxes, fps)
            result = m.sync_scores(lip, m.audio_sync_embeddings(models.syncnet(), audio, len(lip)))
        except ValueError:
            return out
        out.update(sync_c=result.confidence, sync_d=result.distance, sync_offset=result.offset)
    return out


def markdown(evaluation: Evaluation) -> str:
    """A Markdown table: one row per video and one for the set, a column per figure present."""
    columns = [
        c
        for c in ("fid", "fvd", "sync_c", "sync_d", "sync_offset", "csim", "motion")
        if c in evaluation.set or any(c in v for v in evaluation.videos.values())
    ]

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value) if isinstance(value, int) else f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    def row(cells: list[str]) -> str:  # every row has exactly 1 + len(columns) cells, whatever is missing
        return "| " + " | ".join(cells) + " |"

    lines = [row(["video", *columns]), row(["---"] * (len(columns) + 1))]
    for name, scores in evaluation.videos.items():
        lines.append(row([cell(name), *(cell(scores.get(c)) for c in columns)]))
    lines.append(row([f"**set** ({evaluation.set.get('videos', 0)})", *(cell(evaluation.set.get(c)) for c in columns)]))
    return "\n".join(lines)


def write_report(evaluation: Evaluation, path: Path) -> None:
    """Write the JSON report to ``path`` and the Markdown table beside it (``.md``), each atomically."""
    for target, text in (
        (path, json.dumps(evaluation.as_json(), indent=2) + "\n"),
        (path.with_suffix(".md"), markdown(evaluation) + "\n"),
    ):
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, text)  # the user's umask decides the mode, as for any file they write
