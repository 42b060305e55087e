"""Tiny stand-ins for MEMO's face models: ``scrfd_10g_bnkps.onnx`` (detector) and ``glintr100.onnx`` (ArcFace).

They are real ONNX files that insightface routes and runs exactly as it does the published ones (it picks a
model by its input shape and number of outputs, never by file name):

- The detector has a fixed input ``[1, 3, 64, 64]`` and the nine rank-2 outputs of SCRFD-10G-BNKPS, in its
  order ``score8, score16, score32, bbox8, bbox16, bbox32, kps8, kps16, kps32``. Because the input is fixed,
  insightface ignores ``det_size`` and always resizes the image (aspect kept, pasted top-left) to 64x64.
  It knows two face positions, :data:`TINY_FACES`: a large one in the upper middle, where a head-and-shoulders
  portrait has its face, and a small one in the lower right corner. The large one is "detected" when the
  image is textured inside its box: the score is a sigmoid of the mean of ``min(|dx|, |dy|)`` there, which
  is high for a photo or noise and close to zero for a flat image, a smooth gradient, or the straight edge
  where a non-square image meets insightface's black padding. The small one is "detected" only when its box
  is textured and each side of a ring around it (leaving out the other face's box) is flat: a separate
  small textured patch, as a second face in a crowd
  shot stands apart from its surroundings, and not the shoulders or background of an ordinary portrait.
  So, like the real detector, a blank image yields no face and a portrait photo or talking-head video frame
  exactly one; an image textured in the large box and in the small box alone yields two (the large one is
  the one MEMO uses), and one textured only in the small box yields just the small one.
- The recognizer has input ``['None', 3, 112, 112]`` and one 512-d output, with seeded random weights, so
  the same crop always gives the same embedding and different crops give different ones.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from memo.io.hub import FACE_DETECTOR_FILE, FACE_RECOGNIZER_FILE

DETECTOR_FILE = FACE_DETECTOR_FILE
RECOGNIZER_FILE = FACE_RECOGNIZER_FILE
DETECTOR_INPUT_SIZE = 64
EMBEDDING_DIM = 512

_STRIDES = (8, 16, 32)
_NUM_ANCHORS = 2
# Texture (mean of min(|dx|, |dy|) on the (x - 127.5) / 128 scale) at which a score crosses 0.5, and the
# logit slope: a flat image scores sigmoid(-3) ~ 0.05, a photo's face region (~0.1) scores ~ 0.999.
_TEXTURE_THRESHOLD = 0.03
_TEXTURE_SLOPE = 100.0
_ABSENT_LOGIT = -12.0
_RING = 4
"""Width in pixels of the ring whose four sides must each be flat around an ``isolated`` face."""
_OPSET = 17


@dataclass(frozen=True)
class TinyFace:
    """Where the tiny detector reports a face, in its 64x64 input: the anchor it uses and the box."""

    stride: int
    anchor_x: int
    anchor_y: int
    box: tuple[int, int, int, int]  # x1, y1, x2, y2
    isolated: bool = False  # reported only when each side of the ring of _RING pixels around the box is flat

    @property
    def anchor_row(self) -> int:
        """Row of the anchor in the flattened ``(H/s)(W/s)*2`` output, first of its two anchors."""
        width = DETECTOR_INPUT_SIZE // self.stride
        return ((self.anchor_y // self.stride) * width + self.anchor_x // self.stride) * _NUM_ANCHORS

    def keypoints(self) -> list[tuple[float, float]]:
        """Eyes, nose tip and mouth corners, placed like on a frontal face inside the box."""
        x1, y1, x2, y2 = self.box
        w, h = x2 - x1, y2 - y1
        rel = [(0.3, 0.38), (0.7, 0.38), (0.5, 0.58), (0.35, 0.78), (0.65, 0.78)]
        return [(x1 + fx * w, y1 + fy * h) for fx, fy in rel]


TINY_FACES = (
    TinyFace(stride=8, anchor_x=32, anchor_y=24, box=(20, 11, 44, 41)),
    TinyFace(stride=16, anchor_x=48, anchor_y=48, box=(42, 44, 54, 60), isolated=True),
)


class TinySCRFD(nn.Module):
    """Scores each of ``faces`` (:data:`TINY_FACES` unless given) by the texture inside its box (and, for an
    isolated one, the flatness of the ring around it); boxes and keypoints are fixed."""

    def __init__(self, faces: tuple[TinyFace, ...] = TINY_FACES) -> None:
        super().__init__()
        size = DETECTOR_INPUT_SIZE
        masks = torch.zeros(len(faces), size - 1, size - 1)
        sides = torch.zeros(len(faces), 4, size - 1, size - 1)  # the ring's four sides, each its own
        for i, face in enumerate(faces):
            x1, y1, x2, y2 = face.box
            masks[i, y1:y2, x1:x2] = 1.0
            top, bottom, left, right = max(y1 - _RING, 0), y2 + _RING, max(x1 - _RING, 0), x2 + _RING
            sides[i, 0, top:y1, left:right] = sides[i, 1, y2:bottom, left:right] = 1.0
            sides[i, 2, y1:y2, left:x1] = sides[i, 3, y1:y2, x2:right] = 1.0
        for i, j in itertools.permutations(range(len(faces)), 2):  # another face is not the surroundings
            x1, y1, x2, y2 = faces[j].box
            sides[i, :, max(y1 - 1, 0) : y2 + 1, max(x1 - 1, 0) : x2 + 1] = 0.0
        self.register_buffer("region_weights", masks / masks.sum(dim=(1, 2), keepdim=True))
        self.register_buffer("side_weights", sides / sides.sum(dim=(2, 3), keepdim=True).clamp(min=1.0))
        # A face that need not be isolated gets a ring logit so high that it never decides the score.
        self.register_buffer("ring_bias", torch.tensor([0.0 if face.isolated else 1e4 for face in faces]))
        for stride in _STRIDES:
            n = (size // stride) ** 2 * _NUM_ANCHORS
            select = torch.zeros(len(faces), n, 1)
            bbox = torch.zeros(n, 4)
            kps = torch.zeros(n, 10)
            for i, face in enumerate(faces):
                if face.stride != stride:
                    continue
                row = face.anchor_row
                select[i, row, 0] = 1.0
                x1, y1, x2, y2 = face.box
                cx, cy = face.anchor_x, face.anchor_y
                bbox[row] = torch.tensor([cx - x1, cy - y1, x2 - cx, y2 - cy], dtype=torch.float32) / stride
                offsets = [[(px - cx) / stride, (py - cy) / stride] for px, py in face.keypoints()]
                kps[row] = torch.tensor(offsets).flatten()
            self.register_buffer(f"select{stride}", select)
            self.register_buffer(f"bbox{stride}", bbox)
            self.register_buffer(f"kps{stride}", kps)

    def forward(self, x: torch.Tensor):
        image = x[0]
        dx = (image[:, :-1, 1:] - image[:, :-1, :-1]).abs()
        dy = (image[:, 1:, :-1] - image[:, :-1, :-1]).abs()
        texture = torch.minimum(dx, dy).mean(dim=0)  # (63, 63)
        region_texture = (texture.unsqueeze(0) * self.region_weights).sum(dim=(1, 2))  # (faces,)
        ring_texture = (texture * self.side_weights).sum(dim=(2, 3)).amax(dim=1)  # (faces,): its busiest side
        textured = (region_texture - _TEXTURE_THRESHOLD) * _TEXTURE_SLOPE
        apart = (_TEXTURE_THRESHOLD - ring_texture) * _TEXTURE_SLOPE + self.ring_bias
        logits = torch.minimum(textured, apart) - _ABSENT_LOGIT
        zero = region_texture.sum() * 0.0  # ties the constant outputs to the input
        scores, boxes, points = [], [], []
        for stride in _STRIDES:
            select = getattr(self, f"select{stride}")
            scores.append(torch.sigmoid((select * logits.view(-1, 1, 1)).sum(dim=0) + _ABSENT_LOGIT))
            boxes.append(getattr(self, f"bbox{stride}") + zero)
            points.append(getattr(self, f"kps{stride}") + zero)
        return (*scores, *boxes, *points)


class TinyArcFace(nn.Module):
    """112x112 face crop -> 512 numbers: one strided conv, pooling and a linear layer."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=7, stride=7)
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(8 * 4 * 4, EMBEDDING_DIM)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * (1.0 / param[0].numel() ** 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.pool(torch.tanh(self.conv(x)))
        return self.fc(features.flatten(1))


def _export(module: nn.Module, example: torch.Tensor, path: Path, output_names: list[str], dynamic_axes=None) -> None:
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["input.1"],
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=_OPSET,
            dynamo=False,
        )


def write_tiny_face_models(directory: Path, faces: tuple[TinyFace, ...] = TINY_FACES) -> None:
    """Write tiny ``scrfd_10g_bnkps.onnx`` and ``glintr100.onnx`` into ``directory`` (created if needed); the
    detector knows ``faces`` (a test may place a face elsewhere, e.g. at the image's edge, with its own)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    size = DETECTOR_INPUT_SIZE
    names = [f"{kind}_{stride}" for kind in ("score", "bbox", "kps") for stride in _STRIDES]
    _export(TinySCRFD(faces), torch.zeros(1, 3, size, size), directory / DETECTOR_FILE, names)
    _export(
        TinyArcFace(),
        torch.zeros(1, 3, 112, 112),
        directory / RECOGNIZER_FILE,
        ["embedding"],
        dynamic_axes={"input.1": {0: "None"}, "embedding": {0: "None"}},
    )
