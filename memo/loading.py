"""Finding and loading every model the program uses, once.

:func:`locate_models` finds each model in a local directory or fetches it from the Hugging Face hub, and
reports everything that is missing in one error. :class:`ConditionModels` holds the models that turn user
files into conditions (wav2vec2, face analysis, vocal separation, the emotion models); inference and
training-data preparation share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from memo.conditions.audio_features import Wav2VecAudioEncoder
from memo.conditions.face import FaceAnalyzer
from memo.conditions.vocals import VocalSeparator
from memo.io.hub import MissingModelError, resolve_model_dir
from memo.models.emotion2vec import Emotion2VecEncoder
from memo.models.emotion_classifier import AudioEmotionClassifierModel
from memo.pipeline import NETWORKS
from memo.settings.inference import ConfigError, InferenceConfig

FACE_MODELS = ("scrfd_10g_bnkps.onnx", "glintr100.onnx")
SEPARATOR_MODEL = "Kim_Vocal_2.onnx"
PUBLISHED_REPO = "memoavatar/memo"


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA, else Apple MPS, else CPU.

    CUDA without an index means the current device (which a launcher's process sets), named explicitly so
    that face analysis in onnxruntime runs on the same GPU as the rest. Raises :class:`ConfigError` when
    CUDA or MPS is asked for on a machine without it.
    """
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={name} but PyTorch finds no CUDA GPU here; use device=auto or device=cpu.")
        mps = getattr(torch.backends, "mps", None)
        if device.type == "mps" and (mps is None or not mps.is_available()):
            raise ConfigError(f"device={name} but this machine has no Apple MPS; use device=auto or device=cpu.")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class ModelFiles:
    """Local directories of every model, found or fetched once at start-up."""

    memo: Path
    misc: Path
    vae: str | Path
    wav2vec: Path
    emotion2vec: Path | None


def locate_models(config: InferenceConfig, need_emotion2vec: bool) -> ModelFiles:
    """Find or fetch every model; when some cannot be had, one error lists all of them."""
    separate = config.vocal_separation
    misc_files = [f"misc/face_analysis/models/{name}" for name in FACE_MODELS]
    misc_files += [f"misc/vocal_separator/{SEPARATOR_MODEL}"] if separate else []
    memo_patterns = [f"{name}/*" for name in NETWORKS] + ["vae/*", "misc/audio_emotion_classifier/*"]
    problems: list[str] = []
    found: dict[str, Path | None] = {}

    def attempt(key: str, name: str, patterns: list[str]) -> None:
        try:
            found[key] = resolve_model_dir(name, patterns, cache_dir=config.model_cache_dir)
        except MissingModelError as error:
            problems.append(str(error))
            found[key] = None

    attempt("memo", config.model_name_or_path, memo_patterns + ([] if config.misc_model_dir else misc_files))
    memo_root = found["memo"]
    if config.misc_model_dir:
        attempt("misc", config.misc_model_dir, misc_files)
    elif memo_root is not None and not all((memo_root / path).is_file() for path in misc_files):
        # A finetuned checkpoint holds only the networks: face analysis and vocal separation come from the
        # published repo, as when no checkpoint is given.
        attempt("misc", PUBLISHED_REPO, misc_files)
    else:
        found["misc"] = memo_root
    vae: str | Path = config.vae
    if memo_root is not None and (memo_root / "vae").is_dir() and config.vae == InferenceConfig.vae:
        vae = memo_root / "vae"
    else:
        attempt("vae", str(config.vae), ["config.json", "diffusion_pytorch_model.safetensors"])
        vae = found.get("vae") or vae
    attempt("wav2vec", config.wav2vec, ["config.json", "preprocessor_config.json", "*.safetensors"])
    if need_emotion2vec:
        attempt("emotion2vec", config.emotion2vec, ["config.yaml", "model.pt"])
    if found["misc"] is not None:
        missing = [path for path in misc_files if not (found["misc"] / path).is_file()]
        if missing:
            problems.append(f"{found['misc']} lacks {', '.join(missing)} (from the memoavatar/memo repo).")
    if problems:
        raise MissingModelError("Some models are not available:\n  - " + "\n  - ".join(problems))
    return ModelFiles(
        memo=found["memo"], misc=found["misc"], vae=vae, wav2vec=found["wav2vec"], emotion2vec=found.get("emotion2vec")
    )


@dataclass
class ConditionModels:
    """The models that turn an image and an audio file into MEMO's conditions; emotion2vec loads on first use."""

    audio_encoder: Wav2VecAudioEncoder
    face_analyzer: FaceAnalyzer
    separator: VocalSeparator | None
    classifier: AudioEmotionClassifierModel
    emotion2vec_source: str | Path
    device: torch.device
    cache_dir: str | None = None
    _emotion_encoder: Emotion2VecEncoder | None = field(default=None, repr=False)

    @classmethod
    def load(
        cls,
        files: ModelFiles,
        config: InferenceConfig,
        device: torch.device,
        face_det_size: tuple[int, int] = (640, 640),
    ) -> ConditionModels:
        audio_encoder = Wav2VecAudioEncoder.from_pretrained(files.wav2vec, chunk_seconds=config.audio_chunk_seconds)
        face_analyzer = FaceAnalyzer.from_dir(
            files.misc / "misc" / "face_analysis" / "models", device=str(device), det_size=face_det_size
        )
        separator = (
            VocalSeparator.from_dir(files.misc / "misc" / "vocal_separator", SEPARATOR_MODEL)
            if config.vocal_separation
            else None
        )
        classifier = AudioEmotionClassifierModel.from_pretrained(files.memo / "misc" / "audio_emotion_classifier")
        return cls(
            audio_encoder=audio_encoder.to(device),
            face_analyzer=face_analyzer,
            separator=separator,
            classifier=classifier.to(device).eval(),
            emotion2vec_source=files.emotion2vec or config.emotion2vec,
            device=device,
            cache_dir=config.model_cache_dir,
        )

    def networks(self) -> list[torch.nn.Module]:
        """The torch networks among the condition models (emotion2vec once loaded). Face analysis and vocal
        separation run in ONNX Runtime sessions, which stay where they were created."""
        encoder = [self._emotion_encoder] if self._emotion_encoder is not None else []
        return [self.audio_encoder.model, self.classifier, *encoder]

    def to(self, device: torch.device) -> ConditionModels:
        """Move the torch models (wav2vec2, the emotion models) to ``device``; face analysis and vocal separation
        stay on the ONNX Runtime device chosen at load."""
        self.audio_encoder.to(device)
        self.classifier.to(device)
        if self._emotion_encoder is not None:
            self._emotion_encoder.to(device)
        self.device = device
        return self

    @property
    def emotion_encoder(self) -> Emotion2VecEncoder:
        """emotion2vec, loaded on first use (not needed when the emotion is forced)."""
        if self._emotion_encoder is None:
            source = resolve_model_dir(self.emotion2vec_source, ["config.yaml", "model.pt"], cache_dir=self.cache_dir)
            self._emotion_encoder = Emotion2VecEncoder.from_pretrained(source, device=self.device)
        return self._emotion_encoder
