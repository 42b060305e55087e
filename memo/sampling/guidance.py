"""The conditional pass alone: a guidance batch's conditions cut to their conditional half.

In a guided step the diffusion net runs a batch of two, the unconditional half first and the conditional
half second (see ``pipeline.py``). Outside the guidance window only the conditional half runs; these
functions take that half of every per-batch condition. One difference from the conditional half of a
batched call remains, by construction of the published network: there, frame row i joins the reference
frame of batch item ``i mod 2`` (``spatial.py``), so half of the conditional frames see the reference
features computed with the unconditional face tokens; alone, every frame sees the conditional ones.
"""

from __future__ import annotations

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
