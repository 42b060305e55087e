"""The model registry, and where model files come from: a local directory, or the Hugging Face hub's cache.

:data:`REGISTRY` is the one table of every published model inference and training load: which setting chooses it, its
hub repo, the files taken from it, its licence and its approximate download size; :data:`METRIC_MODELS` is
the same for the evaluation's metric networks, which are published outside the hub. The loaders
(``memo.loading``, ``MemoPipeline.from_checkpoint``, training), ``scripts/download_models.py``, the ComfyUI
node and the README's model table all read it.

Downloads go through huggingface_hub (resumable, cached, and honouring ``HF_HUB_OFFLINE``); only the files
a model needs are fetched. When some cannot be had, :func:`missing_models_message` says in one short block
which are missing, the one command that downloads them all, and how to use local folders instead.
"""

from __future__ import annotations

import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

from memo.environment import memo_cache_dir
from memo.errors import UserError
from memo.io.partial import Partial

NETWORK_FOLDERS = ("reference_net", "diffusion_net", "image_proj", "audio_proj")
"""The four MEMO networks, each a folder (``config.json`` + weights) of a checkpoint in the published layout."""
FACE_MODELS_FOLDER = "misc/face_analysis/models"
FACE_DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
FACE_RECOGNIZER_FILE = "glintr100.onnx"
VOCAL_SEPARATOR_FOLDER = "misc/vocal_separator"
VOCAL_SEPARATOR_FILE = "Kim_Vocal_2.onnx"
EMOTION_CLASSIFIER_FOLDER = "misc/audio_emotion_classifier"
CHECKPOINT_VAE_FOLDER = "vae"
"""A checkpoint may carry its own VAE in this folder (the tiny pack, finetuned checkpoints)."""
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
WAV2VEC_FILES = ("config.json", "preprocessor_config.json", "*.safetensors")
EMOTION2VEC_FILES = ("config.yaml", "model.pt")

MEMO_REPO = "memoavatar/memo"
"""The published MEMO release: the networks, face analysis, vocal separator and emotion classifier."""

DOWNLOAD_COMMAND = "uv run scripts/download_models.py"
"""The project command that downloads every model of :data:`REGISTRY` into the Hugging Face cache, in the form of
the README's commands (``uv run``; no extra: the download needs none, and ``uv run`` keeps the extras installed).
Every message that names it takes it from here; tests/test_round3_leftovers.py holds the README to it."""


@dataclass(frozen=True)
class HubModel:
    """One row of the registry. ``setting`` is the inference/training setting that chooses the model (a local
    folder in the same layout may stand in for the repo); ``files`` are the repo paths fetched (glob patterns)."""

    component: str
    setting: str
    repo_id: str
    files: tuple[str, ...]
    licence: str
    megabytes: int
    """Approximate download size in MB (10^6 bytes)."""

    @property
    def size(self) -> str:
        return size_text(self.megabytes)


def size_text(megabytes: float) -> str:
    """``"335 MB"`` or ``"about 10.5 GB"``."""
    return f"{megabytes:.0f} MB" if megabytes < 1000 else f"about {megabytes / 1000:.1f} GB"


REGISTRY: dict[str, HubModel] = {
    model.component: model
    for model in (
        HubModel(
            "networks",
            "model_name_or_path",
            MEMO_REPO,
            tuple(f"{name}/*" for name in NETWORK_FOLDERS) + (f"{EMOTION_CLASSIFIER_FOLDER}/*",),
            "Apache-2.0 (the MEMO release)",
            10500,
        ),
        HubModel(
            "face_analysis",
            "model_name_or_path",
            MEMO_REPO,
            (f"{FACE_MODELS_FOLDER}/{FACE_DETECTOR_FILE}", f"{FACE_MODELS_FOLDER}/{FACE_RECOGNIZER_FILE}"),
            "insightface's models: non-commercial research use",
            270,
        ),
        HubModel(
            "vocal_separator",
            "model_name_or_path",
            MEMO_REPO,
            (f"{VOCAL_SEPARATOR_FOLDER}/{VOCAL_SEPARATOR_FILE}",),
            "UVR's MDX-Net model, as redistributed by MEMO",
            67,
        ),
        HubModel("vae", "vae", "stabilityai/sd-vae-ft-mse", VAE_FILES, "MIT", 335),
        HubModel("wav2vec", "wav2vec", "facebook/wav2vec2-base-960h", WAV2VEC_FILES, "Apache-2.0", 380),
        HubModel(
            "emotion2vec",
            "emotion2vec",
            "emotion2vec/emotion2vec_plus_large",
            EMOTION2VEC_FILES,
            "emotion2vec's model licence",
            1200,
        ),
    )
}

VAE_REPO = REGISTRY["vae"].repo_id
WAV2VEC_REPO = REGISTRY["wav2vec"].repo_id
EMOTION2VEC_REPO = REGISTRY["emotion2vec"].repo_id


class MissingModelError(UserError, RuntimeError):
    """A model's files are neither in a local directory nor obtainable from the hub.

    ``missing`` lists ``(setting, name, reason)`` for each model that could not be had, so that several can
    be reported in one message (:func:`missing_models_message`)."""

    def __init__(self, message: str, missing: Sequence[tuple[str, str, str]] = ()):
        super().__init__(message)
        self.missing = list(missing)


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE``)."""
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


PROBE_REUSE_SECONDS = 60.0
"""How long one answer of :func:`hub_unreachable` stands (a program loading several models asks once; a web app
running for days asks again after the network came back)."""
_PROBES: dict[str, tuple[float, str | None]] = {}


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached now, in a few words, or None when it answers (any HTTP status counts).

    One ``HEAD`` of the hub's address (``HF_ENDPOINT``) through huggingface_hub's own HTTP session (its proxies
    and certificates), waiting at most ``HF_HUB_ETAG_TIMEOUT`` seconds, huggingface_hub's own wait for a file's
    metadata (default 10). Without it an unreachable network cost each model its own wait, and a network that
    takes the connection but never answers (a firewall, a captive portal) held the first download for good:
    huggingface_hub lists a repo's files with no timeout. The answer is reused for :data:`PROBE_REUSE_SECONDS`.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    endpoint = constants.ENDPOINT
    asked, reason = _PROBES.get(endpoint, (-PROBE_REUSE_SECONDS, None))
    if time.monotonic() - asked < PROBE_REUSE_SECONDS:
        return reason
    try:
        get_session().head(endpoint, timeout=float(constants.HF_HUB_ETAG_TIMEOUT))
        reason = None
    except Exception as error:  # noqa: BLE001 - no answer, whatever the HTTP library calls it (httpx2, requests)
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = f"{endpoint}: {type(error).__name__}" + (f": {text}" if text else "")
    _PROBES[endpoint] = (time.monotonic(), reason)
    return reason


def _short_reason(error: BaseException) -> str:
    """Why a download failed, in a few words rather than huggingface_hub's paragraph."""
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or hub_offline():
        return "not downloaded, and the hub cannot be reached" + (" (HF_HUB_OFFLINE is set)" if hub_offline() else "")
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status == 404:
            return "no such repo or file on the hub (check the name)"
        if status in (401, 403):
            return "the hub refused access (log in with `hf auth login` if the repo is gated)"
        return f"the hub answered HTTP {status}"
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else 'download failed'}"


def resolve_model_dir(
    name_or_path: str | os.PathLike,
    allow_patterns: Sequence[str] | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    setting: str = "model",
) -> Path:
    """Return a local directory holding the model ``name_or_path``.

    A path to an existing directory is returned as it is. Anything else is taken as a hub repo id and the files
    matching ``allow_patterns`` are fetched into (or found in) the hub cache. Raises :class:`MissingModelError`
    (one short line; ``setting`` names the setting that chose the model) when they cannot be had.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        reason = "no such folder"
        raise MissingModelError(f"{setting}={name}: {reason}.", [(setting, name, reason)])
    # Offline, the cache alone is looked at, at once (a quick probe tells, rather than each download's own wait).
    unreachable = None if hub_offline() else hub_unreachable()
    try:
        local = snapshot_download(
            repo_id=name,
            allow_patterns=list(allow_patterns) if allow_patterns else None,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=unreachable is not None,
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
        reason = (
            f"not downloaded, and the hub cannot be reached ({unreachable})" if unreachable else _short_reason(error)
        )
        raise MissingModelError(missing_models_message([(setting, name, reason)]), [(setting, name, reason)]) from None
    return Path(local)


def registry_entries(repo_id: str) -> list[HubModel]:
    """The registry rows taken from ``repo_id`` (several for ``memoavatar/memo``)."""
    return [model for model in REGISTRY.values() if model.repo_id == repo_id]


def missing_models_message(missing: Iterable[tuple[str, str, str]]) -> str:
    """One short block for models that cannot be had: each ``setting=name: reason`` (with its size when it is
    a registry repo), the one command that downloads every published model, and how to use local folders."""
    missing = list(dict.fromkeys(missing))
    lines = [f"{len(missing)} model{'s are' if len(missing) > 1 else ' is'} not available:"]
    for setting, name, reason in missing:
        rows = registry_entries(name)
        size = f" ({size_text(sum(row.megabytes for row in rows))})" if rows else ""
        lines.append(f"  - {setting}={name}{size}: {reason}")
    published = [name for _, name, _ in missing if registry_entries(name)]
    if published:
        lines.append(f"  Download every published model once, with network access: {DOWNLOAD_COMMAND}")
    settings = " ".join(dict.fromkeys(f"{setting}=DIR" for setting, _, _ in missing))
    lines.append(f"  Or point at local folders in the same layout: {settings} (in the config or as key=value).")
    return "\n".join(lines)


def download_all(
    components: Sequence[str] | None = None, cache_dir: str | os.PathLike | None = None, force: bool = False
) -> dict[str, Path]:
    """Download the files of the registry rows ``components`` (default: all) into the hub cache (or
    ``cache_dir``), one ``snapshot_download`` per repo; returns each repo's local folder. Already cached files
    are not fetched again unless ``force`` (which replaces damaged ones). Raises :class:`MissingModelError` at
    once when the hub does not answer (:func:`hub_unreachable`)."""
    if not hub_offline() and (unreachable := hub_unreachable()) is not None:
        raise MissingModelError(
            f"the hub cannot be reached ({unreachable}); check the network (or HF_ENDPOINT and the proxy "
            "settings) and run the command again."
        )
    wanted = [REGISTRY[name] for name in (components or REGISTRY)]
    patterns: dict[str, list[str]] = {}
    for model in wanted:
        patterns.setdefault(model.repo_id, []).extend(model.files)
    return {
        repo: Path(snapshot_download(repo_id=repo, allow_patterns=files, cache_dir=cache_dir, force_download=force))
        for repo, files in patterns.items()
    }


@dataclass(frozen=True)
class FileModel:
    """One row of :data:`METRIC_MODELS`: a model file published outside the Hugging Face hub, kept as
    ``<models folder>/metrics/<file>``: what it is, the address it is published at, its licence."""

    name: str
    file: str
    what: str
    url: str
    licence: str


METRIC_MODELS: dict[str, FileModel] = {
    model.name: model
    for model in (
        FileModel(
            "inception",
            "weights-inception-2015-12-05-6726825d.pth",
            "The FID Inception-v3 (torch-fidelity's port of TensorFlow's 2015-12-05 graph, pool3 2048-d features)",
            "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
            "Apache-2.0 (TensorFlow models)",
        ),
        FileModel(
            "i3d",
            "i3d_pretrained_400.pt",
            "The FVD I3D (Kinetics-400, as cd-fvd and TATS load it)",
            "https://github.com/songweige/TATS/raw/main/tats/fvd/i3d_pretrained_400.pt",
            "Apache-2.0 (DeepMind kinetics-i3d), port MIT (TATS)",
        ),
        FileModel(
            "syncnet",
            "syncnet_v2.model",
            "SyncNet (syncnet_v2, VGG Oxford) for Sync-C / Sync-D",
            "https://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model",
            "MIT (joonson/syncnet_python)",
        ),
    )
}
"""The evaluation's metric networks (``scripts/evaluate.py``), the second table of the registry. They are never
fetched implicitly (evaluation must give the same numbers offline as online); ``scripts/download_models.py
--metrics DIR`` fetches them once."""

METRICS_FOLDER = "metrics"
"""The folder of a models folder (``evaluate.py --models``, the tiny pack) that holds the metric files."""


def default_metric_models_dir() -> Path:
    """Where the metric files are kept by default: ``$MEMO_EVAL_MODELS``, else ``$XDG_CACHE_HOME/memo/evaluation``
    (``~/.cache/memo/evaluation``)."""
    if os.environ.get("MEMO_EVAL_MODELS"):
        return Path(os.environ["MEMO_EVAL_MODELS"]).expanduser()
    return memo_cache_dir() / "evaluation"


def metric_download_command(models_dir: str | os.PathLike) -> str:
    """The project command that downloads every metric file into ``models_dir``."""
    return f"{DOWNLOAD_COMMAND} --metrics {models_dir}"


def require_model_file(models_dir: str | os.PathLike, model: FileModel) -> Path:
    """``models_dir/metrics/<file>`` when it is a file; otherwise a :class:`MissingModelError` in one line naming
    what the file is, the command that downloads it (the project's, and ``curl`` from its address) and its
    licence."""
    models_dir = Path(models_dir).expanduser()
    path = models_dir / METRICS_FOLDER / model.file
    if path.is_file():
        return path
    raise MissingModelError(
        f"{model.what} is missing: {path} does not exist. Download it once with "
        f"`{metric_download_command(models_dir)}` (or `mkdir -p {path.parent} && curl -L -o {path} {model.url}`; "
        f"licence: {model.licence}), or give --models a folder that holds it (a tiny random stand-in: "
        "scripts/make_tiny_checkpoint.py)."
    )


def download_metric_models(models_dir: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Fetch the files of :data:`METRIC_MODELS` ``names`` (default: all) that ``models_dir/metrics`` lacks, each
    written under a temporary name and renamed into place when complete; returns every file's path.

    Raises :class:`MissingModelError` when ``HF_HUB_OFFLINE`` is set (the program is told not to use the
    network) and a file is missing, or when a download fails (the files already complete are kept).
    """
    folder = Path(models_dir).expanduser() / METRICS_FOLDER
    paths = []
    for model in (METRIC_MODELS[name] for name in (names or METRIC_MODELS)):
        path = folder / model.file
        paths.append(path)
        if path.is_file():
            continue
        if hub_offline():
            raise MissingModelError(
                f"{model.what} is missing from {folder} and HF_HUB_OFFLINE is set; unset it to download {model.url}."
            )
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with Partial(path) as partial, urllib.request.urlopen(model.url, timeout=60) as response:
                with open(partial.path, "wb") as out:
                    shutil.copyfileobj(response, out, length=1 << 20)
                partial.publish(sync=True)
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", None) or error
            raise MissingModelError(
                f"{model.what}: the download from {model.url} failed ({reason}); check the network and run "
                "the command again."
            ) from None
    return paths
