"""Classifier-free guidance as MEMO runs it: a guider object, in the shape of diffusers' ``ClassifierFreeGuidance``.

A guided step runs the diffusion net on a batch of two, the unconditional half first and the conditional
half second, and follows ``uncond + scale * (cond - uncond)`` (Ho & Salimans, 2022, arXiv 2207.12598).
``start``/``stop`` limit guidance to that fraction of the steps, as diffusers' guiders do; outside it the
conditional pass runs alone (``DiffusionConditions.item``, which says how that differs from the conditional
rows of a batched call). The first step of a clip always runs both halves when any step is guided: it
writes the temporal memory that both halves read later (:func:`plan_steps`).

The guider decides what each step computes and combines the result; it is the place where a step's
computation may be spread over processes (``memo/runtime/parallel.py`` overrides :meth:`predict`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from memo.models.conditions import DiffusionConditions

CONDITIONAL = 1
"""The conditional item of a guidance batch (unconditional first)."""


@dataclass(frozen=True)
class StepPlan:
    """One denoising step: ``batched``: the unconditional and conditional halves both run (batch 2);
    ``guided``: guidance combines them (else the conditional prediction is used); ``whole``: the whole net
    runs (else only its outer layers, on cached deep features)."""

    batched: bool
    guided: bool
    whole: bool


def plan_steps(
    num_steps: int, guidance: bool, guidance_window: tuple[float, float] = (0.0, 1.0), deep_cache_interval: int = 1
) -> list[StepPlan]:
    """What each of a clip's ``num_steps`` steps computes.

    With ``guidance`` (a guidance scale above 1), steps in the window are guided; if any is, step 0 runs
    both halves too (it writes the temporal memory that both halves read), guided only if in the window.
    Steps ``0, N, 2N...`` run the whole net; so does a batched step after a conditional-only whole step, as
    the cache holds only the conditional half then.
    """
    start, end = guidance_window
    guided = [guidance and start * num_steps <= i < end * num_steps for i in range(num_steps)]
    any_guided = any(guided)
    plan = []
    cached_batch = 0
    for i in range(num_steps):
        batched = guided[i] or (i == 0 and any_guided)
        whole = i % deep_cache_interval == 0 or (batched and cached_batch < 2)
        if whole:
            cached_batch = 2 if batched else 1
        plan.append(StepPlan(batched=batched, guided=guided[i], whole=whole))
    return plan


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """MEMO's classifier-free guidance with a guidance window.

    Attributes:
        guidance_scale: the guidance weight; 1 or less runs the conditional pass alone (no guidance).
            MEMO's published default is 3.5 (``configs/inference.yaml``).
        start, stop: the fractions 0..1 of a clip's steps that are guided (``start * steps <= i < stop * steps``).
    """

    guidance_scale: float = 3.5
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.stop <= 1.0:
            raise ValueError(
                f"The guidance window must satisfy 0 <= start <= stop <= 1, got start={self.start}, stop={self.stop}."
            )

    @property
    def enabled(self) -> bool:
        """Whether any step can be guided (a scale above 1)."""
        return self.guidance_scale > 1.0

    def plan(self, num_steps: int, deep_cache_interval: int = 1) -> list[StepPlan]:
        """What each of a clip's steps computes (:func:`plan_steps`)."""
        return plan_steps(num_steps, self.enabled, (self.start, self.stop), deep_cache_interval)

    def predict(
        self,
        network: nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        conditions: DiffusionConditions,
        todo: StepPlan,
    ) -> torch.Tensor:
        """The step's noise prediction on (1, C, frames, h, w) ``latents``: (2, ...) for a batched step of a
        guidance batch ``conditions``, else (1, ...) of the conditional item (or of the one item there is)."""
        if conditions.batch == 1:
            return network(latents, timestep, conditions)
        if todo.batched:
            return network(latents.repeat(conditions.batch, 1, 1, 1, 1), timestep, conditions)
        return network(latents, timestep, conditions.item(CONDITIONAL))

    def combine(self, noise_pred: torch.Tensor, todo: StepPlan) -> torch.Tensor:
        """The velocity a step follows: for a guided batch of two, ``uncond + scale * (cond - uncond)``; for an
        unguided batch of two (a step that only writes the memory for both halves), the conditional half; a
        single item as it is. ``noise_pred``: (batch, C, frames, h, w)."""
        if todo.guided:
            uncond, cond = noise_pred.chunk(2)
            return uncond + self.guidance_scale * (cond - uncond)
        if todo.batched:
            return noise_pred.chunk(2)[CONDITIONAL]
        return noise_pred
