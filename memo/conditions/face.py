"""The identity condition: find the largest face in the portrait and its 512-d ArcFace embedding.

MEMO conditions on insightface's recognition embedding of the reference face (glintr100, unnormalised) and
finds the face with SCRFD-10G. Both run through insightface's ``FaceAnalysis`` on onnxruntime, on CUDA when
onnxruntime offers it and on the CPU otherwise. Only the detector and the recognizer are loaded, even when the
folder also holds the landmark and gender/age models of the published ``misc/face_analysis/models``.

Unlike the original, a portrait without a detectable face is an error unless the caller explicitly allows
it; the original silently used a zero embedding.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memo.errors import ONNXRUNTIME_GPU_INSTALL, UserError, import_runtime
from memo.io.hub import FACE_DETECTOR_FILE, FACE_RECOGNIZER_FILE

logger = logging.getLogger(__name__)

DETECTOR_FILE = FACE_DETECTOR_FILE
RECOGNIZER_FILE = FACE_RECOGNIZER_FILE
EMBEDDING_DIM = 512


class FaceModelError(UserError, RuntimeError):
    """The face-analysis models cannot be found or loaded."""


class NoFaceError(UserError, ValueError):
    """No face was detected in the user's portrait."""

    def __init__(self, image_name: str, missing_option: str = "allow_missing=True") -> None:
        self.image_name = image_name
        super().__init__(
            f"No face was found in {image_name}. MEMO animates one person's face: use a clear, well-lit, "
            f"roughly frontal photo in which the whole face is visible and not tiny (a head-and-shoulders "
            f"shot works best). To go on without a face anyway, set {missing_option}: the identity "
            f"embedding is then all zeros (what the original release did silently), and the video keeps "
            f"the person's look less well."
        )


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face, in the pixel coordinates of the analysed image."""

    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2
    kps: np.ndarray  # (5, 2): eyes, nose tip, mouth corners
    score: float
    embedding: np.ndarray  # (512,) float32, unnormalised as insightface gives it

    @property
    def width(self) -> float:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> float:
        return self.bbox[3] - self.bbox[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


def largest_face(faces: Sequence[Face]) -> Face | None:
    """The face with the largest box area (the first of equals), or None for no faces."""
    if not faces:
        return None
    return max(faces, key=lambda face: face.area)


def onnx_providers(device: str | None = None) -> tuple[list, int]:
    """onnxruntime providers and insightface's ``ctx_id`` for ``device`` ("cuda", "cuda:1", "cpu", None = auto).

    CUDA is used when onnxruntime offers it (the ``onnxruntime-gpu`` build); asking for "cuda" without it
    falls back to the CPU with a warning, since face analysis runs once per video.
    """
    onnxruntime = import_runtime("onnxruntime")

    wanted = "auto" if device is None else str(device).lower()
    has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if wanted == "auto" or wanted.startswith("cuda"):
        index = int(wanted.split(":", 1)[1]) if wanted.startswith("cuda:") else 0
        if has_cuda:
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], index
        if wanted != "auto":
            logger.warning(
                "onnxruntime has no CUDA provider; face analysis runs on the CPU. For CUDA, with uv: --extra gpu; "
                f"with pip: {ONNXRUNTIME_GPU_INSTALL}"
            )
    return ["CPUExecutionProvider"], -1


class FaceAnalyzer:
    """insightface's detector + recognizer; :meth:`analyze` returns the largest face of an RGB image."""

    def __init__(self, app, models_dir: Path) -> None:
        self.app = app
        self.models_dir = models_dir

    @classmethod
    def from_dir(
        cls,
        models_dir: str | os.PathLike,
        device: str | None = None,
        det_size: tuple[int, int] = (640, 640),
    ) -> FaceAnalyzer:
        """Load ``scrfd_10g_bnkps.onnx`` and ``glintr100.onnx`` from ``models_dir``.

        ``models_dir`` is the folder holding the .onnx files (``.../misc/face_analysis/models``).
        ``det_size`` is the detector's input size (width, height); a detector with a fixed input size,
        like the tiny stand-in, uses its own and ignores it.
        """
        folder = Path(models_dir).expanduser().resolve()
        expected = f"{DETECTOR_FILE} (face detector) and {RECOGNIZER_FILE} (face recognition)"
        if not folder.is_dir():
            raise FaceModelError(
                f"The face-analysis model folder {folder} does not exist. It should hold {expected}, "
                f"as in misc/face_analysis/models of the published MEMO models; download them or point "
                f"the face-analysis model folder setting at them."
            )
        missing = [name for name in (DETECTOR_FILE, RECOGNIZER_FILE) if not (folder / name).is_file()]
        if missing:
            raise FaceModelError(
                f"The face-analysis model folder {folder} lacks {' and '.join(missing)}; it should hold "
                f"{expected}, as in misc/face_analysis/models of the published MEMO models."
            )

        onnxruntime = import_runtime("onnxruntime")
        FaceAnalysis = import_runtime("insightface.app").FaceAnalysis  # noqa: N806 (insightface's class)

        providers, ctx_id = onnx_providers(device)
        onnxruntime.set_default_logger_severity(3)  # ORT warns about unused initializers of these models
        logging.getLogger("insightface").setLevel(logging.WARNING)
        try:
            # insightface 0.7.3 prints every model it finds and the det_size it uses; keep our logs concise.
            with contextlib.redirect_stdout(io.StringIO()):
                # An absolute path as ``name`` is the form that loads this folder on both insightface
                # 0.7.3 (root/models/name) and 2.1 (an existing directory); name="" fails on 2.1.
                app = FaceAnalysis(str(folder), str(folder.parent), ["detection", "recognition"], providers=providers)
                app.prepare(ctx_id=ctx_id, det_size=tuple(det_size))
        except AssertionError as error:  # insightface asserts that a detector was found
            raise FaceModelError(
                f"insightface found no face detector among the models in {folder}; {DETECTOR_FILE} "
                f"may be damaged or not an SCRFD model."
            ) from error
        except Exception as error:  # onnxruntime's errors for a damaged file are not one class
            raise FaceModelError(f"Could not load the face-analysis models in {folder}: {error}") from error
        if "recognition" not in app.models:
            raise FaceModelError(
                f"insightface did not take {folder / RECOGNIZER_FILE} as a face-recognition model; "
                f"it may be damaged or not an ArcFace model (input [N, 3, 112, 112], one output)."
            )
        provider = providers[0] if isinstance(providers[0], str) else providers[0][0]
        logger.info("Face analysis: %s on %s", folder, provider)
        return cls(app, folder)

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        """All faces in an RGB uint8 image (H, W, 3), highest score first."""
        image = np.asarray(image_rgb)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"Expected an RGB image of shape (H, W, 3), got shape {image.shape}.")
        if image.dtype != np.uint8:
            raise ValueError(f"Expected an RGB image of dtype uint8, got {image.dtype}.")
        bgr = np.ascontiguousarray(image[:, :, ::-1])  # insightface works on OpenCV's BGR order
        with warnings.catch_warnings():
            # insightface 2.1's alignment calls a scikit-image method deprecated in 0.26, once per face.
            warnings.filterwarnings("ignore", category=FutureWarning)
            found = self.app.get(bgr)
        faces = []
        for face in found:
            if face.embedding is None:
                raise FaceModelError(f"The recognizer in {self.models_dir} gave no embedding for a detected face.")
            faces.append(
                Face(
                    bbox=tuple(float(v) for v in face.bbox[:4]),
                    kps=np.asarray(face.kps, dtype=np.float32).reshape(5, 2),
                    score=float(face.det_score),
                    embedding=np.asarray(face.embedding, dtype=np.float32).reshape(EMBEDDING_DIM),
                )
            )
        return faces

    def analyze(self, image_rgb: np.ndarray) -> Face | None:
        """The largest face (by box area) of an RGB uint8 image, or None when there is none."""
        return largest_face(self.detect(image_rgb))


def face_embedding(
    analyzer: FaceAnalyzer,
    image,
    image_name: str,
    allow_missing: bool = False,
    *,
    missing_option: str = "allow_missing=True",
) -> tuple[np.ndarray, Face | None]:
    """The (512,) float32 embedding of the largest face in ``image`` (RGB array or PIL image) and that face.

    Without a face this raises :class:`NoFaceError` naming ``image_name``, or, with ``allow_missing``,
    returns zeros and None. ``missing_option`` is how the error names the way to allow it (e.g. a CLI flag).
    """
    if not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("RGB"))
    face = analyzer.analyze(image)
    if face is None:
        if not allow_missing:
            raise NoFaceError(image_name, missing_option)
        logger.warning("No face found in %s; going on with a zero face embedding as asked.", image_name)
        return np.zeros(EMBEDDING_DIM, dtype=np.float32), None
    return face.embedding, face
