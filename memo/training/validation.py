"""Validation during training: render a short video with the networks being trained and save it as mp4.

The conditions come from one prepared video (``validation.video_id``, else the first listed): its face
embedding, audio windows and emotion labels, and as reference image its first frame or the image file
``validation.reference_image`` (which should show the same person, since the face embedding is the video's).
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file
from torch import nn

from memo.data.dataset import resize_and_crop


def write_mp4(path: str | Path, frames: torch.Tensor, fps: float) -> Path:
    """Write (3, N, H, W) frames in [0, 1] as an H.264 mp4 (yuv420p; H and W must be even)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = pixels.shape[2], pixels.shape[1]
        stream.pix_fmt = "yuv420p"
        for image in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        container.mux(stream.encode())
    return path


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
    *,
    width: int,
    height: int,
    frames_per_clip: int,
    past_frames: int,
    num_frames: int = 32,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.5,
    seed: int = 42,
    reference_image: str | None = None,
) -> Path:
    """Render ``num_frames`` (rounded down to whole clips, at least one) of ``entry`` and save them as mp4."""
    from memo.pipeline import MemoPipeline

    audio = load_file(entry["audio_emb"])["audio_emb"]
    emotion = load_file(entry["audio_emotion"])["emotion"]
    face = load_file(entry["face_emb"])["face_emb"].reshape(1, -1)
    available = min(audio.shape[0], emotion.shape[0], num_frames)
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
            _reference_image(entry, reference_image, height, width),
            face,
            audio[:frames],
            emotion[:frames],
            frames_per_clip=frames_per_clip,
            past_frames=past_frames,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
        ).frames
    finally:
        for name, network in networks.items():
            network.train(modes[name])
    return write_mp4(output_path, video, float(entry.get("fps") or 30.0))
