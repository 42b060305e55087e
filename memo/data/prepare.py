"""Training features of one talking video, computed by inference's own stages (``scripts/prepare_data.py``).

Per video: the 16 kHz audio track (``memo.io.audio.load_audio``), its vocals (``VocalSeparator``, when
``vocal_separation`` is on), wav2vec2 features with one window per video frame
(``Wav2VecAudioEncoder.for_frames``), the identity embedding of the one face in the first frame
(``FaceAnalyzer``) and per-frame emotion labels (``audio_emotion_labels``). Models are found by
``generator.locate_models``, as inference finds them; the diffusion networks are never loaded.

As in the original release's ``prepare_data.py``, the face is taken from the first frame only, and a video
whose first frame shows no face or several faces is rejected. Unlike it, a video whose frame rate is not
the training ``fps`` is rejected (its features would be at the wrong rate), and the audio is cut or
zero-padded to the video's exact length before the features are computed, so that frame ``i`` meets the
audio at ``i / fps`` rather than a stretched copy of it; an audio track that differs from the video by more
than :data:`MAX_AUDIO_MISMATCH_SECONDS` is rejected as incomplete or out of sync.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from memo.conditions.emotion import audio_emotion_labels
from memo.constants import SAMPLE_RATE
from memo.data import store
from memo.errors import UserError, as_path, check_runtimes
from memo.io.audio import load_audio
from memo.io.video import VideoInfo, check_output_folder, probe_video
from memo.loading import ConditionModels, locate_models, pick_device
from memo.progress import log_above_bars, work_bar
from memo.settings.inference import InferenceConfig

logger = logging.getLogger("memo")

FPS_TOLERANCE = 0.01
MAX_AUDIO_MISMATCH_SECONDS = 0.25
FACE_DETECTION_SIZE = (512, 512)
"""The detector input size the original ``prepare_data.py`` uses (inference uses 640x640)."""


class VideoRejected(Exception):
    """A video that cannot become training data; the message says why."""


@dataclass
class PreparedVideo:
    """What training needs of one video, every tensor on the CPU."""

    fps: float
    num_frames: int
    width: int
    height: int
    audio_emb: torch.Tensor  # (num_frames, 5, layers, dim) float32
    face_emb: torch.Tensor  # (512,) float32
    emotion: torch.Tensor  # (num_frames,) int64
    vocals: torch.Tensor  # (samples,) float32 at 16 kHz, as long as the video

    def files(self) -> dict[str, dict[str, torch.Tensor]]:
        """The tensors of each output file: {file kind: {tensor name: tensor}}."""
        return {
            "audio_emb": {"audio_emb": self.audio_emb},
            "face_emb": {"face_emb": self.face_emb},
            "audio_emotion": {"emotion": self.emotion},
            "vocals": {"vocals": self.vocals},
        }


def check_video(path: str | os.PathLike, fps: float) -> VideoInfo:
    """Frame count, rate and size of ``path`` from its container; rejects a video at another frame rate."""
    info = probe_video(path)
    if info.num_frames < 1:
        raise VideoRejected("the video stream holds no frames")
    if abs(info.fps - fps) > FPS_TOLERANCE:
        raise VideoRejected(
            f"the video runs at {info.fps:g} fps, not the training {fps:g} fps (tolerance {FPS_TOLERANCE}); "
            f"convert it first, e.g. ffmpeg -i IN -r {fps:g} OUT"
        )
    return info


def first_frame(path: str | os.PathLike) -> np.ndarray:
    """The first decodable frame of the video as an RGB uint8 array (H, W, 3)."""
    import av

    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            return frame.to_ndarray(format="rgb24")
    raise VideoRejected("no video frame could be decoded")


def fit_to_frames(waveform: torch.Tensor, num_frames: int, fps: float) -> torch.Tensor:
    """Cut or zero-pad a 16 kHz waveform to the duration of ``num_frames`` frames at ``fps``.

    Rejects audio that differs from the video by more than :data:`MAX_AUDIO_MISMATCH_SECONDS`.
    """
    samples = round(num_frames * SAMPLE_RATE / fps)
    mismatch = (waveform.shape[0] - samples) / SAMPLE_RATE
    if abs(mismatch) > MAX_AUDIO_MISMATCH_SECONDS:
        raise VideoRejected(
            f"the audio lasts {waveform.shape[0] / SAMPLE_RATE:.2f} s but the video {samples / SAMPLE_RATE:.2f} s; "
            "the audio track is incomplete or out of sync"
        )
    if waveform.shape[0] >= samples:
        return waveform[:samples].contiguous()
    return F.pad(waveform, (0, samples - waveform.shape[0]))


class VideoPreparer:
    """Loads the condition models once; calling it on a video returns its :class:`PreparedVideo`."""

    def __init__(self, config: InferenceConfig) -> None:
        self.config = config
        self.device = pick_device(config.runtime.device)
        start = time.perf_counter()
        files = locate_models(config.models, need_emotion2vec=True)
        self.conditions = ConditionModels.load(files, config.models, self.device, face_det_size=FACE_DETECTION_SIZE)
        logger.info("models: loaded on %s in %.1f s", self.device, time.perf_counter() - start)

    def face_embedding(self, path: str | os.PathLike) -> torch.Tensor:
        """The (512,) embedding of the one face in the first frame; several faces or none reject the video."""
        faces = self.conditions.face_analyzer.detect(first_frame(path))
        if len(faces) != 1:
            found = "no face" if not faces else f"{len(faces)} faces"
            raise VideoRejected(f"{found} in the first frame; exactly one face is needed")
        return torch.from_numpy(faces[0].embedding.astype(np.float32))

    @torch.inference_mode()
    def __call__(self, path: str | os.PathLike) -> PreparedVideo:
        """Every training feature of the video at ``path``; raises :class:`VideoRejected` and others on failure."""
        fps = float(self.config.video.fps)
        info = check_video(path, fps)
        face = self.face_embedding(path)
        waveform = fit_to_frames(load_audio(path), info.num_frames, fps)
        separator = self.conditions.separator
        vocals = separator(waveform) if separator is not None else waveform
        features = self.conditions.audio_encoder.for_frames(vocals, info.num_frames)
        emotion = audio_emotion_labels(
            waveform, self.conditions.emotion_encoder, self.conditions.classifier, info.num_frames
        )
        return PreparedVideo(
            fps=info.fps,
            num_frames=info.num_frames,
            width=info.width,
            height=info.height,
            audio_emb=features.windows.float().contiguous(),
            face_emb=face,
            emotion=emotion.long().cpu().contiguous(),
            vocals=vocals.float().cpu().contiguous(),
        )


def describe(prepared: PreparedVideo) -> str:
    """One log line's worth: length, size and feature shape."""
    seconds = prepared.num_frames / prepared.fps
    shape = "x".join(map(str, prepared.audio_emb.shape))
    return f"{prepared.num_frames} frames ({seconds:.1f} s) {prepared.width}x{prepared.height}, audio_emb {shape}"


def attempt(preparer: VideoPreparer, video: Path) -> PreparedVideo | str:
    """The video's :class:`PreparedVideo`, or the reason it cannot be used."""
    try:
        return preparer(video)
    except (VideoRejected, UserError) as error:
        return str(error)
    except Exception as error:  # any failure of one video is recorded and the run goes on
        return f"{type(error).__name__}: {error}"


def prepare_videos(
    config: InferenceConfig,
    input_dir: str | os.PathLike,
    output_dir: Path,
    shard: int | None = None,
    num_shards: int | None = None,
    limit: int | None = None,
) -> tuple[int, int, int]:
    """Prepare the unfinished videos under ``input_dir`` (this shard's, when ``num_shards`` is given) into
    ``output_dir`` (layout in :mod:`memo.data.store`), at most ``limit`` of them; the last shard to finish
    merges the shards' metadata. Returns (prepared, skipped as already prepared, failed).

    Raises :class:`~memo.errors.UserError` for a missing input folder, an unusable output folder or a
    missing optional runtime, before any model loads. A video that cannot be used is logged and listed in
    ``failures.jsonl``; the run goes on.
    """
    input_dir = as_path(input_dir, "--input_dir")
    if not input_dir.is_dir():
        raise UserError(f"The input folder {input_dir} does not exist.")
    check_runtimes(config.models.vocal_separation)
    check_output_folder(output_dir)
    videos = store.find_videos(input_dir)
    ids = store.video_ids(videos, input_dir)
    if num_shards:
        videos = [video for video in videos if store.shard_of(ids[video], num_shards) == shard]
    output = store.PreparedStore(output_dir, store.shard_tag(shard, num_shards))
    output_dir.mkdir(parents=True, exist_ok=True)
    finished = output.open()
    todo = [video for video in videos if ids[video] not in finished]
    if limit is not None:
        todo = todo[:limit]
    skipped = sum(ids[video] in finished for video in videos)
    where = f"shard {shard} of {num_shards} of the videos" if num_shards else "videos"
    logger.info("%s: %d under %s, %d skipped as already prepared", where, len(videos), input_dir, skipped)

    done = failed = 0
    if todo:
        preparer = VideoPreparer(config)
        with log_above_bars(), work_bar(todo, total=len(todo) + skipped, initial=skipped, desc="preparing") as bar:
            for video in bar:
                video_id = ids[video]
                result = attempt(preparer, video)
                if isinstance(result, str):
                    output.fail(video_id, video, result)
                    failed += 1
                    logger.warning("failed %s (%s): %s", video_id, video, result)
                else:
                    entry = store.metadata_entry(
                        video_id, video, result.fps, result.num_frames, result.width, result.height
                    )
                    output.save(entry, result.files())
                    done += 1
                    logger.info("prepared %s: %s", video_id, describe(result))
                bar.set_postfix(done=done, skipped=skipped, failed=failed)

    logger.info(
        "done: %d prepared, %d skipped, %d failed%s -> %s",
        done,
        skipped,
        failed,
        f" (reasons in {output.failures_path})" if failed else "",
        output.metadata_path,
    )
    if num_shards and store.shard_counts(output_dir).get(num_shards) == set(range(num_shards)):
        entries, failures = store.merge(output_dir)
        logger.info("merged the %d shards: %d videos, %d failures", num_shards, entries, failures)
    return done, skipped, failed
