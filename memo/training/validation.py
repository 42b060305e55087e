"""Validation during training: render a short video with the networks being trained and save it as mp4.

The conditions come from one prepared video (``validation.video_id``, else the first listed): its face
embedding, audio windows and emotion labels, and as reference image its first frame or the image file
``validation.reference_image`` (which should show the same person, since the face embedding is the video's).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file
from torch import nn

from memo.data.dataset import resize_and_crop
from memo.io.video_writer import VideoWriter
from memo.settings.training import DataSettings, ValidationSettings

if TYPE_CHECKING:
    from memo.training.run import TrainingRun

logger = get_logger(__name__, log_level="INFO")


def _reference_image(entry: dict, image_path: str | None, height: int, width: int) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]: the image file, else the video's first frame."""
    if image_path:
        from memo.io.image import load_image

        frame = torch.from_numpy(np.asarray(load_image(image_path)).copy())[None]
    else:
        import decord

        frame = torch.from_numpy(decord.VideoReader(entry["video"], num_threads=1).get_batch([0]).asnumpy())
    return resize_and_crop(frame, height, width)


@torch.no_grad()
def render_validation(
    networks: Mapping[str, nn.Module],
    vae: AutoencoderKL,
    entry: dict,
    output_path: str | Path,
    data: DataSettings,
    settings: ValidationSettings,
) -> Path:
    """Render ``validation.num_frames`` (rounded down to whole clips, at least one) of ``entry`` at the
    ``data`` section's size and clip length, and save them as an mp4 (replacing one of an earlier run)."""
    frames_per_clip = data.num_generated_frames_per_clip
    from memo.pipeline import MemoPipeline

    audio = load_file(entry["audio_emb"])["audio_emb"]
    emotion = load_file(entry["audio_emotion"])["emotion"]
    face = load_file(entry["face_emb"])["face_emb"].reshape(1, -1)
    available = min(audio.shape[0], emotion.shape[0], settings.num_frames)
    frames = max(frames_per_clip, available // frames_per_clip * frames_per_clip)
    if audio.shape[0] < frames:
        raise ValueError(f"The validation video {entry.get('id')} has {audio.shape[0]} frames, fewer than one clip.")

    modes = {name: network.training for name, network in networks.items()}
    pipeline = MemoPipeline(vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(), **networks)
    pipeline.set_progress_bar_config(disable=True)
    try:
        for network in networks.values():
            network.eval()
        video = pipeline(
            _reference_image(entry, settings.reference_image, data.height, data.width),
            face,
            audio[:frames],
            emotion[:frames],
            frames_per_clip=frames_per_clip,
            past_frames=data.num_past_frames,
            num_inference_steps=settings.inference_steps,
            guidance_scale=settings.cfg_scale,
            seed=settings.seed,
        ).frames
    finally:
        for name, network in networks.items():
            network.train(modes[name])
    with VideoWriter(output_path, float(entry.get("fps") or 30.0), data.width, data.height, overwrite=True) as writer:
        writer.write(video)
    return writer.path


def validate(run: TrainingRun, step: int) -> None:
    """Render the preview video ``<output_dir>/validation/step-<step>.mp4`` of ``validation.video_id`` (the
    first video without one) on the main process. A failed preview is logged, never ends the run."""
    accelerator, settings = run.accelerator, run.config.validation
    if accelerator.is_main_process:
        entries = run.dataset.entries
        wanted = settings.video_id
        entry = next((e for e in entries if e.get("id") == wanted), None) if wanted else entries[0]
        if entry is None:
            logger.warning(f"validation.video_id={wanted!r} is not in the data; skipping validation")
        else:
            try:
                path = render_validation(
                    accelerator.unwrap_model(run.model).networks(),
                    run.vae,
                    entry,
                    run.output_dir / "validation" / f"step-{step}.mp4",
                    run.config.data,
                    settings,
                )
                run.record({"event": "validation", "step": step, "video": str(path)})
                logger.info(f"Validation video: {path}")
            except Exception as err:  # noqa: BLE001 - a failed preview must not end a long run
                logger.error(f"Validation at step {step} failed: {type(err).__name__}: {err}")
    accelerator.wait_for_everyone()
