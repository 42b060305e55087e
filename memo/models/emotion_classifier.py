"""MEMO's audio emotion classifier: an MLP from a pooled emotion2vec feature to nine emotion probabilities."""

from __future__ import annotations

from collections import OrderedDict

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from memo.constants import EMOTION_NAMES


class AudioEmotionClassifierModel(ModelMixin, ConfigMixin):
    """`num_classifier_layers` linear layers (ReLU between them) over a 1024-d feature, softmax at the end.

    Layer names (`layers.fc1` ... `layers.fcN`) follow the published checkpoint.
    """

    num_emotion_classes = len(EMOTION_NAMES)

    @register_to_config
    def __init__(self, num_classifier_layers: int = 5, num_classifier_channels: int = 2048, input_dim: int = 1024):
        super().__init__()
        dims = [input_dim] + [num_classifier_channels] * (num_classifier_layers - 1) + [self.num_emotion_classes]
        layers: list[tuple[str, nn.Module]] = []
        for i in range(num_classifier_layers):
            layers.append((f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1])))
            if i < num_classifier_layers - 1:
                layers.append((f"relu{i + 1}", nn.ReLU()))
        self.layers = nn.Sequential(OrderedDict(layers))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., input_dim) pooled features -> (..., 9) class probabilities."""
        return torch.softmax(self.layers(features), dim=-1)
