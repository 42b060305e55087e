"""What the diffusion net conditions a clip on: one dataclass, and the one way to take an item of a guidance batch.

In a guided step the diffusion net runs a batch of two, the unconditional half first and the conditional
half second. :meth:`DiffusionConditions.item` cuts such a batch to one of its items in the two ways the
sampler needs:

- ``alone``: the item as a batch of its own (the conditional pass outside the guidance window). One
  difference from the item's rows of a batched call remains, by construction of the published network:
  there, frame row i joins the reference frame of batch item ``i mod 2`` (``spatial.py``), so half of the
  conditional frames see the reference features computed with the unconditional face tokens; alone, every
  frame sees its own item's.
- ``as in the batch``: the item computed as its rows of the batch of two, bit for bit (guidance-parallel
  generation, ``memo/runtime/parallel.py``): the reference features stay those of both items
  (``ReferenceFeatures.item``) and the emotion label is given twice, so that its small projections run on
  two rows as in the batch (one row takes another kernel).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from memo.models.blocks import GUIDANCE_BATCH
from memo.models.reference_net import ReferenceFeatures
from memo.models.temporal_memory import TemporalMemory


def _item_rows(tensor: torch.Tensor, index: int) -> torch.Tensor:
    return tensor.unflatten(0, (GUIDANCE_BATCH, -1))[index]


def reference_item(reference: ReferenceFeatures, index: int) -> ReferenceFeatures:
    """The reference net's features of guidance item ``index``: its rows of every feature (no copy)."""
    return ReferenceFeatures(
        down=[[_item_rows(f, index) for f in block] for block in reference.down],
        mid=[_item_rows(f, index) for f in reference.mid],
        up=[[_item_rows(f, index) for f in block] for block in reference.up],
    )


@dataclass
class DiffusionConditions:
    """Everything the diffusion net conditions one clip's frames on, per batch item: both guidance halves
    (unconditional first) or a single item.

    Attributes:
        reference: the reference net's features of (reference image + past frames) for every item. As
            published, the reference frame's features are tiled over the frame rows (row i meets batch item
            i mod batch), which is what guidance needs; to denoise unrelated items, call once per item.
        image_tokens: (batch, n, cross_attention_dim) face-identity tokens (of a zero embedding when unconditional).
        audio_tokens: (batch, frames, m, audio_attention_dim) audio tokens of each frame (zeros when unconditional).
        emotion: (batch,) emotion labels 0..8 (9, ``NUM_EMOTIONS``, is the dropped, unconditional label).
        memory: the temporal memory of the video, read by every temporal layer.
        drop_reference: one bool per item (True: its frames do not attend to the reference image), or None.
        update_memory: fold the reference's past frames into ``memory`` first (the first step of each clip).
    """

    reference: ReferenceFeatures
    image_tokens: torch.Tensor
    audio_tokens: torch.Tensor
    emotion: torch.Tensor
    memory: TemporalMemory
    drop_reference: tuple[bool, ...] | None = None
    update_memory: bool = False

    @property
    def batch(self) -> int:
        return self.image_tokens.shape[0]

    def with_update(self, update_memory: bool) -> DiffusionConditions:
        """These conditions for a step that does (or does not) fold the past frames into the memory."""
        if update_memory == self.update_memory:
            return self
        return dataclasses.replace(self, update_memory=update_memory)

    def item(
        self, index: int, *, as_in_batch: bool = False, memory: TemporalMemory | None = None
    ) -> DiffusionConditions:
        """Guidance item ``index`` (0 unconditional, 1 conditional) of a batch of two: ``alone`` by default, or
        computed ``as_in_batch`` (see the module docstring). Its memory is ``memory`` where given (a memory
        that holds this item only, as a guidance-parallel process's does), else this memory's read-only view
        of the item (:meth:`TemporalMemory.item`)."""
        if self.batch != GUIDANCE_BATCH:
            raise ValueError(f"Only a guidance batch of {GUIDANCE_BATCH} has items, got a batch of {self.batch}.")
        one = slice(index, index + 1)
        if as_in_batch:
            reference = dataclasses.replace(self.reference, item=index)
            emotion = self.emotion[one].repeat(GUIDANCE_BATCH)
        else:
            reference, emotion = reference_item(self.reference, index), self.emotion[one]
        return DiffusionConditions(
            reference=reference,
            image_tokens=self.image_tokens[one],
            audio_tokens=self.audio_tokens[one],
            emotion=emotion,
            memory=memory if memory is not None else self.memory.item(index, GUIDANCE_BATCH),
            drop_reference=None if self.drop_reference is None else self.drop_reference[one],
            update_memory=self.update_memory,
        )
