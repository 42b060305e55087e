"""The networks have exactly the published checkpoint's keys and shapes, and load the tiny checkpoint cleanly."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import PUBLISHED
from safetensors.torch import load_file

from memo.models.diffusion_net import DiffusionNet
from memo.models.emotion_classifier import AudioEmotionClassifierModel
from memo.models.projections import AudioProjModel, ImageProjModel
from memo.models.reference_net import ReferenceNet

COMPONENTS = {
    "reference_net": (ReferenceNet, "reference_net"),
    "diffusion_net": (DiffusionNet, "diffusion_net"),
    "image_proj": (ImageProjModel, "image_proj"),
    "audio_proj": (AudioProjModel, "audio_proj"),
    "audio_emotion_classifier": (AudioEmotionClassifierModel, "misc/audio_emotion_classifier"),
}


@pytest.mark.parametrize("name", COMPONENTS)
def test_full_size_model_has_published_keys_and_shapes(name):
    network, _ = COMPONENTS[name]
    config = json.loads((PUBLISHED / f"{name}.config.json").read_text())
    published = json.loads((PUBLISHED / f"{name}.keys.json").read_text())
    with torch.device("meta"):
        model = network.from_config(config)
    ours = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    assert sorted(set(published["keys"]) - set(ours)) == []
    assert sorted(set(ours) - set(published["keys"])) == []
    assert {k: v for k, v in ours.items() if v != published["keys"][k]} == {}
    assert sum(t.numel() for t in model.state_dict().values()) == published["parameters_and_buffers"]


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize("name", COMPONENTS)
def test_tiny_checkpoint_loads_every_weight_without_warnings(name, tiny_checkpoint):
    network, folder = COMPONENTS[name]
    handler = _Collect()
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        model, info = network.from_pretrained(tiny_checkpoint / folder, output_loading_info=True)
    finally:
        diffusers_logger.removeHandler(handler)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert [r.getMessage() for r in handler.records] == []
    stored = load_file(tiny_checkpoint / folder / "diffusion_pytorch_model.safetensors")
    state = model.state_dict()
    assert set(stored) == set(state)
    for key, tensor in stored.items():
        assert torch.equal(state[key], tensor), key


def test_edited_config_with_an_unsupported_setting_is_rejected():
    config = json.loads((PUBLISHED / "diffusion_net.config.json").read_text())
    config["use_linear_projection"] = True
    with pytest.raises(NotImplementedError, match="use_linear_projection"):
        DiffusionNet.from_config(config)
