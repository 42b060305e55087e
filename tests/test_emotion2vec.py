"""emotion2vec encoder: parity with funasr's reference outputs, and the published full-size layout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from memo.io.hub import MissingModelError
from memo.io.model_files import DamagedModelError
from memo.models.emotion2vec import UNUSED_HEAD_PREFIX, Emotion2VecEncoder

REFERENCE = Path(
    os.environ.get("MEMO_EMOTION2VEC_REFERENCE", Path(__file__).resolve().parents[2] / "shared/reference/emotion2vec")
)
TOLERANCE = 1e-4


def _waveform_names() -> list[str]:
    """The ``wav{i}`` keys of the reference inputs, read at collection time so any such folder runs as is."""
    path = REFERENCE / "inputs.safetensors"
    if not path.is_file():
        return []
    with safe_open(str(path), framework="pt") as inputs:
        names = [key for key in inputs.keys() if re.fullmatch(r"wav\d+", key)]
    return sorted(names, key=lambda name: int(name[3:]))


requires_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"no emotion2vec reference at {REFERENCE}")


@pytest.fixture(scope="module")
def encoder() -> Emotion2VecEncoder:
    return Emotion2VecEncoder.from_pretrained(REFERENCE / "checkpoint")


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE / "expected.safetensors")


@requires_reference
@pytest.mark.parametrize("name", _waveform_names() or [pytest.param("wav0", marks=pytest.mark.skip("no inputs"))])
def test_matches_reference(name: str, encoder: Emotion2VecEncoder, expected: dict[str, torch.Tensor]) -> None:
    wav = load_file(REFERENCE / "inputs.safetensors")[name]
    with torch.inference_mode():
        features = encoder(Emotion2VecEncoder.normalize_waveform(wav).view(1, -1))
        mean = encoder.mean_features(Emotion2VecEncoder.normalize_waveform(wav).view(1, -1))
    for suffix, ours in (("_x", features), ("_x_mean", mean)):
        reference = expected[name + suffix]
        assert ours.shape == reference.shape, (suffix, ours.shape, reference.shape)
        error = (ours - reference).abs().max().item()
        assert error <= TOLERANCE, f"{name}{suffix}: max |ours - expected| = {error:.3g} > {TOLERANCE}"


@requires_reference
def test_checkpoint_loads_strictly(encoder: Emotion2VecEncoder) -> None:
    """Every checkpoint tensor but the unused 9-way head is loaded, and the model is ready for inference."""
    state = Emotion2VecEncoder.read_checkpoint(REFERENCE / "checkpoint/model.pt")
    used = {key.removeprefix("d2v_model.") for key in state if not key.startswith(UNUSED_HEAD_PREFIX)}
    assert used == set(encoder.state_dict())
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    broken = dict(state)
    broken["d2v_model.something_else"] = torch.zeros(1)
    with pytest.raises(ValueError, match="something_else"):
        encoder.load_published_state_dict(broken)


@requires_reference
def test_batched_rows_match_single(encoder: Emotion2VecEncoder) -> None:
    """Rows of a batch are independent: each equals the same waveform run alone."""
    torch.manual_seed(0)
    batch = torch.randn(3, 8000)
    with torch.inference_mode():
        together = encoder.utterance_features(batch)
        alone = torch.cat([encoder.utterance_features(row) for row in batch])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


@requires_reference
def test_too_short_waveform_is_refused(encoder: Emotion2VecEncoder) -> None:
    with pytest.raises(ValueError, match="shorter than the encoder's minimum"):
        encoder(torch.zeros(1, encoder.min_samples - 1))


@requires_reference
def test_full_size_layout_matches_published_keys() -> None:
    """The large config builds exactly the published tensors (less the unused ``proj`` head), same shapes."""
    keys_file = REFERENCE / "emotion2vec_plus_large.statedict_keys.txt"
    if not keys_file.is_file():
        pytest.skip(f"no published key list at {keys_file}")
    published: dict[str, list[int]] = {}
    for line in keys_file.read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            published[key] = [int(v) for v in shape.strip("[]").split(",") if v.strip()]
    expected = {
        key.removeprefix("d2v_model."): shape
        for key, shape in published.items()
        if not key.startswith(UNUSED_HEAD_PREFIX)
    }
    assert len(expected) == len(published) - 2
    with torch.device("meta"):
        model = Emotion2VecEncoder.from_config(REFERENCE / "emotion2vec_plus_large.config.yaml")
    ours = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    assert ours == expected
    assert model.embed_dim == 1024


def test_missing_model_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(MissingModelError, match="no such folder"):
        Emotion2VecEncoder.from_pretrained(tmp_path / "absent")
    (tmp_path / "config.yaml").write_text("model_conf: {}\n")
    with pytest.raises(DamagedModelError, match="model.pt is missing"):
        Emotion2VecEncoder.from_pretrained(tmp_path)


def test_import_pulls_no_funasr_or_modelscope() -> None:
    code = (
        "import sys, memo, memo.models.emotion2vec, memo.conditions.emotion; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'funasr', 'modelscope'}); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
