"""paste_back: the animated crop pasted back into the photo, at the photo's own size.

The default tier checks the blend in this process on synthetic pictures (output size, what is kept outside,
what is kept inside, the feathered band, the edges the crop touches, colour matching, one frame at a time) and
the refusals. The ``e2e`` tier runs ``inference.py --tiny`` as a user would, once without and once with
``paste_back`` for each kind of photo (16:9 with the face off-centre, 9:16, a 4:3 photo larger than
``max_output_side``, a face touching the top edge), and checks the decoded mp4 against the photo and against
the plain run's crop video (the same seed gives the same generated frames).

The tiny pack's detector reports fixed face boxes (``memo.tiny.face_models``); the e2e cases that need a face
elsewhere write a detector that knows that face and pass it as ``misc_model_dir``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
from conftest import REPO, link_example_files, run_main
from PIL import Image

from memo.apps import cli
from memo.conditions.framing import crop_box
from memo.conditions.paste_back import BAND_SHARE, PasteBack, output_size
from memo.io.hub import FACE_MODELS_FOLDER
from memo.io.video_writer import VideoWriter
from memo.settings.inference import ConfigError, load_config
from memo.tiny.face_models import DETECTOR_INPUT_SIZE, TINY_FACES, TinyFace, write_tiny_face_models

EXAMPLE_AUDIO = REPO / "assets" / "examples" / "speech.wav"
CHEAP = ("inference_steps=1", "cfg_scale=1", "vocal_separation=false", "emotion=neutral")
FRAME = 64  # the tiny pack's video size


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A dark, bluish picture: smooth shading with fine grain (enough texture for the tiny detector), far in colour
    from the tiny pack's bright noise, so a seam would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack(
        [30 + 60 * x / width, 40 + 50 * y / height, 110 + 40 * np.sin(x / 97.0) * np.cos(y / 83.0)], axis=-1
    )
    return np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def neighbour_difference(picture: np.ndarray) -> float:
    """The photo's own typical step between neighbouring pixels: the median absolute difference, over both axes
    and the colour channels."""
    picture = picture.astype(np.float32)
    steps = np.concatenate([np.abs(np.diff(picture, axis=1)).ravel(), np.abs(np.diff(picture, axis=0)).ravel()])
    return float(np.median(steps))


def band_steps(frame: np.ndarray, paste: PasteBack) -> dict[str, float]:
    """For each side with a band: the largest step between neighbouring positions of the frame's profile across
    the band (mean over the band's length and the channels), from a few pixels outside the crop to a few
    beyond the band."""
    left, top, right, bottom = paste.region
    band = int(np.ceil(paste.band))
    width, height = paste.size
    pixels = frame.astype(np.float32)
    rows = slice(int(top + band), int(bottom - band))
    columns = slice(int(left + band), int(right - band))
    steps = {}
    if left > 1:
        steps["left"] = pixels[rows, max(0, int(left) - 4) : int(left) + band + 4].mean(axis=(0, 2))
    if right < width - 1:
        steps["right"] = pixels[rows, int(right) - band - 4 : min(width, int(right) + 4)].mean(axis=(0, 2))
    if top > 1:
        steps["top"] = pixels[max(0, int(top) - 4) : int(top) + band + 4, columns].mean(axis=(1, 2))
    if bottom < height - 1:
        steps["bottom"] = pixels[int(bottom) - band - 4 : min(height, int(bottom) + 4), columns].mean(axis=(1, 2))
    return {side: float(np.abs(np.diff(profile)).max()) for side, profile in steps.items()}


def outside_mask(paste: PasteBack, margin: int = 2) -> np.ndarray:
    """(H, W) bool: the output pixels at least ``margin`` pixels outside the crop region."""
    width, height = paste.size
    x0, y0, x1, y1 = paste.roi
    mask = np.ones((height, width), dtype=bool)
    mask[max(0, y0 - margin) : y1 + margin, max(0, x0 - margin) : x1 + margin] = False
    return mask


def inner_box(paste: PasteBack, margin: int = 2) -> tuple[slice, slice]:
    """Rows and columns of the region inside the band (by ``margin`` more pixels), where the frame is the
    generated crop alone; a side on the photo's edge has no band."""
    width, height = paste.size
    left, top, right, bottom = paste.region
    band = paste.band + margin
    x0 = 0 if left < 0.5 else int(np.ceil(left + band))
    y0 = 0 if top < 0.5 else int(np.ceil(top + band))
    x1 = width if right > width - 0.5 else int(right - band)
    y1 = height if bottom > height - 0.5 else int(bottom - band)
    return slice(y0, y1), slice(x0, x1)


def expected_inside(generated: np.ndarray, paste: PasteBack) -> np.ndarray:
    """The generated crop resized onto its region of the output (zeros elsewhere), by PIL's own resize of the
    crop's exact region: independent of the cv2 code under test. The frame is padded by repeating its edge, as
    the region's outer pixels reach a little past it."""
    width, height = paste.size
    left, top, right, bottom = paste.region
    frame_h, frame_w = generated.shape[:2]
    sx, sy = frame_w / (right - left), frame_h / (bottom - top)
    x0, y0, x1, y1 = paste.roi
    pad = 2
    padded = np.pad(generated, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    source = ((x0 - left) * sx + pad, (y0 - top) * sy + pad, (x1 - left) * sx + pad, (y1 - top) * sy + pad)
    region = Image.fromarray(padded).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=source)
    out = np.zeros((height, width, 3), dtype=np.uint8)
    out[y0:y1, x0:x1] = np.asarray(region)
    return out


# -- the blend, in process ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((1280, 720), 1920, (1280, 720)),
        ((720, 1280), 1920, (720, 1280)),
        ((4000, 3000), 1920, (1920, 1440)),
        ((1281, 721), 1920, (1280, 720)),  # odd sides rounded down to even
        ((300, 200), 1920, (300, 200)),  # never enlarged
        ((3001, 2000), 1000, (1000, 666)),
    ],
)
def test_output_size_is_even_scaled_down_and_never_up(size, max_side, expected):
    assert output_size(size, max_side) == expected


def synthetic(frame_colour=(230, 200, 40), size=(640, 360), box=(200.3, 60.7, 460.3, 320.7)):
    picture = photo(*size)
    rng = np.random.default_rng(1)
    frame = np.clip(np.array(frame_colour) + rng.normal(0, 20, (FRAME, FRAME, 3)), 0, 255).astype(np.uint8)
    paste = PasteBack.plan(Image.fromarray(picture), box, (FRAME, FRAME), 1920)
    return picture, frame, paste


def test_outside_is_the_photo_inside_the_generated_crop_and_the_band_has_no_step():
    picture, frame, paste = synthetic()
    out = paste.paste(frame)
    assert out.shape == (360, 640, 3) and out.dtype == np.uint8
    outside = outside_mask(paste, margin=0)
    np.testing.assert_array_equal(out[outside], picture[outside])
    rows, columns = inner_box(paste)
    inside = expected_inside(frame, paste)
    assert np.abs(out[rows, columns].astype(int) - inside[rows, columns]).max() <= 2
    assert paste.band == pytest.approx(BAND_SHARE * 260)

    allowed = neighbour_difference(picture)
    steps = band_steps(out, paste)
    assert set(steps) == {"left", "right", "top", "bottom"}
    assert max(steps.values()) <= allowed, (steps, allowed)
    # The same two pictures joined without the band: a step far above the photo's own.
    hard = picture.copy()
    x0, y0, x1, y1 = paste.roi
    hard[y0:y1, x0:x1] = inside[y0:y1, x0:x1]
    assert min(band_steps(hard, paste).values()) > 3 * allowed


def test_a_side_on_the_photos_edge_keeps_the_generated_pixels_to_the_edge():
    picture, frame, paste = synthetic(box=(0.0, 0.0, 300.0, 300.0))
    out = paste.paste(frame)
    assert np.all(paste.rows[:5] == 1) and np.all(paste.columns[:5] == 1)
    assert paste.rows[-1] < 0.01 and paste.columns[-1] < 0.01
    inside = expected_inside(frame, paste)
    # The first row and column are the generated pixels, not a blend with the photo.
    assert np.abs(out[0, :200].astype(int) - inside[0, :200]).max() <= 2
    assert np.abs(out[:200, 0].astype(int) - inside[:200, 0]).max() <= 2
    assert set(band_steps(out, paste)) == {"right", "bottom"}


def test_a_crop_of_the_whole_photo_is_the_generated_frame_resized():
    picture, frame, paste = synthetic(size=(320, 320), box=(0, 0, 320, 320))
    out = paste.paste(frame)
    assert np.all(paste.rows == 1) and np.all(paste.columns == 1)
    assert np.abs(out.astype(int) - expected_inside(frame, paste)).max() <= 2


def test_colour_is_matched_in_the_band_only_when_a_step_remains():
    picture, frame, paste = synthetic()
    rows, columns = inner_box(paste)
    near = paste.paste(frame)
    # A generated frame of the photo's own colour: no colour shift, the band is a plain blend.
    x0, y0, x1, y1 = paste.roi
    mean = picture[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0)
    same = np.clip(mean + np.random.default_rng(2).normal(0, 3, (FRAME, FRAME, 3)), 0, 255).astype(np.uint8)
    plain = paste.paste(same)
    generated = paste.resample(same).astype(np.float32)
    weight = (paste.rows[:, None] * paste.columns[None, :])[..., None]
    blend = picture[y0:y1, x0:x1] + weight * (generated - picture[y0:y1, x0:x1])
    assert np.abs(plain[y0:y1, x0:x1] - np.clip(blend + 0.5, 0, 255).astype(np.uint8).astype(int)).max() <= 1
    # A frame far from the photo's colour: the band's generated pixels are pulled towards the photo's colour
    # (the band lies closer to the photo than a plain blend would), the inside stays the generated crop.
    far_blend = picture[y0:y1, x0:x1] + weight * (paste.resample(frame).astype(np.float32) - picture[y0:y1, x0:x1])
    band = (weight[..., 0] > 0.05) & (weight[..., 0] < 0.95)
    pasted_gap = np.abs(near[y0:y1, x0:x1].astype(np.float32) - picture[y0:y1, x0:x1])[band].mean()
    plain_gap = np.abs(far_blend - picture[y0:y1, x0:x1])[band].mean()
    assert pasted_gap < 0.9 * plain_gap
    assert np.abs(near[rows, columns].astype(int) - expected_inside(frame, paste)[rows, columns]).max() <= 2


def test_frames_are_pasted_and_written_one_at_a_time():
    _, frame, paste = synthetic()
    clip = torch.from_numpy(np.stack([frame, frame[::-1]])).permute(3, 0, 1, 2).float() / 255  # (3, n, h, w)
    written = []
    paste.streaming(lambda pixels: written.append(pixels.copy()))(clip)  # the writer encodes it before returning
    assert [w.shape for w in written] == [(1, 360, 640, 3)] * 2
    np.testing.assert_array_equal(written[0][0], paste.paste(frame))
    np.testing.assert_array_equal(written[1][0], paste.paste(np.ascontiguousarray(frame[::-1])))


def test_a_box_outside_the_photo_is_refused():
    with pytest.raises(ValueError, match="does not lie inside the 640x360 photo"):
        PasteBack.plan(Image.fromarray(photo(640, 360)), (600, 0, 700, 100), (FRAME, FRAME), 1920)


def test_stretch_framing_with_paste_back_is_refused_in_one_line(pack, tmp_path):
    with pytest.raises(ConfigError, match="paste_back=true needs framing=crop"):
        load_config(None, ["framing=stretch", "paste_back=true"])
    assert load_config(None, ["paste_back=true", "max_output_side=1280"]).max_output_side == 1280
    with pytest.raises(ConfigError, match="max_output_side"):
        load_config(None, ["paste_back=true", "max_output_side=10"])
    result = run_main(
        cli.main,
        ["--config", str(pack / "inference.yaml"), "--output_dir", str(tmp_path / "out"), "framing=stretch",
         "paste_back=true"],
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "paste_back=true needs framing=crop" in errors[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_batch_manifest_takes_paste_back_as_a_column(tmp_path):
    from memo.apps.batch import ManifestError, load_jobs

    link_example_files(tmp_path, a="a.png", c="c.png", b="b.wav")
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("image,audio,paste_back,max_output_side\na.png,b.wav,true,1280\nc.png,b.wav,,\n")
    base, jobs = load_jobs(manifest, tmp_path / "out", None, [])
    assert base.paste_back is False
    assert jobs[0].settings == {"paste_back": True, "max_output_side": 1280} and jobs[1].settings == {}
    manifest.write_text("image,audio,paste_back,framing\na.png,b.wav,true,stretch\n")
    with pytest.raises(ManifestError, match="line 2: .*paste_back=true needs framing=crop"):
        load_jobs(manifest, tmp_path / "out", None, [])


# -- the whole program -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """One second of the bundled speech: two clips of the tiny pack."""
    audio, rate = soundfile.read(EXAMPLE_AUDIO, dtype="float32")
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    soundfile.write(path, audio[:rate], rate)
    return path


def detector_box(face: TinyFace, photo_size: tuple[int, int]) -> tuple[float, ...]:
    """Where the tiny detector reports ``face`` in a photo of ``photo_size``: its box in the 64x64 input, which
    holds the photo scaled to fit, scaled back and cut to the photo."""
    scale = max(photo_size) / DETECTOR_INPUT_SIZE
    x1, y1, x2, y2 = (v * scale for v in face.box)
    return x1, y1, min(x2, photo_size[0]), min(y2, photo_size[1])


CASES = {
    # name: (photo size, the detector's face or None for the pack's own, max_output_side, output size, sides
    # with a band)
    "wide_off_centre": ((1280, 720), TinyFace(8, 16, 16, (10, 12, 18, 22)), 1920, (1280, 720), "LTRB"),
    "tall": ((720, 1280), TinyFace(8, 24, 24, (18, 14, 30, 28)), 1920, (720, 1280), "LTB"),
    "large_4x3": ((2400, 1800), None, 1920, (1920, 1440), "LR"),
    "face_at_top": ((1024, 1024), TinyFace(8, 32, 8, (26, 0, 38, 12)), 1920, (1024, 1024), "LRB"),
}


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def luma(pixels: np.ndarray) -> np.ndarray:
    """BT.601 luma of RGB pixels (..., 3)."""
    return pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def codec_error(picture: np.ndarray, path: Path) -> float:
    """The mean absolute error (levels of 255, RGB) the program's H.264 writer leaves on ``picture`` as a frame."""
    with VideoWriter(path, 30, picture.shape[1], picture.shape[0]) as writer:
        writer.write(picture[None])
    return float(np.abs(decode(path)[0].astype(np.float32) - picture).mean())


def run_program(pack_args: list[str], image: Path, audio: Path, output_dir: Path, *settings: str):
    command = [sys.executable, str(REPO / "inference.py"), "--tiny", "--input_image", str(image)]
    command += ["--input_audio", str(audio), "--output_dir", str(output_dir), *CHEAP, *pack_args, *settings]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CASES))
def test_inference_pastes_the_video_back_into_the_photo(case, speech, tmp_path):
    size, face, max_side, out_size, soft_sides = CASES[case]
    picture = photo(*size)
    image = tmp_path / f"{case}.png"
    Image.fromarray(picture).save(image)
    pack_args = []
    if face is not None:
        misc = tmp_path / "misc"
        write_tiny_face_models(misc / FACE_MODELS_FOLDER, (face,))
        pack_args = [f"misc_model_dir={misc}"]
    face_box = detector_box(face or TINY_FACES[0], size)

    plain = run_program(pack_args, image, speech, tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr
    pasted = run_program(
        pack_args, image, speech, tmp_path / "pasted", "paste_back=true", f"max_output_side={max_side}"
    )
    assert pasted.returncode == 0, pasted.stderr
    width, height = out_size
    assert f"output {width}x{height}" in pasted.stderr and f"{width}x{height}, in" in pasted.stderr

    crops = decode(tmp_path / "plain" / f"{case}_speech_tiny.mp4")
    frames = decode(tmp_path / "pasted" / f"{case}_speech_tiny.mp4")
    assert len(frames) == len(crops) == 30 and frames[0].shape == (height, width, 3)

    box = crop_box(size, face_box, FRAME, FRAME)
    paste = PasteBack.plan(Image.fromarray(picture), box, (FRAME, FRAME), max_side)
    assert paste.size == out_size
    scaled = paste.photo  # the photo resized to the output size
    left, top, right, bottom = paste.region
    touching = {"L": left < 0.5, "T": top < 0.5, "R": right > width - 0.5, "B": bottom > height - 0.5}
    assert "".join(side for side in "LTRB" if not touching[side]) == soft_sides

    allowed = neighbour_difference(scaled)
    outside = outside_mask(paste)
    rows, columns = inner_box(paste)
    codec = codec_error(scaled, tmp_path / "codec.mp4")
    for index in (0, 15, 29):
        frame, crop = frames[index].astype(np.float32), crops[index]
        # Outside the crop and its band: the photo, within the codec's error on the photo itself.
        assert np.abs(frame[outside] - scaled[outside]).mean() <= 1.25 * codec + 0.5
        # Inside the band: the generated crop (decoded from the plain run) resized. Compared in luma: the plain
        # run's 64x64 frames lost their fine colour to the codec's 4:2:0 chroma, which resizing enlarges.
        inside = expected_inside(crop, paste)
        inside_error = np.abs(luma(frame[rows, columns]) - luma(inside[rows, columns])).mean()
        assert inside_error < 5.0 and inside_error < 0.1 * np.abs(frame[rows, columns] - scaled[rows, columns]).mean()
        # Across the band: no step above the photo's own neighbouring-pixel steps; joined without a band the
        # same pictures would step well above them.
        steps = band_steps(frames[index], paste)
        assert max(steps.values()) <= allowed, (steps, allowed)
        hard = scaled.copy()
        x0, y0, x1, y1 = paste.roi
        hard[y0:y1, x0:x1] = inside[y0:y1, x0:x1]
        assert min(band_steps(hard, paste).values()) > 2 * allowed
        # A side on the photo's edge: the generated pixels reach the edge, unblended.
        for side, (edge_rows, edge_columns) in {
            "L": (rows, slice(0, 3)),
            "T": (slice(0, 3), columns),
            "R": (rows, slice(width - 3, width)),
            "B": (slice(height - 3, height), columns),
        }.items():
            if touching[side]:
                gap = np.abs(luma(frame[edge_rows, edge_columns]) - luma(inside[edge_rows, edge_columns])).mean()
                assert gap < 5.0, (side, gap)


@pytest.mark.slow
def test_a_pasted_render_stopped_part_way_resumes_to_the_uninterrupted_video(pack, speech, tmp_path):
    """paste_back with exact resume: a render stopped after its first clip (as a handled signal stops it) keeps
    the pasted clip's segment, and the rerun ends in the video an uninterrupted render gives, frame for frame."""
    from memo.generator import MemoGenerator
    from memo.io.job_state import state_folder

    wide = tmp_path / "wide.png"
    Image.open(REPO / "assets" / "examples" / "portrait.jpg").convert("RGB").resize((192, 128)).save(wide)
    settings = [*CHEAP, "paste_back=true", "width=64", "height=64"]
    generator = MemoGenerator(load_config(pack / "inference.yaml", settings))
    whole = generator.generate(wide, speech, tmp_path / "whole.mp4")

    def stop_in_the_second_clip(fraction: float, text: str) -> None:
        if fraction > 0.75:  # after the second clip's (only) step, before its end
            raise KeyboardInterrupt

    stopped = tmp_path / "stopped.mp4"
    with pytest.raises(KeyboardInterrupt):
        generator.generate(wide, speech, stopped, progress=stop_in_the_second_clip)
    assert not stopped.exists() and generator.saved_progress(wide, speech, stopped).clips_done == 1
    generator.generate(wide, speech, stopped)
    frames, expected = decode(stopped), decode(whole)
    assert frames[0].shape == (128, 192, 3) and len(frames) == len(expected) == 30
    assert all(np.array_equal(a, b) for a, b in zip(frames, expected, strict=True))
    assert not state_folder(stopped).exists()
