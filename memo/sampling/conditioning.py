"""The conditioning of a clip, built once for generation and training: frames to latents, the face's identity
tokens, the reference pass, audio tokens and emotion -> :class:`memo.models.conditions.DiffusionConditions`.

``networks`` is anything holding MEMO's networks under their published folder names (``vae``,
``reference_net``, ``image_proj``, ``audio_proj``, ``diffusion_net``): the pipeline, or the training model.
"""

from __future__ import annotations

from typing import Protocol

import torch
from diffusers import AutoencoderKL

from memo.constants import NUM_EMOTIONS
from memo.models.conditions import DiffusionConditions
from memo.models.diffusion_net import DiffusionNet
from memo.models.projections import AudioProjModel, ImageProjModel
from memo.models.reference_net import ReferenceFeatures, ReferenceNet
from memo.models.temporal_memory import TemporalMemory


class Networks(Protocol):
    vae: AutoencoderKL
    reference_net: ReferenceNet
    diffusion_net: DiffusionNet
    image_proj: ImageProjModel
    audio_proj: AudioProjModel


def encode_frames(
    vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int, device: torch.device, *, sample: bool = False
) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8) scaled latents (``vae.config.scaling_factor``), at most
    ``batch_size`` frames per VAE call, computed on ``device``: the posterior's means, or with ``sample`` a
    sample of it from torch's global generator (what training encodes, as the original)."""
    latents = []
    for chunk in pixels.split(batch_size):
        posterior = vae.encode(chunk.to(device, vae.dtype)).latent_dist
        latents.append(posterior.sample() if sample else posterior.mean)
    return torch.cat(latents) * vae.config.scaling_factor


def clip_emotion(labels: torch.Tensor) -> int:
    """The emotion of a clip: the most frequent per-frame label, the smallest label on a tie."""
    return int(torch.bincount(labels.reshape(-1).long(), minlength=NUM_EMOTIONS).argmax())


def _zero_items(values: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    """``values`` (items * k, ...) with the k rows of each item where ``drop`` (items,) is true set to zero."""
    if drop is None or not bool(drop.any()):
        return values
    rows = drop.repeat_interleave(values.shape[0] // drop.shape[0]).reshape(-1, *([1] * (values.dim() - 1)))
    return torch.where(rows.to(values.device), torch.zeros_like(values), values)


def drop_emotion(emotion: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    """(items,) emotion labels with those of the items where ``drop`` is true set to the unconditional label
    (:data:`memo.constants.NUM_EMOTIONS`)."""
    if drop is None:
        return emotion
    return torch.where(drop.to(emotion.device), torch.full_like(emotion, NUM_EMOTIONS), emotion)


def encode_image_tokens(
    networks: Networks,
    face_embedding: torch.Tensor,
    guided: bool,
    device: torch.device,
    *,
    drop: torch.Tensor | None = None,
) -> torch.Tensor:
    """(items, 512) face embeddings -> (items, n, dim) identity tokens in the diffusion net's dtype; with
    ``guided`` (one item), the unconditional tokens (of a zero embedding) first. ``drop``: (items,) bool, the
    items whose embedding is zeroed first (conditioning dropout: the tokens of guidance's unconditional half)."""
    image_proj = networks.image_proj
    face_embedding = _zero_items(face_embedding.to(device, image_proj.dtype), drop)
    image_tokens = image_proj(face_embedding)
    if guided:
        image_tokens = torch.cat([image_proj(torch.zeros_like(face_embedding)), image_tokens])
    return image_tokens.to(networks.diffusion_net.dtype)


def encode_reference(
    networks: Networks,
    reference_latents: torch.Tensor,
    image_tokens: torch.Tensor,
    *,
    own_tokens: bool = False,
    drop: torch.Tensor | None = None,
) -> ReferenceFeatures:
    """The reference pass: the reference net at timestep 0 over ``reference_latents`` with the identity tokens.

    Args:
        reference_latents: (items * rows, 4, h, w) in the diffusion net's dtype, each item's rows together
            (its reference image, then its past frames).
        image_tokens: (items, n, dim) from :func:`encode_image_tokens`.
        own_tokens: each item's rows meet that item's own tokens (``repeat_interleave``): right when the items
            are different samples (training's batches). Without it, latent row r meets token set r mod items
            (``repeat``), as the original pipeline runs its guidance batch (two items of one sample); the
            published frames depend on it, so the pipeline keeps it.
        drop: (items,) bool, the items whose latents are zeroed first (conditioning dropout as the original
            trains it).
    """
    items = image_tokens.shape[0]
    rows = reference_latents.shape[0] // items
    reference_latents = _zero_items(reference_latents, drop)
    if own_tokens:
        context = image_tokens.repeat_interleave(rows, dim=0)
    else:
        context = image_tokens.repeat(rows, 1, 1)
    return networks.reference_net(reference_latents, 0.0, context)


def encode_audio_tokens(
    networks: Networks,
    audio: torch.Tensor,
    device: torch.device,
    *,
    drop: torch.Tensor | None = None,
    drop_features: bool = False,
) -> torch.Tensor:
    """(items, frames, 5, layers, dim) audio features -> (items, frames, m, audio_dim) audio tokens in the
    diffusion net's dtype. ``drop``: (items,) bool, the items trained without audio: their tokens are zeros (as
    guidance's unconditional half), or with ``drop_features`` their features are (as the original trains)."""
    audio_proj = networks.audio_proj
    features = audio.to(device, audio_proj.dtype)
    if drop_features:
        features = _zero_items(features, drop)
    tokens = audio_proj(features).to(networks.diffusion_net.dtype)
    return tokens if drop_features else _zero_items(tokens, drop)


def encode_clip_conditions(
    networks: Networks,
    *,
    reference_image: torch.Tensor,
    past: torch.Tensor,
    image_tokens: torch.Tensor,
    audio: torch.Tensor,
    emotion_labels: torch.Tensor,
    memory: TemporalMemory,
    vae_batch_size: int,
    device: torch.device,
) -> DiffusionConditions:
    """A clip's conditions, for as many items as ``image_tokens`` has (2: unconditional, conditional).

    Args:
        reference_image: (1, 3, H, W) in [-1, 1], in the VAE's dtype and on ``device``.
        past: (P, 3, H, W) in [-1, 1], the frames the clip continues from.
        image_tokens: from :func:`encode_image_tokens`.
        audio: (frames, 5, layers, dim) the clip's audio features.
        emotion_labels: (frames,) the clip's per-frame emotion labels.
        memory: the temporal memory of the video.
        vae_batch_size: frames per VAE encode call.
        device: where the networks compute.
    """
    dtype = networks.diffusion_net.dtype
    guided = image_tokens.shape[0] == 2
    pixels = torch.cat([reference_image, past.to(reference_image.dtype)])
    reference_latents = encode_frames(networks.vae, pixels, vae_batch_size, device).to(dtype)
    reference = encode_reference(networks, reference_latents.repeat(image_tokens.shape[0], 1, 1, 1), image_tokens)
    audio_tokens = encode_audio_tokens(networks, audio[None], device)
    emotion = torch.tensor([clip_emotion(emotion_labels)], device=device)
    if guided:
        audio_tokens = torch.cat([torch.zeros_like(audio_tokens), audio_tokens])
        emotion = torch.cat([torch.full_like(emotion, NUM_EMOTIONS), emotion])
    return DiffusionConditions(
        reference=reference,
        image_tokens=image_tokens,
        audio_tokens=audio_tokens,
        emotion=emotion,
        memory=memory,
        drop_reference=(True, False) if guided else None,  # the unconditional half does not see the reference
    )
