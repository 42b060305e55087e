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
from collections.abc import Callable
from dataclasses import dataclass, field

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


_SAMPLE = 4
"""The band's mean colours are taken on every this-many-th pixel across and down (they change slowly)."""


@dataclass
class _Strip:
    """One side of the band: its rows and columns of the region, the generated pixels' weight and the photo's,
    and, sampled, the weights of the colour means and the photo's weighted colour sum."""

    rows: slice
    columns: slice
    weight: np.ndarray
    rest: np.ndarray
    middle: np.ndarray
    photo_sum: np.ndarray


@dataclass
class PasteBack:
    """The plan of pasting generated frames into a photo; :meth:`paste` applies it to one frame.

    ``photo``: the photo at the output size, (H, W, 3) uint8. ``region``: the crop in output pixels (left, top,
    right, bottom), floats. ``roi``: the whole output pixels it covers (x0, y0, x1, y1). ``rows``, ``columns``:
    the generated pixels' weight down and across ``roi``, (y1 - y0,) and (x1 - x0,) float32 (the mask is their
    outer product). ``frame_size``: the generated frames' (width, height). ``band``: the band's width in output
    pixels.
    """

    photo: np.ndarray
    region: tuple[float, float, float, float]
    roi: tuple[int, int, int, int]
    rows: np.ndarray
    columns: np.ndarray
    frame_size: tuple[int, int]
    band: float
    _strips: list[_Strip] | None = field(default=None, repr=False)
    _inner: tuple[slice, slice] = field(default=(slice(0, 0), slice(0, 0)), repr=False)

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

    def _bands(self) -> list[_Strip]:
        """The band as up to four strips of :attr:`roi` around the inner rectangle, with their weights, made once."""
        if self._strips is None:
            inner_rows, inner_columns = np.flatnonzero(self.rows == 1), np.flatnonzero(self.columns == 1)
            if inner_rows.size and inner_columns.size:
                r0, r1, c0, c1 = (
                    int(inner_rows[0]),
                    int(inner_rows[-1]) + 1,
                    int(inner_columns[0]),
                    int(inner_columns[-1]) + 1,
                )
            else:
                r0 = r1 = c0 = c1 = 0
            self._inner = (slice(r0, r1), slice(c0, c1))
            rows, columns = len(self.rows), len(self.columns)
            places = [(0, r0, 0, columns), (r1, rows, 0, columns), (r0, r1, 0, c0), (r0, r1, c1, columns)]
            x0, y0 = self.roi[:2]
            self._strips = []
            for top, bottom, left, right in places:
                if bottom <= top or right <= left:
                    continue
                rs, cs = slice(top, bottom), slice(left, right)
                weight = np.ascontiguousarray(self.rows[rs, None] * self.columns[None, cs])
                middle = (weight * (1.0 - weight))[::_SAMPLE, ::_SAMPLE]
                picture = self.photo[y0 + top : y0 + bottom, x0 + left : x0 + right][::_SAMPLE, ::_SAMPLE]
                photo_sum = np.tensordot(middle, picture.astype(np.float32), axes=([0, 1], [0, 1]))
                self._strips.append(_Strip(rs, cs, weight, 1.0 - weight, middle, photo_sum))
        return self._strips

    def paste(self, frame: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """One generated frame, (h, w, 3) uint8 of :attr:`frame_size`, pasted into the photo: (H, W, 3) uint8.

        ``out``, an earlier result of this plan, is written over (only the crop's region changes from frame to
        frame); by default a new array is returned.
        """
        if frame.shape != (self.frame_size[1], self.frame_size[0], 3) or frame.dtype != np.uint8:
            expected = (self.frame_size[1], self.frame_size[0], 3)
            raise ValueError(f"Expected a {expected} uint8 frame, got {frame.shape} {frame.dtype}.")
        strips = self._bands()
        if out is None:
            out = self.photo.copy()
        x0, y0, x1, y1 = self.roi
        generated = self.resample(frame)
        target = out[y0:y1, x0:x1]
        target[self._inner] = generated[self._inner]
        if not strips:
            return out
        photo = self.photo[y0:y1, x0:x1]
        shift = _colour_shift(strips, generated)
        for strip in strips:
            gen, pic = generated[strip.rows, strip.columns], photo[strip.rows, strip.columns]
            if shift is None:
                target[strip.rows, strip.columns] = cv2.blendLinear(gen, pic, strip.weight, strip.rest)
            else:
                blend = strip.weight[..., None] * (gen.astype(np.float32) - pic) + pic
                blend += (strip.weight * strip.rest)[..., None] * shift
                target[strip.rows, strip.columns] = np.clip(blend + 0.5, 0, 255).astype(np.uint8)
        return out

    def streaming(self, write: Callable[[np.ndarray], None]) -> Callable[[torch.Tensor], None]:
        """A clip callback for the generator: pastes each frame and hands it to ``write`` as a (1, H, W, 3)
        uint8 array (:meth:`memo.io.video_writer.VideoWriter.write`), so no more than one full-size frame is held. The
        array is the same buffer every time, written over by the next frame: ``write`` must use (encode, copy) it
        before it returns."""

        buffer = self.photo.copy()

        def on_clip(frames: torch.Tensor) -> None:
            pixels = frames.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 3, 0)
            for frame in pixels.cpu().numpy():
                write(self.paste(np.ascontiguousarray(frame), out=buffer)[None])

        return on_clip


def _colour_shift(strips: list[_Strip], generated: np.ndarray) -> np.ndarray | None:
    """The photo's mean colour minus the generated pixels' over the band (weighted towards its middle, sampled
    every :data:`_SAMPLE` pixels), (3,) float32, when any channel differs by more than :data:`COLOUR_STEP`;
    else None."""
    weights = sum(float(strip.middle.sum()) for strip in strips)
    if weights <= 0:
        return None
    total = np.zeros(3, dtype=np.float64)
    for strip in strips:
        gen = generated[strip.rows, strip.columns][::_SAMPLE, ::_SAMPLE].astype(np.float32)
        total += strip.photo_sum - np.tensordot(strip.middle, gen, axes=([0, 1], [0, 1]))
    shift = total / weights
    return shift.astype(np.float32) if np.abs(shift).max() > COLOUR_STEP else None
