"""The conditional pass alone: a guidance batch's conditions cut to their conditional half.

In a guided step the diffusion net runs a batch of two, the unconditional half first and the conditional
half second (see ``pipeline.py``). Outside the guidance window only the conditional half runs; these
functions take that half of every per-batch condition. One difference from the conditional half of a
batched call remains, by construction of the published network: there, frame row i joins the reference
frame of batch item ``i mod 2`` (``spatial.py``), so half of the conditional frames see the reference
features computed with the unconditional face tokens; alone, every frame sees the conditional ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memo.models.reference_net import ReferenceFeatures
from memo.models.temporal_memory import TemporalMemory


def _second_half(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.unflatten(0, (2, -1))[1]


def conditional_reference(reference: ReferenceFeatures) -> ReferenceFeatures:
    """The reference net's features of the conditional batch item: rows (1 + past) .. end of every feature."""
    return ReferenceFeatures(
        down=[[_second_half(f) for f in block] for block in reference.down],
        mid=[_second_half(f) for f in reference.mid],
        up=[[_second_half(f) for f in block] for block in reference.up],
    )


def conditional_memory(memory: TemporalMemory) -> TemporalMemory:
    """A view of ``memory`` holding only the conditional half's positions (no copy); for reading only."""
    return memory.view({name: (_second_half(kv), _second_half(z)) for name, (kv, z) in memory.states.items()})


@dataclass
class ClipConditions:
    """What the diffusion net conditions one clip on, per batch item: both guidance halves (unconditional
    first) or a single item. Passed to the net as keyword arguments (:meth:`as_kwargs`).

    Attributes:
        reference: the reference net's features of (reference image + past frames), for every item.
        image_tokens: (batch, n, dim) face-identity tokens (zeros through the projection when unconditional).
        audio_tokens: (batch, frames, m, dim) audio tokens (zeros when unconditional).
        emotion: (batch,) emotion labels (``NUM_EMOTIONS`` when unconditional).
        memory: the temporal memory the clip reads (and its first step writes).
        drop_reference: one bool per item (True: the frames do not attend to the reference), or None.
    """

    reference: ReferenceFeatures
    image_tokens: torch.Tensor
    audio_tokens: torch.Tensor
    emotion: torch.Tensor
    memory: TemporalMemory
    drop_reference: tuple[bool, ...] | None

    @property
    def batch(self) -> int:
        return self.image_tokens.shape[0]

    def conditional_half(self) -> ClipConditions:
        """The conditional item of a guidance batch of two; the memory is a read-only view of its half."""
        return ClipConditions(
            reference=conditional_reference(self.reference),
            image_tokens=self.image_tokens[1:],
            audio_tokens=self.audio_tokens[1:],
            emotion=self.emotion[1:],
            memory=conditional_memory(self.memory),
            drop_reference=self.drop_reference[1:],
        )

    def as_kwargs(self) -> dict:
        """The fields as the diffusion net's keyword arguments (no copies)."""
        return {
            "reference": self.reference,
            "image_tokens": self.image_tokens,
            "audio_tokens": self.audio_tokens,
            "emotion": self.emotion,
            "memory": self.memory,
            "drop_reference": self.drop_reference,
        }


def combine_guidance(noise_pred: torch.Tensor, guided: bool, batched: bool, guidance_scale: float) -> torch.Tensor:
    """The prediction a step follows: for a guided batch of two, ``uncond + scale * (cond - uncond)``; for an
    unguided batch of two (a step that only writes the memory for both halves), the conditional half; a
    single item as it is. ``noise_pred``: (batch, C, frames, h, w)."""
    if guided:
        uncond, cond = noise_pred.chunk(2)
        return uncond + guidance_scale * (cond - uncond)
    if batched:
        return noise_pred.chunk(2)[1]
    return noise_pred
