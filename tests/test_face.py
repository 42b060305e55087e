"""Face detection and embedding through the real insightface + onnxruntime, on the tiny stand-in models."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("insightface")

from memo.conditions.face import (
    EMBEDDING_DIM,
    Face,
    FaceAnalyzer,
    FaceModelError,
    NoFaceError,
    face_embedding,
    largest_face,
    onnx_providers,
)
from memo.conditions.framing import crop_box
from memo.tiny.face_models import DETECTOR_FILE, DETECTOR_INPUT_SIZE, TINY_FACES, write_tiny_face_models


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A busy RGB picture: noise over a colour gradient, with a few flat shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 200 / width, y * 200 / height, np.full((height, width), 90.0)], axis=-1)
    image = base + rng.normal(0, 45, (height, width, 3))
    image[3 * height // 4 :, : width // 5] = (200, 160, 140)  # a flat patch, away from where faces are found
    image[height // 4 : height // 4 + 8, :] += rng.normal(0, 60, (8, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("face_analysis") / "models"
    write_tiny_face_models(folder)
    return folder


@pytest.fixture(scope="module")
def analyzer(models_dir):
    return FaceAnalyzer.from_dir(models_dir, device="cpu")


def expected_box(face_index: int, image_side: int) -> tuple[float, ...]:
    scale = image_side / DETECTOR_INPUT_SIZE
    return tuple(v * scale for v in TINY_FACES[face_index].box)


def test_tiny_models_are_small_and_deterministic(models_dir, tmp_path):
    for name in ("scrfd_10g_bnkps.onnx", "glintr100.onnx"):
        assert (models_dir / name).stat().st_size < 1_000_000
    write_tiny_face_models(tmp_path)
    again = FaceAnalyzer.from_dir(tmp_path, device="cpu")
    first = FaceAnalyzer.from_dir(models_dir, device="cpu")
    image = textured(256, 256, seed=3)
    np.testing.assert_array_equal(again.analyze(image).embedding, first.analyze(image).embedding)


def test_textured_portrait_gives_a_512d_embedding_inside_the_image(analyzer):
    image = textured(512, 512)
    face = analyzer.analyze(image)
    assert isinstance(face, Face)
    assert face.embedding.shape == (EMBEDDING_DIM,) and face.embedding.dtype == np.float32
    assert np.isfinite(face.embedding).all() and np.abs(face.embedding).sum() > 0
    assert face.kps.shape == (5, 2)
    assert face.score > 0.5
    x1, y1, x2, y2 = face.bbox
    assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512
    np.testing.assert_allclose(face.bbox, expected_box(0, 512), atol=1e-3)


def test_photo_of_a_person(analyzer):
    data = pytest.importorskip("skimage.data")
    photo = data.astronaut()  # NASA portrait, public domain, shipped with scikit-image
    embedding, face = face_embedding(analyzer, Image.fromarray(photo), "astronaut.png")
    assert face is not None and embedding.shape == (EMBEDDING_DIM,) and np.isfinite(embedding).all()


def test_embedding_depends_on_the_face(analyzer):
    a = analyzer.analyze(textured(512, 512, seed=1)).embedding
    b = analyzer.analyze(textured(512, 512, seed=2)).embedding
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, analyzer.analyze(textured(512, 512, seed=1)).embedding)


def patch_at(image: np.ndarray, face_index: int, seed: int = 0) -> np.ndarray:
    """``image`` with texture painted exactly over one of the stand-in's face boxes (of a square image)."""
    x1, y1, x2, y2 = (round(v) for v in expected_box(face_index, image.shape[0]))
    image = image.copy()
    image[y1:y2, x1:x2] = textured(y2 - y1, x2 - x1, seed)
    return image


def test_the_largest_of_several_faces_is_chosen(analyzer):
    # A crowd shot for the stand-in: texture in its large face box and, standing apart on a flat ground,
    # in its small one.
    image = patch_at(patch_at(np.full((512, 512, 3), 128, np.uint8), 0), 1, seed=1)
    faces = analyzer.detect(image)
    assert len(faces) == 2
    assert analyzer.analyze(image).area == max(f.area for f in faces)
    np.testing.assert_allclose(analyzer.analyze(image).bbox, expected_box(0, 512), atol=1e-3)

    # Texture only in the small face's box: that face alone is found, and it is the one returned.
    corner = patch_at(np.full((512, 512, 3), 128, np.uint8), 1)
    assert len(analyzer.detect(corner)) == 1
    np.testing.assert_allclose(analyzer.analyze(corner).bbox, expected_box(1, 512), atol=1e-3)


@pytest.mark.parametrize("size", [(512, 512), (384, 512), (640, 360), (64, 64)])
def test_ordinary_portraits_have_exactly_one_face(analyzer, size):
    """As the real detector: one face on a head-and-shoulders photo or a video frame, whatever its size,
    including a fully textured picture (clothes and background around the small box are not a face)."""
    data = pytest.importorskip("skimage.data")
    from conftest import REPO

    from memo.io.image import load_image

    photos = [np.asarray(load_image(REPO / "assets" / "examples" / "portrait.jpg")), data.chelsea()]
    photos.append(np.repeat(data.camera()[..., None], 3, axis=2))  # the cameraman, greyscale
    if size != (64, 64):  # (pixel noise averages out when shrunk that far)
        photos.append(textured(512, 512))
    for photo in photos:
        resized = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BILINEAR))
        faces = analyzer.detect(resized)
        assert len(faces) == 1, (size, [f.bbox for f in faces])


def test_largest_face_selection_logic():
    def face(x1, y1, x2, y2, score=0.9):
        return Face((x1, y1, x2, y2), np.zeros((5, 2), np.float32), score, np.full(EMBEDDING_DIM, x2, np.float32))

    small_confident = face(0, 0, 10, 10, score=0.99)
    big = face(100, 100, 200, 220, score=0.6)
    wide = face(0, 300, 150, 360)
    assert largest_face([small_confident, big, wide]) is big
    assert largest_face([wide, small_confident]) is wide
    assert largest_face([]) is None
    first, second = face(0, 0, 20, 20), face(50, 50, 70, 70)
    assert largest_face([first, second]) is first


def test_uniform_image_has_no_face(analyzer):
    blank = np.full((480, 640, 3), 200, np.uint8)
    assert analyzer.analyze(blank) is None
    with pytest.raises(NoFaceError) as caught:
        face_embedding(analyzer, blank, "blank.png")
    message = str(caught.value)
    assert "blank.png" in message and "No face" in message and "allow_missing=True" in message
    with pytest.raises(NoFaceError, match="--allow-no-face"):
        face_embedding(analyzer, blank, "blank.png", missing_option="--allow-no-face")

    embedding, face = face_embedding(analyzer, blank, "blank.png", allow_missing=True)
    assert face is None
    assert embedding.shape == (EMBEDDING_DIM,) and embedding.dtype == np.float32 and not embedding.any()


def test_non_square_picture_and_framing_around_the_face(analyzer):
    image = textured(480, 640, seed=4)
    face = analyzer.analyze(image)
    assert face is not None
    x1, y1, x2, y2 = face.bbox
    assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480
    left, top, right, bottom = crop_box((640, 480), face.bbox, 512, 512)
    assert left <= x1 and right >= x2 and top <= y1 and bottom >= y2


def test_missing_models_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "misc" / "face_analysis" / "models"
    with pytest.raises(FaceModelError) as caught:
        FaceAnalyzer.from_dir(missing)
    message = str(caught.value)
    assert str(missing) in message and "scrfd_10g_bnkps.onnx" in message and "glintr100.onnx" in message


def test_missing_recognizer_is_named(models_dir, tmp_path):
    (tmp_path / DETECTOR_FILE).write_bytes((models_dir / DETECTOR_FILE).read_bytes())
    with pytest.raises(FaceModelError, match="lacks glintr100.onnx"):
        FaceAnalyzer.from_dir(tmp_path)


def test_damaged_detector_is_a_clear_error(models_dir, tmp_path):
    (tmp_path / DETECTOR_FILE).write_bytes(b"not an onnx model")
    (tmp_path / "glintr100.onnx").write_bytes((models_dir / "glintr100.onnx").read_bytes())
    with pytest.raises(FaceModelError, match=str(tmp_path)):
        FaceAnalyzer.from_dir(tmp_path, device="cpu")


def test_loading_prints_nothing(models_dir, capfd):
    FaceAnalyzer.from_dir(models_dir)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_providers_fall_back_to_cpu():
    import onnxruntime

    providers, ctx_id = onnx_providers("cpu")
    assert providers == ["CPUExecutionProvider"] and ctx_id == -1
    providers, ctx_id = onnx_providers(None)
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert providers[0][0] == "CUDAExecutionProvider" and ctx_id == 0
    else:
        assert providers == ["CPUExecutionProvider"] and ctx_id == -1
        assert onnx_providers("cuda:1") == (["CPUExecutionProvider"], -1)
