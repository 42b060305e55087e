"""Loading the user's picture as an image viewer shows it: the one image loader of every program.

Transparency on white, 16/32-bit images scaled to 8 bits, CMYK and colour profiles to sRGB, EXIF rotation,
an animation's first frame, huge images read downscaled or refused with a size that works.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from memo.errors import UserError, as_path
from memo.io.inputs import input_problem

logger = logging.getLogger("memo")

MIN_IMAGE_SIDE = 64


class ImageError(UserError, ValueError):
    """The user's image cannot be used: missing, unreadable, too large or too small."""


BACKGROUND = (255, 255, 255)
"""The plain background transparent parts of an image are composited onto (white, as most viewers and
document tools show a cut-out portrait)."""
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_OPEN_LOCK = threading.Lock()


def load_image(path: str | os.PathLike, min_side: int = MIN_IMAGE_SIDE) -> Image.Image:
    """Open ``path`` as the 8-bit sRGB picture a person sees in an image viewer; the loader of every program.

    - turned upright by its EXIF orientation; an unreadable EXIF block is ignored with a warning;
    - transparency (an alpha band, or a palette or colour key marked transparent) composited onto
      :data:`BACKGROUND`;
    - 16-bit images scaled to 8 bits (not clipped); 32-bit integer or float images (no standard white) scaled
      from [0, 1] when that is their range, else stretched from their own minimum to maximum, with a warning;
    - CMYK and ICC-profiled images converted to sRGB (an unusable profile is ignored with a warning);
    - of an animated image, the first frame (with a warning);
    - an image larger than Pillow's limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 megapixels) downscaled by
      a power of two as it is read (JPEG, up to 64 times the limit) or after reading (other formats, up to
      twice the limit), with a warning.

    Returns an RGB image. Raises :class:`ImageError` saying what is wrong: missing, empty, not an image
    format that can be read, damaged pixel data, too large to load (with the size that works), or a side
    shorter than ``min_side`` pixels. The last image loaded is kept, so checking a file and then using it
    decodes it once.
    """
    path = as_path(path, "The image path")
    problem = input_problem(path, "image file")
    if problem is not None:
        raise ImageError(f"The image {path} {problem}.")
    stat = path.stat()
    if stat.st_size == 0:
        raise ImageError(f"The image file {path} is empty (0 bytes); it may not have finished copying.")
    image = _load_cached(path, stat.st_mtime_ns, stat.st_size)
    if min(image.size) < min_side:
        raise ImageError(
            f"The image {path} is {image.width}x{image.height} pixels, too small: its shorter side should be "
            f"at least {min_side} pixels. Use a larger portrait (512 pixels or more looks best)."
        )
    return image.copy()


@functools.lru_cache(maxsize=1)
def _load_cached(path: Path, mtime_ns: int, size: int) -> Image.Image:
    """:func:`_decode`, remembered for the last file (keyed by its modification time and size too)."""
    return _decode(path)


def _decode(path: Path) -> Image.Image:
    try:
        with _OPEN_LOCK:  # Pillow's size limit is lifted while the header is read; the size is checked below
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                opened = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    except (UnidentifiedImageError, SyntaxError) as error:
        if _is_tiff(path):
            return _from_array(path, _read_tiff(path))
        raise ImageError(
            f"The image {path} cannot be read: its contents are not an image format Pillow knows (PNG, JPEG, "
            f"WebP, TIFF, GIF, BMP...). If it is HEIC or RAW, export it as PNG or JPEG; if it already is one, "
            f"the file is damaged ({error})."
        ) from None
    except OSError as error:
        if error.errno is not None:  # from the operating system: permission denied, I/O error...
            raise ImageError(f"The image {path} cannot be opened ({error.strerror or error}).") from None
        raise _damaged(path, error) from None
    with opened:
        if getattr(opened, "n_frames", 1) > 1:
            logger.warning("image: %s is animated (%d frames); its first frame is used.", path.name, opened.n_frames)
            opened.seek(0)
        reduce_by = _shrink_while_reading(opened, path, limit)
        icc = opened.info.get("icc_profile")
        args = opened.tile[0].args if opened.tile else None
        rawmode = str(args[0] if isinstance(args, tuple) else args or opened.mode)  # gone once loaded
        try:
            opened.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise _damaged(path, error) from None
        image = _upright(opened, path)
    colour, alpha = _eight_bit(image, path, rawmode)
    if reduce_by > 1:  # (on the 8-bit bands: Pillow cannot reduce 16-bit ones)
        colour, alpha = colour.reduce(reduce_by), None if alpha is None else alpha.reduce(reduce_by)
    colour = _to_srgb(colour, icc, path)
    if alpha is None:
        return colour
    picture = Image.new("RGB", colour.size, BACKGROUND)
    picture.paste(colour, mask=alpha)
    logger.info("image: %s has transparent parts; they are shown on a white background.", path.name)
    return picture


def _damaged(path: Path, error: Exception) -> ImageError:
    return ImageError(
        f"The image {path} cannot be read: the file is damaged or incomplete ({error}). Save it again as PNG or "
        "JPEG, or use another copy."
    )


def _shrink_while_reading(image: Image.Image, path: Path, limit: int | None) -> int:
    """Keep an image over Pillow's pixel ``limit`` within it: a JPEG is decoded at 1/2, 1/4 or 1/8 of its size
    (``Image.draft``); any other format returns the factor to ``reduce`` it by once read. Raises
    :class:`ImageError` when it is too large for either, saying what size works."""
    width, height = image.size
    pixels = width * height
    if limit is None or pixels <= limit:
        return 1
    factor = 2 ** math.ceil(math.log2(math.sqrt(pixels / limit)) - 1e-9)
    drafts = image.format == "JPEG" and factor <= 8
    if drafts or pixels <= 2 * limit:
        shown = f"{width // factor}x{height // factor}"
        logger.warning(
            "image: %s is %dx%d (%.3g megapixels), over the %.3g megapixels that are loaded; it is read "
            "downscaled to %s.",
            path.name, width, height, pixels / 1e6, limit / 1e6, shown,
        )  # fmt: skip
    if drafts:
        image.draft(image.mode, (math.ceil(width / factor), math.ceil(height / factor)))
        return 1
    if pixels <= 2 * limit:
        return factor
    side = int(math.sqrt(2 * limit * width / height))
    raise ImageError(
        f"The image {path} is {width}x{height} pixels ({pixels / 1e6:.3g} megapixels), too large to load: a "
        f"{image.format or 'non-JPEG'} image can have at most {2 * limit / 1e6:.3g} megapixels (for example "
        f"{side}x{int(side * height / width)}), a JPEG up to {64 * limit / 1e6:.3g}. Scale it down: MEMO renders "
        "at 512 to 768 pixels, so 2048 pixels on the long side is plenty."
    )


def _upright(image: Image.Image, path: Path) -> Image.Image:
    """``image`` turned as its EXIF orientation says; a broken EXIF block is ignored with a warning.

    Pillow raises on some broken blocks (a PNG's) and quietly reads others (a JPEG's) as no tags or a
    ``UserWarning``; all of them are reported the same way.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            upright, problem = ImageOps.exif_transpose(image), None
        except Exception as error:  # Pillow's EXIF parser raises SyntaxError, struct.error, ValueError...
            upright, problem = image.copy(), str(error)
    raw = image.info.get("exif") or b""
    tiff = raw[6:] if raw.startswith(b"Exif\x00\x00") else raw
    if problem is None and caught:
        problem = str(caught[0].message).strip()
    elif problem is None and tiff and tiff[:4] not in (b"II*\x00", b"MM\x00*"):
        problem = "no TIFF header"
    if problem:
        logger.warning(
            "image: %s has an unreadable EXIF block (%s); it is ignored and the picture is used as stored, unrotated.",
            path.name,
            problem,
        )
    return upright


def _eight_bit(image: Image.Image, path: Path, rawmode: str) -> tuple[Image.Image, Image.Image | None]:
    """The colour of ``image`` as an 8-bit "L", "RGB" or "CMYK" image, and its alpha as "L" (None if opaque).

    ``rawmode`` is how the file stores the samples (Pillow's raw mode, e.g. "I;32N" for unsigned 32-bit)."""
    if image.mode.startswith("I;16"):
        levels = np.asarray(image).astype(np.float64) / 257.0
        return Image.fromarray(np.round(levels).astype(np.uint8), "L"), None
    if image.mode in ("I", "F"):
        return _from_array(path, np.asarray(image), rawmode), None
    if image.has_transparency_data:
        image = image.convert("LA" if image.mode in ("1", "L", "LA", "La") else "RGBA")
        return image.convert("L" if image.mode == "LA" else "RGB"), image.getchannel("A")
    if image.mode in ("L", "RGB", "CMYK"):
        return image, None
    return image.convert("L" if image.mode == "1" else "RGB"), None


def _from_array(path: Path, values: np.ndarray, kind: str = "") -> Image.Image:
    """An 8-bit "L" or "RGB" image of (H, W) or (H, W, 3 or 4) samples of more than 8 bits.

    Unsigned 16-bit samples are divided by 257; unsigned 32-bit ones (Pillow's "I;32N" reads them as signed)
    by 2^32-1 / 255; floats in [0, 1] multiplied by 255; anything else stretched from its minimum to its
    maximum, with a warning. A fourth band is taken as alpha and composited onto :data:`BACKGROUND`.
    """
    values = np.asarray(values)
    if kind.startswith("I;32") and "S" not in kind:
        values = values.view(np.uint32)
    alpha = None
    if values.ndim == 3 and values.shape[2] == 4:
        values, alpha = values[..., :3], values[..., 3:]
    if values.ndim == 3 and values.shape[2] != 3 or values.ndim not in (2, 3):
        raise ImageError(f"The image {path} has {values.shape[-1]} colour channels; save it as RGB PNG or JPEG.")
    samples = values.astype(np.float64)
    if values.dtype == np.uint8:
        scale, low = 1.0, 0.0
    elif values.dtype == np.uint16:
        scale, low = 1 / 257, 0.0
    elif values.dtype == np.uint32:
        scale, low = 255 / (2**32 - 1), 0.0
    elif values.dtype.kind == "f" and np.nanmin(samples) >= 0 and np.nanmax(samples) <= 1:
        scale, low = 255.0, 0.0
    else:
        low, high = float(np.nanmin(samples)), float(np.nanmax(samples))
        scale = 255 / (high - low) if high > low else 0.0
        logger.warning(
            "image: %s has %d-bit %s samples from %g to %g and no standard white; they are stretched to 8 bits.",
            path.name, 8 * values.dtype.itemsize, "float" if values.dtype.kind == "f" else "integer", low, high,
        )  # fmt: skip
    pixels = np.clip(np.round(np.nan_to_num((samples - low) * scale)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "L" if pixels.ndim == 2 else "RGB")
    if alpha is None:
        return image
    opacity = _from_array(path, alpha[..., 0]) if alpha.dtype != np.uint8 else Image.fromarray(alpha[..., 0], "L")
    picture = Image.new(image.mode, image.size, BACKGROUND if image.mode == "RGB" else BACKGROUND[0])
    picture.paste(image, mask=opacity)
    return picture


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _read_tiff(path: Path) -> np.ndarray:
    """The first page of a TIFF Pillow cannot decode (32-bit float or integer colour), read with tifffile."""
    import tifffile

    try:
        return tifffile.imread(path, key=0)
    except Exception as error:  # tifffile raises its own classes and ValueError for what it cannot decode
        raise ImageError(f"The image {path} is a TIFF that cannot be read ({error}). Save it as PNG or JPEG.") from None


def _to_srgb(colour: Image.Image, icc: bytes | None, path: Path) -> Image.Image:
    """``colour`` ("L", "RGB" or "CMYK") in sRGB: converted by its ICC profile if it has a usable one."""
    if icc:
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(colour, profile, _SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as error:
            logger.warning(
                "image: %s has an ICC colour profile that cannot be used (%s); its colours are taken as sRGB.",
                path.name,
                error,
            )
    return colour.convert("RGB")
