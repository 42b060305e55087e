"""A complete tiny model pack: every model the program loads, random and small, plus a config using it.

The pack mirrors the published layouts: the MEMO networks and ``misc/`` (face analysis, vocal separator,
emotion classifier) as in the ``memoavatar/memo`` repo, and ``vae/``, ``wav2vec2/`` and ``emotion2vec/``
as their own repos, and ``metrics/``: stand-ins of the evaluation's Inception, I3D and SyncNet
(:mod:`memo.tiny.metric_models`), so ``scripts/evaluate.py --models PACK`` runs too. ``inference.yaml``
points every model setting at it, so ``inference.py`` runs end to end with no download, in seconds on a
CPU. The videos it makes are noise: it exercises code, not quality.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from memo.io.hub import CHECKPOINT_VAE_FOLDER, FACE_MODELS_FOLDER, VOCAL_SEPARATOR_FOLDER
from memo.tiny.face_models import write_tiny_face_models
from memo.tiny.metric_models import write_tiny_metric_models
from memo.tiny.networks import write_emotion2vec, write_memo_networks, write_vae, write_wav2vec2
from memo.tiny.separator import write_tiny_vocal_separator

TINY_SETTINGS = {
    "resolution": 64,
    "inference_steps": 2,
    "weight_dtype": "fp32",
    "vae_batch_size": 16,
}


def write_tiny_pack(root: str | Path, seed: int = 0) -> Path:
    """Write the pack into ``root`` (created; existing files are replaced) and return its config path."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    write_memo_networks(root)
    write_tiny_face_models(root / FACE_MODELS_FOLDER)
    write_tiny_vocal_separator(root / VOCAL_SEPARATOR_FOLDER)
    write_vae(root / CHECKPOINT_VAE_FOLDER)
    write_wav2vec2(root / "wav2vec2")
    write_emotion2vec(root / "emotion2vec")
    write_tiny_metric_models(root / "metrics")
    config = {
        "model_name_or_path": str(root),
        "vae": str(root / CHECKPOINT_VAE_FOLDER),
        "wav2vec": str(root / "wav2vec2"),
        "emotion2vec": str(root / "emotion2vec"),
        **TINY_SETTINGS,
    }
    config_path = root / "inference.yaml"
    OmegaConf.save(OmegaConf.create(config), config_path)
    return config_path
