"""From the loaded picture to the reference frame: frame it around the face, make the model tensor.

The original resized any picture to a 512x512 square, squashing faces in non-square photos. The default here
("crop") cuts a head-and-shoulders crop of the target aspect ratio around the face, so the face keeps its
shape; "stretch" is the original's plain resize, for reproducing its outputs.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("memo")

FRAMING_MODES = ("crop", "stretch")
# In a "crop", the face box takes this share of the crop's height, and its centre sits this far down.
FACE_HEIGHT_SHARE = 0.4
FACE_CENTER_FROM_TOP = 0.42
# ... and its width takes at most this share of the crop's width (matters for tall, narrow targets).
FACE_WIDTH_SHARE = 0.7
SIZE_MULTIPLE = 64


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0 or value % SIZE_MULTIPLE:
        raise ValueError(f"{name} must be a positive multiple of {SIZE_MULTIPLE} pixels, got {value!r}.")


def crop_box(
    image_size: tuple[int, int],
    face_bbox: tuple[float, float, float, float] | None,
    width: int,
    height: int,
) -> tuple[float, float, float, float]:
    """The (left, top, right, bottom) region of an image of ``image_size`` (w, h) that "crop" mode resizes.

    It has the aspect ratio ``width / height``; with a face it frames head and shoulders (face centred
    horizontally, a bit above the middle), without one it is the largest centred region. It always lies
    inside the image: when the image is too small for the ideal framing, the region shrinks (aspect kept)
    and shifts, so the face takes a larger share of it or sits off-centre.
    """
    image_w, image_h = float(image_size[0]), float(image_size[1])
    aspect = width / height
    fit = min(image_w / aspect, image_h)  # height of the largest region of this aspect inside the image
    if face_bbox is None:
        crop_h = fit
        crop_w = crop_h * aspect
        left, top = (image_w - crop_w) / 2, (image_h - crop_h) / 2
        return left, top, left + crop_w, top + crop_h

    # The detector's box may reach past the image; frame what is inside it.
    x1, x2 = np.clip([face_bbox[0], face_bbox[2]], 0.0, image_w)
    y1, y2 = np.clip([face_bbox[1], face_bbox[3]], 0.0, image_h)
    face_w, face_h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    crop_h = max(face_h / FACE_HEIGHT_SHARE, face_w / FACE_WIDTH_SHARE / aspect)
    crop_h = min(crop_h, fit)
    crop_w = crop_h * aspect
    center_x, center_y = (x1 + x2) / 2, (y1 + y2) / 2
    left = float(np.clip(center_x - crop_w / 2, 0.0, image_w - crop_w))
    top = float(np.clip(center_y - FACE_CENTER_FROM_TOP * crop_h, 0.0, image_h - crop_h))
    return left, top, left + crop_w, top + crop_h


def frame_portrait(
    image: Image.Image,
    face_bbox: tuple[float, float, float, float] | None,
    width: int,
    height: int,
    mode: str = "crop",
) -> Image.Image:
    """The reference frame: ``image`` as a ``width`` x ``height`` RGB picture.

    ``mode`` "crop" cuts :func:`crop_box` (around ``face_bbox`` (x1, y1, x2, y2) in ``image``'s pixels, or the
    centre when it is None) and resizes it without distortion; "stretch" resizes the whole image to the
    target size as the original did, distorting it when the aspect ratios differ.
    """
    _check_size("width", width)
    _check_size("height", height)
    if mode not in FRAMING_MODES:
        raise ValueError(f"Framing mode must be one of {', '.join(FRAMING_MODES)}; got {mode!r}.")
    image = image.convert("RGB")
    if mode == "stretch":
        return image.resize((width, height), Image.Resampling.LANCZOS)
    box = crop_box(image.size, face_bbox, width, height)
    scale = width / (box[2] - box[0])
    if scale > 2.0:
        logger.warning(
            "The framed region is only %dx%d pixels and is enlarged %.1fx to %dx%d; the video will look soft. "
            "A larger photo, or one where the face is bigger, gives a sharper result.",
            round(box[2] - box[0]),
            round(box[3] - box[1]),
            scale,
            width,
            height,
        )
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box)


def to_model_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1], the layout the reference network and the VAE take."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)
    return tensor / 127.5 - 1.0
