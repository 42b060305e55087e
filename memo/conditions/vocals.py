"""Vocal separation: the voice taken out of music before the audio models hear it.

It follows the original MEMO: audio-separator with UVR's MDX-Net model ``Kim_Vocal_2.onnx``
(``misc/vocal_separator/`` in the MEMO repo), run on the 16 kHz audio at audio-separator's 44.1 kHz, the
vocals converted back to 16 kHz. It never downloads anything: the files audio-separator would fetch from
the network (a list of known models and the parameters of each, looked up by a hash of the model file)
are written into a temporary folder next to a link to the model, so the model folder itself is only read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memo.constants import SAMPLE_RATE
from memo.errors import UserError, import_runtime
from memo.io.audio import load_audio
from memo.io.hub import VOCAL_SEPARATOR_FILE
from memo.io.partial import work_folder

logger = logging.getLogger("memo")


class VocalSeparatorError(UserError, RuntimeError):
    """The vocal separator cannot be set up or run; the message names the files involved and what to do."""


KIM_VOCAL_2_PARAMS: dict[str, Any] = {
    "compensate": 1.009,
    "mdx_dim_f_set": 3072,
    "mdx_dim_t_set": 8,
    "mdx_n_fft_scale_set": 7680,
    "primary_stem": "Vocals",
}
"""UVR's parameters for Kim_Vocal_2.onnx (66,759,214 bytes), keyed in UVR's model data by its hash below."""

KNOWN_MODEL_PARAMS: dict[str, dict[str, Any]] = {"970b3f9492014d18fefeedfe4773cb42": KIM_VOCAL_2_PARAMS}

_MODEL_DATA_KEYS = ("compensate", "mdx_dim_f_set", "mdx_dim_t_set", "mdx_n_fft_scale_set", "primary_stem")
_REQUIRED_MODEL_DATA = _MODEL_DATA_KEYS[:4]
_MDX_DEFAULTS: dict[str, Any] = {"hop_length": 1024, "overlap": 0.25, "batch_size": 1, "enable_denoise": False}
"""audio-separator's defaults, which the original MEMO uses. ``segment_size`` defaults to the model's dim_t,
so onnxruntime runs the model as it is (audio-separator converts it to torch otherwise)."""
_MDX_KEYS = ("hop_length", "segment_size", "overlap", "batch_size", "enable_denoise")
_DOWNLOAD_LISTS = (
    "vr_download_list",
    "mdx_download_list",
    "demucs_download_list",
    "mdx23c_download_list",
    "mdx_download_vip_list",
    "mdx23c_download_vip_list",
    "roformer_download_list",
)
_HASHED_BYTES = 10000 * 1024


def uvr_model_hash(path: str | os.PathLike) -> str:
    """The MD5 that UVR and audio-separator key model parameters by: of the whole file if it is smaller than
    10,240,000 bytes, else of its last 10,240,000 bytes."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _HASHED_BYTES) if size >= _HASHED_BYTES else 0)
        digest = hashlib.md5()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def params_sidecar_path(model_path: str | os.PathLike) -> Path:
    """Where parameters for a model file may be given beside it: ``Kim_Vocal_2.onnx`` ->
    ``Kim_Vocal_2.params.json``."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.params.json")


def _resolve_params(model_path: Path, model_hash: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Model data and MDX settings for ``model_path``: ``params`` over the sidecar file if there is one,
    else over UVR's parameters for the file's hash (built in, or from an ``mdx_model_data.json`` beside it)."""
    tried = []
    base: dict[str, Any] | None = None
    sidecar = params_sidecar_path(model_path)
    if sidecar.is_file():
        try:
            base = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise VocalSeparatorError(
                f"Cannot read the separator parameters in {sidecar}: {e}. Fix or delete it."
            ) from e
        if not isinstance(base, dict):
            raise VocalSeparatorError(f"{sidecar} must hold a JSON object of separator parameters.")
    else:
        tried.append(f"no {sidecar.name} beside it")
        base = KNOWN_MODEL_PARAMS.get(model_hash)
        uvr_data = model_path.parent / "mdx_model_data.json"
        if base is None and uvr_data.is_file():
            with contextlib.suppress(OSError, ValueError):
                base = json.loads(uvr_data.read_text(encoding="utf-8")).get(model_hash)
        if base is None:
            tried.append(f"its hash {model_hash} is not Kim_Vocal_2's nor in an mdx_model_data.json beside it")

    merged = {**(base or {}), **(params or {})}
    unknown = sorted(set(merged) - set(_MODEL_DATA_KEYS) - set(_MDX_KEYS))
    if unknown:
        raise VocalSeparatorError(
            f"Unknown separator parameters {unknown} for {model_path}; allowed: {list(_MODEL_DATA_KEYS + _MDX_KEYS)}."
        )
    missing = [k for k in _REQUIRED_MODEL_DATA if k not in merged]
    if missing:
        raise VocalSeparatorError(
            f"No separation parameters for {model_path} ({'; '.join(tried) or 'incomplete parameters'}): missing "
            f"{missing}. Use MEMO's {VOCAL_SEPARATOR_FILE}, or write {sidecar} with UVR's model data for this model, "
            'e.g. {"compensate": 1.009, "mdx_dim_f_set": 3072, "mdx_dim_t_set": 8, "mdx_n_fft_scale_set": 7680, '
            '"primary_stem": "Vocals"}.'
        )
    merged.setdefault("primary_stem", "Vocals")
    n_fft, dim_f = int(merged["mdx_n_fft_scale_set"]), int(merged["mdx_dim_f_set"])
    hop = int(merged.get("hop_length", _MDX_DEFAULTS["hop_length"]))
    if not 0 < dim_f <= n_fft // 2 + 1 or not 0 < hop <= n_fft:
        raise VocalSeparatorError(
            f"Separator parameters for {model_path} are inconsistent: need 0 < dim_f ({dim_f}) <= n_fft/2+1 "
            f"({n_fft // 2 + 1}) and 0 < hop_length ({hop}) <= n_fft ({n_fft})."
        )
    if merged["primary_stem"] not in ("Vocals", "Instrumental"):
        raise VocalSeparatorError(
            f"{model_path} separates {merged['primary_stem']!r}, not vocals; use a vocals/instrumental model."
        )
    return merged


def _write_offline_data(folder: Path, model_filename: str, model_hash: str, model_data: Mapping[str, Any]) -> None:
    """The three files audio-separator downloads when they are missing from its model folder: UVR's model
    lists (all seven, the MDX one naming our file), and MDX and VR parameters keyed by the file's hash."""
    checks = {name: {} for name in _DOWNLOAD_LISTS}
    checks["mdx_download_list"] = {f"MDX-Net Model: {Path(model_filename).stem}": model_filename}
    (folder / "download_checks.json").write_text(json.dumps(checks), encoding="utf-8")
    (folder / "mdx_model_data.json").write_text(json.dumps({model_hash: dict(model_data)}), encoding="utf-8")
    (folder / "vr_model_data.json").write_text("{}", encoding="utf-8")


def _place(source: Path, target: Path) -> None:
    """Make ``target`` read as ``source``: a symbolic link, else a hard link, else a copy."""
    error = None
    for make in (os.symlink, os.link, shutil.copyfile):
        try:
            make(source, target)
            return
        except OSError as e:
            error = e
    raise error


def _separator_class():
    """audio-separator's Separator, without its ``ffmpeg -version`` check.

    audio-separator needs ffmpeg only for writing stems with pydub; we write them with soundfile
    (``use_soundfile=True``) and it reads WAV input with soundfile, so ffmpeg is never run. Its constructor
    nevertheless runs ``ffmpeg -version`` (``Separator.check_ffmpeg_installed``) and fails without a system
    ffmpeg; overriding that one method skips the check without touching PATH or the environment.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydub warns on import when there is no ffmpeg; it is not used
        Separator = import_runtime("audio_separator.separator").Separator  # noqa: N806 (audio-separator's class)

    class _NoFfmpegCheckSeparator(Separator):
        def check_ffmpeg_installed(self):  # see the docstring above
            self.logger.debug("Skipping the ffmpeg check: stems are written with soundfile.")

    return _NoFfmpegCheckSeparator


class VocalSeparator:
    """Vocals of a 16 kHz mono waveform, separated by an MDX-Net ONNX model through audio-separator.

    Build with :meth:`from_dir`. Each call works in a temporary folder (under ``work_dir`` if given) that is
    removed afterwards, whatever happens. Not safe to call from several threads at once.
    """

    def __init__(self, separator, model_path: Path, work_dir: str | os.PathLike | None = None):
        self._separator = separator
        self.model_path = model_path
        self.work_dir = work_dir

    @classmethod
    def from_dir(
        cls,
        model_dir: str | os.PathLike,
        model_filename: str = VOCAL_SEPARATOR_FILE,
        work_dir: str | os.PathLike | None = None,
        params: Mapping[str, Any] | None = None,
        log_level: int = logging.ERROR,
    ) -> VocalSeparator:
        """Load ``model_dir/model_filename`` (MEMO's ``misc/vocal_separator`` folder), offline.

        Parameters come from ``params`` (UVR model-data keys ``compensate``, ``mdx_dim_f_set``,
        ``mdx_dim_t_set`` (log2 of dim_t), ``mdx_n_fft_scale_set``, ``primary_stem``, and audio-separator's
        MDX settings ``hop_length``, ``segment_size``, ``overlap``, ``batch_size``, ``enable_denoise``), over
        a ``<model>.params.json`` file beside the model if present, else over UVR's parameters for the
        file's hash (Kim_Vocal_2's are built in). ``model_dir`` is only read.
        """
        model_dir = Path(model_dir)
        model_path = model_dir / model_filename
        if not model_dir.is_dir():
            raise VocalSeparatorError(
                f"The vocal separator folder {model_dir} does not exist. Download MEMO's "
                f"misc/vocal_separator/{model_filename} into it, or turn vocal separation off."
            )
        if not model_path.is_file():
            raise VocalSeparatorError(
                f"The vocal separator model {model_filename} is missing from {model_dir}. Download MEMO's "
                f"misc/vocal_separator/{model_filename} into that folder, or turn vocal separation off."
            )
        model_hash = uvr_model_hash(model_path)
        settings = _resolve_params(model_path, model_hash, params)
        model_data = {k: settings[k] for k in _MODEL_DATA_KEYS}
        mdx_params = {**_MDX_DEFAULTS, "segment_size": 2 ** int(settings["mdx_dim_t_set"])}
        mdx_params.update({k: settings[k] for k in _MDX_KEYS if k in settings})

        separator_class = _separator_class()
        if work_dir is not None:
            Path(work_dir).mkdir(parents=True, exist_ok=True)
        try:
            with work_folder("memo-separator", work_dir) as tmp:
                staged = Path(tmp) / "models"
                staged.mkdir()
                _place(model_path.resolve(), staged / model_filename)
                _write_offline_data(staged, model_filename, model_hash, model_data)
                with warnings.catch_warnings():  # Separator() silences all warnings process-wide otherwise
                    separator = separator_class(
                        log_level=log_level,
                        model_file_dir=str(staged),
                        output_dir=str(Path(tmp) / "out"),
                        output_single_stem="Vocals",
                        use_soundfile=True,
                        mdx_params=mdx_params,
                    )
                    # AUDIO_SEPARATOR_MODEL_DIR in the environment would redirect it; the staged folder wins.
                    separator.model_file_dir = str(staged)
                    separator.load_model(model_filename)
                # The model is in memory now (an onnxruntime session); the staged folder can go.
        except VocalSeparatorError:
            raise
        except Exception as e:
            raise VocalSeparatorError(
                f"Cannot load the vocal separator {model_path}: {type(e).__name__}: {e}. The file may be damaged "
                "or not an MDX-Net model (input named 'input', shape [batch, 4, dim_f, dim_t]); download it again "
                "or turn vocal separation off."
            ) from e
        return cls(separator, model_path, work_dir)

    def __call__(self, waveform_16k: torch.Tensor) -> torch.Tensor:
        """Vocals of a (samples,) 16 kHz mono waveform: a float32 (samples,) 16 kHz tensor of the same length."""
        import soundfile as sf

        waveform = torch.as_tensor(waveform_16k).detach()
        if waveform.dim() == 2 and 1 in waveform.shape:
            waveform = waveform.reshape(-1)
        if waveform.dim() != 1:
            raise ValueError(f"Expected a (samples,) mono waveform, got shape {tuple(waveform.shape)}.")
        if waveform.numel() == 0:
            raise ValueError("Cannot separate vocals from an empty waveform.")
        samples = waveform.to(torch.float32).cpu().numpy()
        if not np.isfinite(samples).all():
            raise ValueError("The waveform contains NaN or infinite values.")

        separator = self._separator
        with work_folder("memo-vocals", self.work_dir) as tmp:
            source = Path(tmp) / "speech.wav"
            sf.write(source, samples, SAMPLE_RATE, subtype="FLOAT")
            separator.output_dir = tmp
            separator.model_instance.output_dir = tmp
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with contextlib.redirect_stderr(io.StringIO()):  # audio-separator's own progress bars
                        outputs = separator.separate(str(source), custom_output_names={"Vocals": "vocals"})
            except Exception as e:
                raise VocalSeparatorError(
                    f"Vocal separation with {self.model_path} failed: {type(e).__name__}: {e}. Check the model "
                    "file, or turn vocal separation off."
                ) from e
            finally:
                separator.output_dir = separator.model_instance.output_dir = None
            if len(outputs) != 1 or not (Path(tmp) / outputs[0]).is_file():
                raise VocalSeparatorError(
                    f"Vocal separation with {self.model_path} wrote {outputs}, not one vocals file."
                )
            vocals = load_audio(Path(tmp) / outputs[0], SAMPLE_RATE)

        n = samples.shape[0]  # the 16 -> 44.1 -> 16 kHz round trip can be a sample or two off
        if vocals.shape[0] >= n:
            return vocals[:n].clone()
        return torch.nn.functional.pad(vocals, (0, n - vocals.shape[0]))
