"""Paste the animated crop back into the photo it was cut from, frame by frame: the video at the photo's own size.

``framing=crop`` cuts a face-centred region of the photo (:func:`memo.conditions.framing.crop_box`) and the
model animates it at the video size. With ``paste_back`` each generated frame is resized back onto that region
of the photo and blended in with a soft mask, so the head moves and the rest of the picture stays as it was:

- The output is the photo's size, scaled down (never up) so that its longer side is at most ``max_output_side``,
  and rounded down to even sides (H.264's yuv420p needs them).
- The mask is 1 inside the region and falls smoothly (smoothstep) to 0 across a band inside the region's border,
  :data:`BAND_SHARE` of its shorter side wide, which hides what the model changes at the crop's edge. A side
  of the region that lies on the photo's own edge has nothing to blend with: the generated pixels are kept to
  that edge.
- When the generated pixels and the photo still differ in colour in the band by a visible step
  (:data:`COLOUR_STEP`, mean levels of 255 per channel), the generated pixels of the band are shifted toward
  the photo's colour, fully at the border and not at all at the band's inner edge: inside the band the
  generated frame is left as it is.

A :class:`PasteBack` is planned once per video (the photo resized, the mask, the resampling) and then pastes one
frame at a time, so a video of any length never needs more than one full-size frame in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

BAND_SHARE = 0.12
"""Width of the feathered band inside the crop's border, as a share of the crop's shorter side in the output."""
MIN_BAND = 2.0
"""The band is at least this many output pixels wide (a smaller crop still gets a soft edge)."""
EDGE_TOLERANCE = 0.5
"""A crop side within this many output pixels of the photo's edge lies on it: no band on that side."""
COLOUR_STEP = 3.0
"""A mean colour difference (levels of 255, any channel) in the band above which the band is colour matched."""


def output_size(photo_size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(width, height) of the pasted-back video for a photo of ``photo_size`` (w, h) pixels.

    The photo's size scaled so that its longer side is at most ``max_side`` (never enlarged), each side rounded
    down to an even number of pixels (at least 2). Raises ValueError for a ``max_side`` below 2.
    """
    if max_side < 2:
        raise ValueError(f"max_side must be at least 2 pixels, got {max_side}.")
    width, height = photo_size
    scale = min(1.0, max_side / max(width, height))
    return max(2, round(width * scale) // 2 * 2), max(2, round(height * scale) // 2 * 2)


def _ramp(start: float, end: float, size: int, band: float, soft_start: bool, soft_end: bool) -> np.ndarray:
    """Weights (size,) float32 of the generated pixels along one axis of the region ``[start, end)`` (output
    pixel edges; pixel ``i`` of the returned array has its centre at ``floor(start) + i + 0.5``): smoothstep from
    0 at a soft side to 1 at ``band`` pixels inside it, 1 towards a side that is not soft."""
    centres = math.floor(start) + np.arange(size, dtype=np.float64) + 0.5
    weight = np.ones(size)
    for soft, distance in ((soft_start, centres - start), (soft_end, end - centres)):
        if soft:
            t = np.clip(distance / band, 0.0, 1.0)
            weight = np.minimum(weight, t * t * (3.0 - 2.0 * t))
    return weight.astype(np.float32)


@dataclass
class PasteBack:
    """The plan of pasting generated frames into a photo; :meth:`paste` applies it to one frame.

    ``photo``: the photo at the output size, (H, W, 3) uint8. ``region``: the crop in output pixels (left, top,
    right, bottom), floats. ``roi``: the whole output pixels it covers (x0, y0, x1, y1). ``weights``: (rows,
    columns) of the generated pixels' weight over ``roi`` (their outer product is the mask). ``frame_size``: the
    generated frames' (width, height). ``band``: the band's width in output pixels.
    """

    photo: np.ndarray
    region: tuple[float, float, float, float]
    roi: tuple[int, int, int, int]
    rows: np.ndarray
    columns: np.ndarray
    frame_size: tuple[int, int]
    band: float

    @classmethod
    def plan(
        cls,
        photo: Image.Image,
        box: tuple[float, float, float, float],
        frame_size: tuple[int, int],
        max_side: int,
    ) -> PasteBack:
        """Plan the paste of ``frame_size`` (w, h) frames made from the region ``box`` (left, top, right, bottom,
        in ``photo``'s pixels, as :func:`memo.conditions.framing.crop_box` gives it) back into ``photo``, at
        :func:`output_size` of it. Raises ValueError for a box outside the photo or of no area."""
        photo = photo.convert("RGB")
        width, height = output_size(photo.size, max_side)
        left, top, right, bottom = (float(v) for v in box)
        if not (0 <= left < right <= photo.width + 1e-6 and 0 <= top < bottom <= photo.height + 1e-6):
            raise ValueError(f"The crop box {box} does not lie inside the {photo.width}x{photo.height} photo.")
        resized = photo if photo.size == (width, height) else photo.resize((width, height), Image.Resampling.LANCZOS)
        sx, sy = width / photo.width, height / photo.height
        region = (left * sx, top * sy, min(right * sx, width), min(bottom * sy, height))
        roi = (
            math.floor(region[0]),
            math.floor(region[1]),
            min(math.ceil(region[2]), width),
            min(math.ceil(region[3]), height),
        )
        band = max(MIN_BAND, BAND_SHARE * min(region[2] - region[0], region[3] - region[1]))
        columns = _ramp(
            region[0], region[2], roi[2] - roi[0], band, region[0] > EDGE_TOLERANCE, region[2] < width - EDGE_TOLERANCE
        )
        rows = _ramp(
            region[1], region[3], roi[3] - roi[1], band, region[1] > EDGE_TOLERANCE, region[3] < height - EDGE_TOLERANCE
        )
        return cls(np.asarray(resized), region, roi, rows, columns, (int(frame_size[0]), int(frame_size[1])), band)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the output frames."""
        return self.photo.shape[1], self.photo.shape[0]

    def resample(self, frame: np.ndarray) -> np.ndarray:
        """A generated (h, w, 3) uint8 frame resized onto :attr:`roi`: (rows, columns, 3) uint8, bilinear at the
        region's exact (sub-pixel) place, after an area-average shrink when the region is smaller than the frame."""
        frame_w, frame_h = self.frame_size
        left, top, right, bottom = self.region
        if right - left < frame_w or bottom - top < frame_h:
            frame = cv2.resize(
                frame, (max(1, round(right - left)), max(1, round(bottom - top))), interpolation=cv2.INTER_AREA
            )
        source_h, source_w = frame.shape[:2]
        sx, sy = source_w / (right - left), source_h / (bottom - top)
        # Output pixel centre u + 0.5 comes from frame coordinate (u + 0.5 - left) * sx - 0.5 (pixel centres).
        x0, y0, x1, y1 = self.roi
        warp = np.array([[sx, 0.0, (x0 + 0.5 - left) * sx - 0.5], [0.0, sy, (y0 + 0.5 - top) * sy - 0.5]])
        return cv2.warpAffine(
            frame,
            warp,
            (x1 - x0, y1 - y0),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )

    def paste(self, frame: np.ndarray) -> np.ndarray:
        """One generated frame, (h, w, 3) uint8 of :attr:`frame_size`, pasted into the photo: (H, W, 3) uint8."""
        if frame.shape != (self.frame_size[1], self.frame_size[0], 3) or frame.dtype != np.uint8:
            raise ValueError(
                f"Expected a ({self.frame_size[1]}, {self.frame_size[0]}, 3) uint8 frame, got {frame.shape} {frame.dtype}."
            )
        out = self.photo.copy()
        x0, y0, x1, y1 = self.roi
        generated = self.resample(frame)
        # The inner rectangle (weight 1 on both axes) is the generated frame as it is; only the band blends.
        inner_rows, inner_columns = np.flatnonzero(self.rows == 1), np.flatnonzero(self.columns == 1)
        if inner_rows.size and inner_columns.size:
            r0, r1, c0, c1 = inner_rows[0], inner_rows[-1] + 1, inner_columns[0], inner_columns[-1] + 1
        else:
            r0 = r1 = c0 = c1 = 0
        strips = [
            (slice(0, r0), slice(None)),
            (slice(r1, None), slice(None)),
            (slice(r0, r1), slice(0, c0)),
            (slice(r0, r1), slice(c1, None)),
        ]
        strips = [(rs, cs) for rs, cs in strips if self.rows[rs].size and self.columns[cs].size]
        target = out[y0:y1, x0:x1]
        target[r0:r1, c0:c1] = generated[r0:r1, c0:c1]
        if not strips:
            return out
        parts = []
        for rs, cs in strips:
            weight = (self.rows[rs, None] * self.columns[None, cs])[..., None]
            parts.append((rs, cs, weight, generated[rs, cs].astype(np.float32), target[rs, cs].astype(np.float32)))
        shift = _colour_shift(parts)
        for rs, cs, weight, gen, pic in parts:
            if shift is not None:
                gen = gen + (1.0 - weight) * shift
            target[rs, cs] = np.clip(pic + weight * (gen - pic) + 0.5, 0, 255).astype(np.uint8)
        return out

    def paste_frames(self, frames: torch.Tensor) -> Iterator[np.ndarray]:
        """Each frame of a clip, a float (3, n, h, w) tensor in [0, 1] as the generator hands it over, pasted:
        (H, W, 3) uint8 arrays, one at a time."""
        pixels = frames.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 3, 0)
        for frame in pixels.cpu().numpy():
            yield self.paste(np.ascontiguousarray(frame))

    def streaming(self, write: Callable[[np.ndarray], None]) -> Callable[[torch.Tensor], None]:
        """A clip callback for the generator: pastes each frame and hands it to ``write`` as a (1, H, W, 3)
        uint8 array (:meth:`memo.io.video.VideoWriter.write`), so no more than one full-size frame is held."""

        def on_clip(frames: torch.Tensor) -> None:
            for pasted in self.paste_frames(frames):
                write(pasted[None])

        return on_clip


def _colour_shift(parts: list) -> np.ndarray | None:
    """The photo's mean colour minus the generated pixels' over the band (weighted towards its middle), (3,)
    float32, when any channel differs by more than :data:`COLOUR_STEP`; else None."""
    total, weights = np.zeros(3, dtype=np.float64), 0.0
    for _rs, _cs, weight, gen, pic in parts:
        middle = weight * (1.0 - weight)
        total += (middle * (pic - gen)).sum(axis=(0, 1))
        weights += float(middle.sum())
    if weights <= 0:
        return None
    shift = total / weights
    return shift.astype(np.float32) if np.abs(shift).max() > COLOUR_STEP else None
