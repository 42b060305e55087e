"""The flow-matching objective of MEMO's training, as in the original release.

A clip's latents ``x0`` are noised along the straight path ``x_sigma = sigma * noise + (1 - sigma) * x0``.
The network predicts the velocity (``noise - x0``); its prediction is turned into an estimate of the clean
latents, ``x0_hat = x_sigma - sigma * prediction``, and compared with ``x0`` by mean squared error,
weighted per sample. Timesteps (and so sigmas) are drawn with diffusers' SD3 helpers: logit-normal by
default, or the "mode" and uniform densities; "sigma_sqrt" and "cosmap" reweight the loss instead.

Robust training (original: on, threshold 0.1) leaves out of the batch mean every sample whose loss
exceeds the threshold, so that a few bad clips (cuts, occlusions, badly aligned audio) do not dominate.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from memo.settings.training import ObjectiveSettings, WeightingScheme


class FlowMatchingObjective:
    """Timestep sampling, noising and the weighted x0 loss.

    Args:
        scheduler_kwargs: arguments of the FlowMatchEulerDiscreteScheduler whose timestep/sigma table is used.
        weighting_scheme: "logit_normal", "mode", "sigma_sqrt", "cosmap" or "none" (diffusers' names).
        logit_mean, logit_std: the logit-normal density's parameters.
        mode_scale: the "mode" density's parameter.
    """

    def __init__(
        self,
        scheduler_kwargs: dict | None = None,
        weighting_scheme: WeightingScheme = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ):
        self.scheduler = FlowMatchEulerDiscreteScheduler(**(scheduler_kwargs or {}))
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.weighting_scheme = weighting_scheme
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.mode_scale = mode_scale

    @classmethod
    def from_settings(cls, settings: ObjectiveSettings) -> FlowMatchingObjective:
        """The objective as the ``objective`` settings say."""
        return cls(
            dict(settings.noise_scheduler_kwargs),
            settings.weighting_scheme,
            settings.logit_mean,
            settings.logit_std,
            settings.mode_scale,
        )

    def sample_timesteps(self, batch: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one timestep per sample: (timesteps (batch,) on the 0..1000 scale the networks take,
        sigmas (batch,))."""
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme,
            batch_size=batch,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
        )
        indices = (u * self.num_train_timesteps).long().clamp(0, len(self.scheduler.timesteps) - 1)
        timesteps = self.scheduler.timesteps[indices].to(device)
        sigmas = self.scheduler.sigmas[indices].to(device=device, dtype=torch.float32)
        return timesteps, sigmas

    @staticmethod
    def add_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """``sigma * noise + (1 - sigma) * latents`` with one sigma per sample (the first dimension)."""
        sigma = sigmas.reshape(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
        return sigma * noise + (1.0 - sigma) * latents

    def per_sample_loss(
        self, prediction: torch.Tensor, noisy_latents: torch.Tensor, latents: torch.Tensor, sigmas: torch.Tensor
    ) -> torch.Tensor:
        """Weighted MSE between ``noisy - sigma * prediction`` and the clean latents, one value per sample (float32)."""
        sigma = sigmas.reshape(-1, *([1] * (latents.dim() - 1))).float()
        estimate = noisy_latents.float() - sigma * prediction.float()
        mse = (estimate - latents.float()).square().flatten(1).mean(dim=1)
        weights = compute_loss_weighting_for_sd3(weighting_scheme=self.weighting_scheme, sigmas=sigmas.float())
        return mse * weights.reshape(-1)


def robust_mean(losses: torch.Tensor, threshold: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of the per-sample ``losses`` not above ``threshold`` (all of them when it is None).

    Returns (loss, kept) where ``kept`` is the number of samples in the mean. When every sample is above
    the threshold the loss is 0 (still attached to the graph, so that every process steps alike).
    """
    if threshold is None:
        return losses.mean(), torch.tensor(losses.numel(), device=losses.device)
    keep = losses <= threshold
    kept = keep.sum()
    return torch.where(keep, losses, torch.zeros_like(losses)).sum() / kept.clamp(min=1), kept
