"""Loading the user's picture and framing it into the model's reference frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from memo.conditions.framing import (
    FACE_CENTER_FROM_TOP,
    FACE_HEIGHT_SHARE,
    ImageError,
    crop_box,
    frame_portrait,
    load_image,
    to_model_tensor,
)


def picture_with_square(size=(800, 400), square=(350, 100, 450, 200)) -> Image.Image:
    """White picture with a black square (the "face") at ``square``."""
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).rectangle(square, fill="black")
    return image


def dark_extent(image: Image.Image) -> tuple[int, int, int, int]:
    """Bounding box (x1, y1, x2, y2), exclusive, of the dark pixels."""
    ys, xs = np.nonzero(np.asarray(image.convert("L")) < 128)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("mode", ["crop", "stretch"])
@pytest.mark.parametrize("size", [(512, 512), (448, 640), (768, 512), (64, 64)])
def test_output_size_is_exact(mode, size):
    out = frame_portrait(picture_with_square(), (350, 100, 450, 200), *size, mode=mode)
    assert out.size == size and out.mode == "RGB"


def test_crop_keeps_shapes_undistorted():
    image = picture_with_square()  # 2:1 picture, 100x100 square
    square = (350, 100, 450, 200)
    for width, height in [(512, 512), (512, 768), (768, 512)]:
        out = frame_portrait(image, square, width, height)
        x1, y1, x2, y2 = dark_extent(out)
        assert abs((x2 - x1) / (y2 - y1) - 1.0) < 0.03, (width, height)


def test_stretch_distorts_as_the_original():
    out = frame_portrait(picture_with_square(), None, 512, 512, mode="stretch")
    x1, y1, x2, y2 = dark_extent(out)
    assert abs((x2 - x1) / (y2 - y1) - 0.5) < 0.03  # 800x400 squashed to 512x512 halves the width


def test_face_is_centred_head_and_shoulders():
    face = (500.0, 150.0, 600.0, 270.0)
    left, top, right, bottom = crop_box((1200, 900), face, 512, 512)
    crop_w, crop_h = right - left, bottom - top
    assert crop_w == pytest.approx(crop_h)
    assert (face[3] - face[1]) / crop_h == pytest.approx(FACE_HEIGHT_SHARE)
    assert (face[0] + face[2]) / 2 - left == pytest.approx(crop_w / 2)
    centre_from_top = ((face[1] + face[3]) / 2 - top) / crop_h
    assert centre_from_top == pytest.approx(FACE_CENTER_FROM_TOP)
    assert 0.35 < centre_from_top < 0.5

    out = frame_portrait(picture_with_square((1200, 900), face), face, 512, 512)
    x1, y1, x2, y2 = dark_extent(out)
    assert abs((x1 + x2) / 2 - 256) <= 2
    assert 0.35 <= (y2 - y1) / 512 <= 0.45


def test_crop_stays_inside_the_image_when_the_face_is_near_an_edge():
    for face in [(0, 0, 80, 100), (1120, 800, 1200, 900), (-30, -20, 60, 90), (1150, 10, 1260, 140)]:
        left, top, right, bottom = crop_box((1200, 900), face, 512, 640)
        assert 0 <= left and 0 <= top and right <= 1200 + 1e-6 and bottom <= 900 + 1e-6
        assert (right - left) / (bottom - top) == pytest.approx(512 / 640)
        fx1, fy1, fx2, fy2 = np.clip(face, 0, None)
        assert left <= fx1 and top <= fy1 and right >= min(fx2, 1200) and bottom >= min(fy2, 900)


def test_crop_shrinks_when_the_image_is_too_small():
    face = (450, 40, 550, 240)  # 200 px tall: the ideal crop (500 px) is taller than the 300 px image
    left, top, right, bottom = crop_box((1000, 300), face, 512, 512)
    assert (top, bottom) == pytest.approx((0, 300))
    assert right - left == pytest.approx(300)
    assert left <= 450 and right >= 550


def test_without_a_face_the_crop_is_centred():
    assert crop_box((800, 400), None, 512, 512) == pytest.approx((200, 0, 600, 400))
    assert crop_box((400, 800), None, 512, 256) == pytest.approx((0, 300, 400, 500))
    out = frame_portrait(picture_with_square(), None, 256, 256)
    assert out.size == (256, 256)


@pytest.mark.parametrize("bad", [0, -64, 500, 65, 64.0, True, "512"])
def test_invalid_sizes_are_rejected(bad):
    with pytest.raises(ValueError, match=f"width must be a positive multiple of 64.*{bad!r}"):
        frame_portrait(picture_with_square(), None, bad, 512)
    with pytest.raises(ValueError, match="height"):
        frame_portrait(picture_with_square(), None, 512, bad)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="'squash'"):
        frame_portrait(picture_with_square(), None, 512, 512, mode="squash")


def test_model_tensor_layout_and_range():
    image = Image.new("RGB", (128, 64), "white")
    image.paste((0, 0, 0), (0, 0, 64, 64))
    tensor = to_model_tensor(image)
    assert tensor.shape == (1, 3, 64, 128) and tensor.dtype == torch.float32
    assert tensor[..., :64].eq(-1).all() and tensor[..., 64:].eq(1).all()


def test_load_image_converts_and_applies_exif_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    Image.new("RGB", (200, 100), "red").save(path, exif=exif)
    image = load_image(path)
    assert image.size == (100, 200) and image.mode == "RGB"

    grey = tmp_path / "grey.png"
    Image.new("LA", (80, 90)).save(grey)
    assert load_image(grey).mode == "RGB"


def test_load_image_errors_name_the_file_and_what_to_do(tmp_path):
    with pytest.raises(ImageError, match=r"missing\.png does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    with pytest.raises(ImageError, match=r"corrupt\.jpg cannot be read.*PNG or JPEG"):
        load_image(corrupt)

    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    truncated.write_bytes((tmp_path / "ok.png").read_bytes()[:3000])
    with pytest.raises(ImageError, match=r"truncated\.png cannot be read"):
        load_image(truncated)

    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (120, 40)).save(tiny)
    with pytest.raises(ImageError, match=r"tiny\.png is 120x40 pixels, too small.*at least 64"):
        load_image(tiny)
    assert load_image(tiny, min_side=32).size == (120, 40)
