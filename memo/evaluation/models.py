"""The metric networks: where each file lives in a model folder, where it is published, its licence, and loaders.

A model folder (``--models``) holds ``metrics/<file>`` for each network of the registry's
:data:`memo.io.hub.METRIC_MODELS` (where each is published, its licence) and ``misc/face_analysis/models``
(the ArcFace recognizer and SCRFD detector MEMO itself loads), as the published ``memoavatar/memo`` repo and
the tiny pack (``scripts/make_tiny_checkpoint.py``) lay them out. Nothing is downloaded implicitly: a missing
file is one error line with the download command.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from memo.conditions.face import FaceAnalyzer
from memo.errors import import_runtime
from memo.io.hub import (
    DOWNLOAD_COMMAND,
    FACE_MODELS_FOLDER,
    MEMO_REPO,
    METRIC_MODELS,
    MissingModelError,
    default_metric_models_dir,
    metric_download_command,
    require_model_file,
    resolve_model_dir,
)
from memo.io.model_files import DamagedModelError, file_problem
from memo.models.syncnet import SyncNet

FACE_MODELS = FACE_MODELS_FOLDER
FACE_REPO = MEMO_REPO
"""Where the face models come from when the model folder has none."""


INCEPTION, I3D, SYNCNET = (METRIC_MODELS[name] for name in ("inception", "i3d", "syncnet"))
default_models_dir = default_metric_models_dir


class MetricModels:
    """Lazy access to the metric networks of one model folder; each is loaded once, on first use."""

    def __init__(self, root: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        self.root = Path(root).expanduser()
        self.device = torch.device(device)
        self._loaded: dict[str, object] = {}

    def path(self, name: str) -> Path:
        """The file of metric network ``name`` (a key of :data:`memo.io.hub.METRIC_MODELS`); MissingModelError
        (one line with the download command) when absent, DamagedModelError (the same, with ``rm``) when damaged."""
        model = METRIC_MODELS[name]
        path = require_model_file(self.root, model)
        problem = file_problem(path)
        if problem is not None:
            raise DamagedModelError(
                f"{path} {problem}: download it again: `rm {path} && {metric_download_command(self.root)}`"
            )
        return path

    def fingerprint(self, name: str) -> str:
        """A short hash of network ``name``'s file (size, mtime, head bytes): features cached with other
        weights are not reused."""
        if name == "face":
            folder = self.face_dir()
            files = sorted(folder.glob("*.onnx"))
        else:
            files = [self.path(name)]
        digest = hashlib.sha1()
        for file in files:
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            with open(file, "rb") as handle:
                digest.update(handle.read(1 << 16))
        return digest.hexdigest()[:16]

    def face_dir(self) -> Path:
        """The face-analysis folder: the model folder's own, else the published repo's through the hub cache."""
        local = self.root / FACE_MODELS
        if local.is_dir():
            return local
        try:
            return resolve_model_dir(FACE_REPO, [f"{FACE_MODELS}/*"]) / FACE_MODELS
        except MissingModelError as error:
            raise MissingModelError(
                f"The face-analysis models (the face box of the Sync and motion metrics, the identity of CSIM) are "
                f"not in {local} nor in the Hugging Face cache: download MEMO's models once with "
                f"`{DOWNLOAD_COMMAND}` (they hold them), or point --models at a folder holding {FACE_MODELS}/."
            ) from error

    def inception(self):
        """torch-fidelity's ``FeatureExtractorInceptionV3`` with the pool3 ('2048') output, on ``device``."""
        if "inception" not in self._loaded:
            module = import_runtime("torch_fidelity.feature_extractor_inceptionv3")
            extractor = module.FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(self.path("inception"))
            )
            self._loaded["inception"] = extractor.to(self.device)
        return self._loaded["inception"]

    def i3d(self):
        """cd-fvd's ``InceptionI3d`` (400 Kinetics logits, the StyleGAN-V / TATS FVD features), on ``device``."""
        if "i3d" not in self._loaded:
            net = import_runtime("cdfvd.third_party.i3d.pytorch_i3d").InceptionI3d(400, in_channels=3)
            state = torch.load(self.path("i3d"), map_location="cpu", weights_only=True)
            net.load_state_dict({k: v.float() for k, v in state.items()})
            self._loaded["i3d"] = net.eval().requires_grad_(False).to(self.device)
        return self._loaded["i3d"]

    def syncnet(self) -> SyncNet:
        """SyncNet from ``syncnet_v2.model``, on ``device``."""
        if "syncnet" not in self._loaded:
            state = torch.load(self.path("syncnet"), map_location="cpu", weights_only=True)
            self._loaded["syncnet"] = SyncNet.from_state_dict(state).requires_grad_(False).to(self.device)
        return self._loaded["syncnet"]

    def faces(self) -> FaceAnalyzer:
        """The project's face analyzer (SCRFD + ArcFace) on the face-analysis folder."""
        if "face" not in self._loaded:
            device = "cuda" if self.device.type == "cuda" else "cpu"
            self._loaded["face"] = FaceAnalyzer.from_dir(self.face_dir(), device=device)
        return self._loaded["face"]
