"""Finding and loading every model the program uses, once.

:func:`locate_models` finds each model in a local directory or fetches it from the Hugging Face hub, and
reports everything that is missing in one error. :class:`ConditionModels` holds the models that turn user
files into conditions (wav2vec2, face analysis, vocal separation, the emotion models); inference and
training-data preparation share it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memo.conditions.audio_features import Wav2VecAudioEncoder, wav2vec_spec
from memo.conditions.face import FaceAnalyzer
from memo.conditions.vocals import VocalSeparator
from memo.io.hub import (
    CHECKPOINT_VAE_FOLDER,
    EMOTION2VEC_FILES,
    EMOTION_CLASSIFIER_FOLDER,
    FACE_MODELS_FOLDER,
    MEMO_REPO,
    NETWORK_FOLDERS,
    REGISTRY,
    VAE_FILES,
    VAE_REPO,
    VOCAL_SEPARATOR_FILE,
    VOCAL_SEPARATOR_FOLDER,
    WAV2VEC_FILES,
    MissingModelError,
    missing_models_message,
    resolve_model_dir,
)
from memo.io.model_files import ModelFolder, check_model_files
from memo.io.model_load import ModelSpec, load_model, pretrained_spec, verify_models
from memo.models.emotion2vec import Emotion2VecEncoder
from memo.models.emotion_classifier import AudioEmotionClassifierModel
from memo.pipeline import checkpoint_specs
from memo.settings.inference import ConfigError, ModelSettings

CHECKPOINT_PATTERNS = list(REGISTRY["networks"].files) + [f"{CHECKPOINT_VAE_FOLDER}/*"]
"""What is fetched of a checkpoint in the published layout: the networks, the emotion classifier, and a ``vae/``
folder where the checkpoint carries its own."""
MISC_FILES = list(REGISTRY["face_analysis"].files)
SEPARATOR_FILES = list(REGISTRY["vocal_separator"].files)
NETWORK_FILES = [f"{folder}/{name}" for folder in NETWORK_FOLDERS for name in VAE_FILES]
"""The files the four networks load from a checkpoint (each folder's ``config.json`` and safetensors weights)."""
CLASSIFIER_FILES = [f"{EMOTION_CLASSIFIER_FOLDER}/{name}" for name in VAE_FILES]
"""The emotion classifier's files, in the same layout."""


def checkpoint_folders(model_name_or_path: str, root: Path, vae: str, vae_dir: Path) -> tuple[ModelFolder, ModelFolder]:
    """The checkpoint's folder and the VAE's, each named by the setting that chose it: the VAE's own ``vae``, or
    ``model_name_or_path`` where the checkpoint carries its own ``vae/`` and ``vae`` is left at its default."""
    own_vae = Path(vae_dir) == root / CHECKPOINT_VAE_FOLDER and vae == VAE_REPO
    return (
        ModelFolder("model_name_or_path", model_name_or_path, root, NETWORK_FILES + CLASSIFIER_FILES),
        ModelFolder(
            "model_name_or_path" if own_vae else "vae",
            model_name_or_path if own_vae else vae,
            Path(vae_dir),
            VAE_FILES,
            component="vae",
        ),
    )


def check_checkpoint_files(
    model_name_or_path: str,
    root: Path,
    vae: str,
    vae_dir: Path,
    extra: Sequence[ModelFolder] = (),
    extra_specs: Sequence[ModelSpec] = (),
) -> None:
    """Check every file the networks, the emotion classifier and the VAE load (and ``extra`` folders, and the
    models of ``extra_specs``) before anything loads: first each file's structure, then each config against its
    network and each network's weights against its config (:mod:`memo.io.model_load`, headers only). One
    :class:`~memo.io.model_files.DamagedModelError` names each missing or damaged file."""
    checkpoint, vae_folder = checkpoint_folders(model_name_or_path, root, vae, vae_dir)
    check_model_files([checkpoint, vae_folder, *extra])
    verify_models([*checkpoint_specs(checkpoint, vae_folder).values(), classifier_spec(checkpoint), *extra_specs])


def classifier_spec(checkpoint: ModelFolder) -> ModelSpec[AudioEmotionClassifierModel]:
    """How the checkpoint's emotion classifier is checked and loaded."""
    return pretrained_spec(AudioEmotionClassifierModel, checkpoint, EMOTION_CLASSIFIER_FOLDER)


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


class ModelLocator:
    """Finds or fetches models one after the other and collects every one that cannot be had, so that a single
    :class:`MissingModelError` (:meth:`check`) lists them all."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = cache_dir
        self.missing: list[tuple[str, str, str]] = []

    def find(self, setting: str, name: str | os.PathLike, patterns: list[str]) -> Path | None:
        """The local folder of ``name`` (chosen by ``setting``), or None when it cannot be had (remembered)."""
        try:
            return resolve_model_dir(name, patterns, cache_dir=self.cache_dir, setting=setting)
        except MissingModelError as error:
            self.missing += error.missing or [(setting, str(name), str(error))]
            return None

    def check(self) -> None:
        """Raise one :class:`MissingModelError` for everything that could not be had."""
        if self.missing:
            raise MissingModelError(missing_models_message(self.missing), self.missing)


def locate_checkpoint(
    locator: ModelLocator, model_name_or_path: str, vae: str, extra_files: list[str] | tuple[str, ...] = ()
) -> tuple[Path | None, Path | None]:
    """The checkpoint's folder (with ``extra_files`` of it fetched too) and the VAE's: the ``vae`` setting, or
    the checkpoint's own ``vae/`` folder while ``vae`` is left at its default. Inference, training and
    ``MemoPipeline.from_checkpoint`` callers find their networks through this."""
    root = locator.find("model_name_or_path", model_name_or_path, CHECKPOINT_PATTERNS + list(extra_files))
    if root is not None and (root / CHECKPOINT_VAE_FOLDER).is_dir() and vae == VAE_REPO:
        return root, root / CHECKPOINT_VAE_FOLDER
    return root, locator.find("vae", vae, list(VAE_FILES))


def locate_models(config: ModelSettings, need_emotion2vec: bool) -> ModelFiles:
    """Find or fetch every model; when some cannot be had, one :class:`MissingModelError` lists all of them
    with the command that downloads them (:func:`memo.io.hub.missing_models_message`)."""
    misc_files = MISC_FILES + (SEPARATOR_FILES if config.vocal_separation else [])
    locator = ModelLocator(config.model_cache_dir)
    with_misc = [] if config.misc_model_dir else misc_files
    memo_root, vae = locate_checkpoint(locator, config.model_name_or_path, config.vae, with_misc)
    if config.misc_model_dir:
        misc = locator.find("misc_model_dir", config.misc_model_dir, misc_files)
    elif memo_root is not None and not all((memo_root / path).is_file() for path in misc_files):
        # A finetuned checkpoint holds only the networks: face analysis and vocal separation come from the
        # published repo, as when no checkpoint is given.
        misc = locator.find("misc_model_dir", MEMO_REPO, misc_files)
    else:
        misc = memo_root
    wav2vec = locator.find("wav2vec", config.wav2vec, list(WAV2VEC_FILES))
    emotion2vec = locator.find("emotion2vec", config.emotion2vec, list(EMOTION2VEC_FILES)) if need_emotion2vec else None
    if misc is not None:
        lacking = [path for path in misc_files if not (misc / path).is_file()]
        if lacking:
            locator.missing.append(("misc_model_dir", str(misc), f"lacks {', '.join(lacking)} (from {MEMO_REPO})"))
    locator.check()
    wav2vec_folder = ModelFolder("wav2vec", config.wav2vec, wav2vec, list(WAV2VEC_FILES))
    extra = [wav2vec_folder]
    specs: list[ModelSpec] = [wav2vec_spec(wav2vec_folder)]
    if misc is not None:
        misc_setting = "misc_model_dir" if config.misc_model_dir else "model_name_or_path"
        misc_name = config.misc_model_dir or (config.model_name_or_path if misc == memo_root else MEMO_REPO)
        extra.append(ModelFolder(misc_setting, str(misc_name), misc, misc_files))
    if emotion2vec is not None:
        emotion_folder = ModelFolder("emotion2vec", config.emotion2vec, emotion2vec, list(EMOTION2VEC_FILES))
        extra.append(emotion_folder)
        specs.append(Emotion2VecEncoder.spec(emotion_folder))
    # Every model is checked here, emotion2vec (loaded on first use) included, before any of them loads.
    check_checkpoint_files(config.model_name_or_path, memo_root, config.vae, vae, extra, specs)
    return ModelFiles(memo=memo_root, misc=misc, vae=vae, wav2vec=wav2vec, emotion2vec=emotion2vec)


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
        config: ModelSettings,
        device: torch.device,
        face_det_size: tuple[int, int] = (640, 640),
    ) -> ConditionModels:
        audio_encoder = Wav2VecAudioEncoder.from_pretrained(files.wav2vec, chunk_seconds=config.audio_chunk_seconds)
        face_analyzer = FaceAnalyzer.from_dir(
            files.misc / FACE_MODELS_FOLDER, device=str(device), det_size=face_det_size
        )
        separator = (
            VocalSeparator.from_dir(files.misc / VOCAL_SEPARATOR_FOLDER, VOCAL_SEPARATOR_FILE)
            if config.vocal_separation
            else None
        )
        classifier = load_model(
            classifier_spec(ModelFolder("model_name_or_path", config.model_name_or_path, files.memo, ()))
        )
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
            source = resolve_model_dir(
                self.emotion2vec_source, list(EMOTION2VEC_FILES), cache_dir=self.cache_dir, setting="emotion2vec"
            )
            folder = ModelFolder("emotion2vec", str(self.emotion2vec_source), source, EMOTION2VEC_FILES)
            self._emotion_encoder = load_model(Emotion2VecEncoder.spec(folder, device=self.device))
        return self._emotion_encoder
