"""A complete tiny model pack: every model the program loads, random and small, plus a config using it.

The pack mirrors the published layouts: the MEMO networks and ``misc/`` (face analysis, vocal separator,
emotion classifier) as in the ``memoavatar/memo`` repo, and ``vae/``, ``wav2vec2/`` and ``emotion2vec/``
as their own repos, and ``metrics/``: stand-ins of the evaluation's Inception, I3D and SyncNet
(:mod:`memo.tiny.metric_models`), so ``scripts/evaluate.py --models PACK`` runs too. ``inference.yaml``
points every model setting at it, so ``inference.py`` runs end to end with no download, in seconds on a
CPU. The videos it makes are noise: it exercises code, not quality.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from omegaconf import OmegaConf

from memo.environment import memo_cache_dir
from memo.errors import UserError
from memo.io.hub import CHECKPOINT_VAE_FOLDER, FACE_MODELS_FOLDER, VOCAL_SEPARATOR_FOLDER
from memo.io.partial import Partial
from memo.tiny.face_models import write_tiny_face_models
from memo.tiny.metric_models import write_tiny_metric_models
from memo.tiny.networks import write_emotion2vec, write_memo_networks, write_vae, write_wav2vec2
from memo.tiny.separator import write_tiny_vocal_separator


class TinyPackError(UserError, OSError):
    """The tiny pack cannot be built where it is kept (a read-only or full cache folder)."""


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


def cached_tiny_pack(cache_dir: str | Path | None = None) -> Path:
    """The tiny pack in ``cache_dir`` (default: :func:`memo.environment.memo_cache_dir`, which honours
    ``XDG_CACHE_HOME``), built there on first use; returns its config. Raises :class:`TinyPackError` (what to set)
    when that folder cannot be written.

    The folder is named after a digest of the code that writes the pack, so a changed pack is built anew
    rather than an old one reused. It is built in a hidden, locked folder beside it and renamed when complete:
    an interrupted build leaves no half pack behind, and one killed with ``kill -9`` is removed by the next build.
    """
    source = b"".join(path.read_bytes() for path in sorted(Path(__file__).parent.glob("*.py")))
    root = Path(cache_dir or memo_cache_dir()).expanduser() / f"tiny-pack-{hashlib.sha256(source).hexdigest()[:12]}"
    config = root / "inference.yaml"
    if config.is_file():
        return config
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        # A locked hidden folder: a build killed with kill -9 is removed by the next one (memo.io.partial).
        building = Partial(root, directory=True)
    except OSError as error:
        reason = error.strerror or error
        raise TinyPackError(
            f"--tiny cannot build its pack in {root.parent} ({reason}); point XDG_CACHE_HOME at a writable "
            "folder (e.g. XDG_CACHE_HOME=/tmp/cache), or write the pack with scripts/make_tiny_checkpoint.py DIR "
            "and pass --config DIR/inference.yaml."
        ) from None
    with building:
        write_tiny_pack(building.path)
        # The config names the pack's folders: write it again for where the pack will live.
        written = OmegaConf.load(building.path / "inference.yaml")
        for key in ("model_name_or_path", "vae", "wav2vec", "emotion2vec"):
            written[key] = str(root / Path(written[key]).relative_to(building.path.resolve()))
        OmegaConf.save(written, building.path / "inference.yaml")
        try:
            building.publish(replace=False)
        except OSError:  # another process finished first (FileExistsError, or ENOTEMPTY in a race): use its pack
            if not config.is_file():
                raise
    return config
