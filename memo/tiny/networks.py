"""Tiny random versions of every neural network the program loads, written in their published layouts.

Sizes follow the reference tiny checkpoint (UNet channels 32/64/64/64, 64-d image and audio tokens, a
2-layer 16-d wav2vec2, a 32-d emotion2vec, a 4-level 16/32/32/32 VAE); weights are random and seeded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from memo.io.hub import EMOTION_CLASSIFIER_FOLDER
from memo.models.diffusion_net import DiffusionNet
from memo.models.emotion2vec import CHECKPOINT_PREFIX, Emotion2VecEncoder
from memo.models.emotion_classifier import AudioEmotionClassifierModel
from memo.models.projections import AudioProjModel, ImageProjModel
from memo.models.reference_net import ReferenceNet

TOKEN_DIM = 64
WAV2VEC_DIM, WAV2VEC_LAYERS = 16, 2
EMOTION2VEC_DIM = 32

UNET = dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=TOKEN_DIM, sample_size=8)

EMOTION2VEC_CONFIG = {
    "model": "Emotion2vec",
    "model_conf": {
        "embed_dim": EMOTION2VEC_DIM,
        "num_heads": 4,
        "depth": 2,
        "mlp_ratio": 4.0,
        "norm_eps": 1e-5,
        "norm_affine": True,
        "normalize": True,
        "layer_norm_first": False,
        "modalities": {
            "audio": {
                "extractor_mode": "layer_norm",
                "feature_encoder_spec": "[(24, 10, 5)] + [(24, 3, 2)] * 4 + [(24,2,2)] + [(24,2,2)]",
                "conv_pos_width": 95,
                "conv_pos_depth": 5,
                "conv_pos_groups": 16,
                "conv_pos_pre_ln": False,
                "num_extra_tokens": 10,
                "prenet_depth": 2,
                "num_alibi_heads": 4,
                "use_alibi_encoder": True,
                "alibi_scale": 1.0,
                "learned_alibi": False,
                "learned_alibi_scale": True,
                "learned_alibi_scale_per_head": True,
                "learned_alibi_scale_per_layer": False,
                "alibi_max_pos": None,
            }
        },
    },
}


def tiny_memo_networks() -> dict[str, torch.nn.Module]:
    """The four MEMO networks at the tiny sizes with random weights (from the global torch generator), by the
    published repo's folder names, in the order they are made."""
    return {
        "reference_net": ReferenceNet(**UNET),
        "diffusion_net": DiffusionNet(**UNET, audio_attention_dim=TOKEN_DIM),
        "image_proj": ImageProjModel(cross_attention_dim=TOKEN_DIM),
        "audio_proj": AudioProjModel(
            blocks=WAV2VEC_LAYERS, channels=WAV2VEC_DIM, intermediate_dim=32, output_dim=TOKEN_DIM, context_tokens=4
        ),
    }


def tiny_vae() -> AutoencoderKL:
    """An AutoencoderKL with 4 levels (latents are 1/8 of the image) and 16/32/32/32 channels, random."""
    return AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def tiny_wav2vec2_config() -> Wav2Vec2Config:
    """A 2-layer, 16-d wav2vec2."""
    return Wav2Vec2Config(
        hidden_size=WAV2VEC_DIM,
        num_hidden_layers=WAV2VEC_LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )


def write_memo_networks(root: Path) -> None:
    """The four MEMO networks and the emotion classifier, in the layout of the published repo (``MEMO_REPO``)."""
    for name, network in tiny_memo_networks().items():
        network.save_pretrained(root / name)
    AudioEmotionClassifierModel(
        num_classifier_layers=3, num_classifier_channels=32, input_dim=EMOTION2VEC_DIM
    ).save_pretrained(root / EMOTION_CLASSIFIER_FOLDER)


def write_vae(directory: Path) -> None:
    """:func:`tiny_vae` in the diffusers layout."""
    tiny_vae().save_pretrained(directory)


def write_wav2vec2(directory: Path) -> None:
    """A wav2vec2 model (:func:`tiny_wav2vec2_config`) and its feature extractor in the transformers layout."""
    Wav2Vec2Model(tiny_wav2vec2_config()).save_pretrained(directory)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(directory)


def write_emotion2vec(directory: Path) -> None:
    """``config.yaml`` and a ``model.pt`` nested like the published emotion2vec_plus_large."""
    directory.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(EMOTION2VEC_CONFIG), directory / "config.yaml")
    encoder = Emotion2VecEncoder.from_config(EMOTION2VEC_CONFIG)
    state = {CHECKPOINT_PREFIX + key: tensor for key, tensor in encoder.state_dict().items()}
    torch.save({"model": state}, directory / "model.pt")
