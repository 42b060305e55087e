"""Loading the user's picture and framing it into the model's reference frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from memo.conditions.framing import FACE_CENTER_FROM_TOP, FACE_HEIGHT_SHARE, crop_box, frame_portrait, to_model_tensor
from memo.io.image import ImageError, load_image


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


# -- images as a person sees them -------------------------------------------------------------------

FIELD = __import__("conftest").REPO.parent / "shared" / "field"


def portrait_pixels(width: int = 96, height: int = 128) -> np.ndarray:
    """(H, W, 3) uint8: smooth colour ramps, so any clipping, lost channel or hidden colour shows."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([40 + x * 180 // width, 30 + y * 200 // height, 120 + (x + y) % 60], axis=-1).astype(np.uint8)


def field_image(name: str):
    path = FIELD / name
    if not path.is_file():
        pytest.skip(f"field case {path} not found")
    return path


def test_field_cut_out_shows_no_hidden_magenta():
    path = field_image("i11_rgba_transparent.png")
    stored = np.asarray(Image.open(path))
    loaded = np.asarray(load_image(path))
    clear = stored[..., 3] == 0
    assert clear.mean() > 0.3  # the field file: a third of it transparent, over magenta
    assert (loaded[clear] == 255).all()  # the plain background, not the hidden colour
    opaque = stored[..., 3] == 255
    np.testing.assert_array_equal(loaded[opaque], stored[..., :3][opaque])
    assert not (np.abs(loaded.astype(int) - [255, 0, 255]).sum(-1) < 60).any()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "RGB_colour_key", "PA_gif"])
def test_transparency_is_composited_onto_white(tmp_path, mode):
    rgb = portrait_pixels()
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[16:112, 16:80] = 255
    alpha[16:112, 40:48] = 128  # a half-transparent strip
    hidden = np.where(alpha[..., None] == 0, [255, 0, 255], rgb).astype(np.uint8)
    path = tmp_path / f"cut_out_{mode}.png"
    if mode == "RGBA":
        Image.fromarray(np.dstack([hidden, alpha]), "RGBA").save(path)
        expected = hidden * (alpha[..., None] / 255) + 255 * (1 - alpha[..., None] / 255)
    elif mode == "LA":
        grey = hidden[..., 1]
        Image.fromarray(np.dstack([grey, alpha]), "LA").save(path)
        expected = np.repeat((grey * (alpha / 255) + 255 * (1 - alpha / 255))[..., None], 3, axis=2)
    else:  # palette or colour-key transparency: on or off, no half-transparent strip
        alpha[16:112, 40:48] = 255
        hidden = np.where(alpha[..., None] == 0, [255, 0, 255], rgb // 64 * 64).astype(np.uint8)
        expected = np.where(alpha[..., None] == 0, 255, hidden)
        image = Image.fromarray(hidden)
        if mode == "RGB_colour_key":
            image.save(path, transparency=(255, 0, 255))
        else:
            palette = image.quantize(colors=64, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
            key = palette.getpixel((0, 0))  # magenta's index
            if mode == "PA_gif":
                path = path.with_suffix(".gif")
            palette.save(path, transparency=key)
            expected = np.where(alpha[..., None] == 0, 255, np.asarray(palette.convert("RGB")))
    loaded = np.asarray(load_image(path)).astype(int)
    assert np.abs(loaded - expected).max() <= 1
    assert not (np.abs(loaded - [255, 0, 255]).sum(-1) < 60).any()


def test_field_16_bit_greyscale_is_scaled_not_clipped():
    path = field_image("i14_grey16.png")
    stored = np.asarray(Image.open(path)).astype(np.float64)
    loaded = np.asarray(load_image(path))
    np.testing.assert_allclose(loaded[..., 0], stored / 257, atol=0.51)
    assert (loaded == 255).all(-1).mean() < 0.05  # 91 % of it was pure white when the values were clipped


def write_png16(path, values: np.ndarray) -> None:
    import cv2

    order = {2: [], 3: [2, 1, 0], 4: [2, 1, 0, 3]}[values.ndim if values.ndim == 2 else values.shape[2]]
    cv2.imwrite(str(path), values[..., order] if order else values)  # OpenCV writes BGR(A)


@pytest.mark.parametrize("kind", ["grey16_png", "rgb16_png", "rgba16_png", "grey16_tif", "rgb16_tif"])
def test_16_bit_images_are_scaled_to_8_bits(tmp_path, kind):
    tifffile = pytest.importorskip("tifffile")
    eight = portrait_pixels()
    sixteen = eight.astype(np.uint16) * 257 + 100  # the 8-bit picture, in 16 bits, plus fine detail
    if kind.startswith("grey"):
        sixteen, eight = sixteen[..., 1], eight[..., 1]
    path = tmp_path / f"{kind}.{kind.rsplit('_', 1)[1]}"
    if kind == "rgba16_png":
        write_png16(path, np.dstack([sixteen, np.full(sixteen.shape[:2], 65535, np.uint16)]))
    elif path.suffix == ".png":
        write_png16(path, sixteen)
    else:
        tifffile.imwrite(path, sixteen, photometric="minisblack" if sixteen.ndim == 2 else "rgb")
    loaded = np.asarray(load_image(path)).astype(int)
    expected = eight if eight.ndim == 3 else np.repeat(eight[..., None], 3, axis=2)
    assert np.abs(loaded - expected).max() <= 1


@pytest.mark.parametrize("kind", ["float_grey", "float_rgb", "uint32_grey", "float_wide"])
def test_32_bit_tiffs_are_scaled_to_8_bits(tmp_path, kind, caplog):
    tifffile = pytest.importorskip("tifffile")
    eight = portrait_pixels()
    if kind == "float_grey":
        values, expected = eight[..., 1].astype(np.float32) / 255, eight[..., 1]
    elif kind == "float_rgb":  # a kind Pillow cannot open at all
        values, expected = eight.astype(np.float32) / 255, eight
    elif kind == "uint32_grey":
        values, expected = eight[..., 1].astype(np.uint32) * 16843009, eight[..., 1]  # 255 * 16843009 = 2^32 - 1
    else:  # floats without a standard white: stretched over their range, with a warning
        values = eight[..., 1].astype(np.float32) * 40.0 - 3000.0
        low, high = values.min(), values.max()
        expected = np.round((values - low) * 255 / (high - low)).astype(np.uint8)
    path = tmp_path / f"{kind}.tif"
    tifffile.imwrite(path, values, photometric="rgb" if values.ndim == 3 else "minisblack")
    with caplog.at_level("WARNING", logger="memo"):
        loaded = np.asarray(load_image(path)).astype(int)
    expected = expected if expected.ndim == 3 else np.repeat(expected[..., None], 3, axis=2)
    assert np.abs(loaded - expected).max() <= 1
    assert ("stretched to 8 bits" in caplog.text) == (kind == "float_wide")


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    rgb = portrait_pixels()
    path = tmp_path / "print.jpg"
    Image.fromarray(rgb).convert("CMYK").save(path, quality=98)
    assert Image.open(path).mode == "CMYK"
    loaded = np.asarray(load_image(path)).astype(int)
    assert np.abs(loaded - rgb).mean() < 3 and np.abs(loaded - rgb).max() < 40


def _s15(value: float) -> bytes:
    return round(value * 65536).to_bytes(4, "big", signed=True)


def matrix_icc_profile(red, green, blue, gamma: float = 2.2) -> bytes:
    """A minimal ICC v2 RGB display profile: three colorants (XYZ, D50) and a gamma curve per channel."""

    def xyz(values):
        return b"XYZ " + bytes(4) + b"".join(_s15(v) for v in values)

    curve = b"curv" + bytes(4) + (1).to_bytes(4, "big") + round(gamma * 256).to_bytes(2, "big") + bytes(2)
    name = b"test profile\x00"
    desc = b"desc" + bytes(4) + len(name).to_bytes(4, "big") + name + bytes(8) + bytes(3) + bytes(67)
    white = (0.9642, 1.0, 0.8249)
    tags = [(b"desc", desc), (b"wtpt", xyz(white)), (b"rXYZ", xyz(red)), (b"gXYZ", xyz(green)), (b"bXYZ", xyz(blue))]
    tags += [(b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve), (b"cprt", b"text" + bytes(4) + b"none\x00")]
    offset, entries, data = 128 + 4 + 12 * len(tags), b"", b""
    for signature, body in tags:
        entries += signature + (offset + len(data)).to_bytes(4, "big") + len(body).to_bytes(4, "big")
        data += body + bytes(-len(body) % 4)
    size = offset + len(data)
    header = size.to_bytes(4, "big") + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntr" + b"RGB " + b"XYZ " + bytes(12)
    header += b"acsp" + bytes(4 * 4 + 8 + 4) + b"".join(_s15(v) for v in white) + bytes(4 + 16 + 28)
    assert len(header) == 128
    return header + len(tags).to_bytes(4, "big") + entries + data


SRGB_D50 = {"red": (0.4361, 0.2225, 0.0139), "green": (0.3851, 0.7169, 0.0971), "blue": (0.1431, 0.0606, 0.7141)}


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_icc_profiled_image_is_converted_to_srgb(tmp_path, suffix, caplog):
    # A profile whose first channel is sRGB's green and second sRGB's red: stored red is seen as green.
    swapped = matrix_icc_profile(SRGB_D50["green"], SRGB_D50["red"], SRGB_D50["blue"])
    stored = np.zeros((96, 96, 3), np.uint8)
    stored[..., 0], stored[..., 1], stored[..., 2] = 200, 40, 40
    path = tmp_path / f"swapped{suffix}"
    Image.fromarray(stored).save(path, icc_profile=swapped, **({"quality": 98} if suffix == ".jpg" else {}))
    seen = np.asarray(load_image(path)).astype(int).reshape(-1, 3).mean(0)
    assert seen[1] > 170 and seen[0] < 80 and abs(seen[2] - 40) < 25, seen

    broken = tmp_path / f"broken_profile{suffix}"
    Image.fromarray(stored).save(broken, icc_profile=b"not a profile" * 20)
    with caplog.at_level("WARNING", logger="memo"):
        kept = np.asarray(load_image(broken)).astype(int)
    assert np.abs(kept - stored).max() <= 3 and "ICC colour profile that cannot be used" in caplog.text


def test_field_broken_exif_is_ignored_with_a_warning(caplog):
    path = field_image("i12_bad_exif.png")
    with caplog.at_level("WARNING", logger="memo"):
        loaded = load_image(path)
    stored = Image.open(path)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(stored.convert("RGB")))
    assert "unreadable EXIF block" in caplog.text and "i12_bad_exif.png" in caplog.text


def test_jpeg_with_junk_exif_and_rotated_jpeg(tmp_path, caplog):
    rgb = portrait_pixels()
    junk = tmp_path / "junk_exif.jpg"
    Image.fromarray(rgb).save(junk, exif=b"Exif\x00\x00" + b"\x13\x37 not a TIFF header" * 4, quality=98)
    with caplog.at_level("WARNING", logger="memo"):
        loaded = np.asarray(load_image(junk)).astype(int)
    assert loaded.shape == rgb.shape and np.abs(loaded - rgb).mean() < 3
    assert "unreadable EXIF block" in caplog.text

    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 8  # stored rotated: turn 90 degrees counter-clockwise to view
    Image.fromarray(rgb).save(rotated, exif=exif, quality=98)
    upright = np.asarray(load_image(rotated)).astype(int)
    assert np.abs(upright - np.rot90(rgb).astype(int)).mean() < 3


@pytest.mark.parametrize("suffix", [".gif", ".webp", ".png"])
def test_animated_image_uses_its_first_frame(tmp_path, suffix, caplog):
    frames = [Image.new("RGB", (80, 80), colour) for colour in ((250, 20, 20), (20, 250, 20), (20, 20, 250))]
    path = tmp_path / f"animated{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with caplog.at_level("WARNING", logger="memo"):
        loaded = np.asarray(load_image(path)).astype(int)
    assert np.abs(loaded - [250, 20, 20]).max() <= 8
    assert "animated (3 frames); its first frame is used" in caplog.text


def test_images_over_pillows_limit_load_downscaled_or_say_what_size_works(tmp_path, monkeypatch, caplog):
    """Pillow's decompression-bomb limit, lowered so the test stays small: what happens to a photo of hundreds
    of megapixels at the real limit (89 megapixels)."""
    rgb = np.asarray(Image.fromarray(portrait_pixels()).resize((2000, 1500)))
    Image.fromarray(rgb).save(tmp_path / "huge.jpg", quality=95)
    Image.fromarray(rgb).save(tmp_path / "huge.png")
    Image.fromarray(rgb).resize((1200, 900)).save(tmp_path / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600_000)
    with caplog.at_level("WARNING", logger="memo"):
        drafted = load_image(tmp_path / "huge.jpg")  # 3 megapixels: read at 1/4 scale by the JPEG decoder
    assert drafted.size == (500, 375) and "read downscaled to 500x375" in caplog.text
    expected = np.asarray(Image.fromarray(rgb).resize((500, 375), Image.Resampling.BOX)).astype(int)
    assert np.abs(np.asarray(drafted).astype(int) - expected).mean() < 4
    reduced = load_image(tmp_path / "large.png")  # 1.08 megapixels, within twice the limit: read, then halved
    assert reduced.size == (600, 450)
    with pytest.raises(ImageError) as caught:
        load_image(tmp_path / "huge.png")
    message = str(caught.value)
    assert "too large to load" in message and "2000x1500" in message and "for example" in message
    assert "damaged" not in message
    assert Image.MAX_IMAGE_PIXELS == 600_000  # the limit is restored after reading the header


def test_empty_image_file_and_path(tmp_path):
    (tmp_path / "empty.png").touch()
    with pytest.raises(ImageError, match=r"empty\.png is empty \(0 bytes\)"):
        load_image(tmp_path / "empty.png")
    from memo.errors import UserError

    with pytest.raises(UserError, match="The image path is empty"):
        load_image("")
