"""Deep-feature cache: reuse the diffusion net's deep features across neighbouring denoising steps.

DeepCache (Ma et al., 2024, arXiv 2312.00858) observes that a UNet's deep features change little from one
denoising step to the next, while its outermost layers are cheap enough to rerun. A *full* step runs the
whole net and keeps what enters the outer layers of the last up block: the hidden state and, since MEMO's
audio tokens flow through every audio module of the net, the audio tokens at that point. A *shallow* step
then runs only the input convolution, the first ``outer_layers - 1`` layers of the first down block, the
last ``outer_layers`` layers of the last up block (whose skip connections those produce) and the output
layers, and takes everything deeper from the cache. ``outer_layers=2`` is DeepCache's own choice for
Stable Diffusion's UNet (skip branch 0 after the first layer).

The temporal memory is only read in shallow steps; a step that updates it is always a full step.

The partial passes live in :class:`DeepCacheHook`, a diffusers ``ModelHook`` on the diffusion net (as
diffusers' own caches, e.g. first-block cache, are built): the pipeline calls the net as always, and the
hook chooses the whole pass or the outer layers by the step plan. Install it with :func:`apply_deep_cache`
before other hooks (offload, placement) so that theirs wrap it; the pipeline installs it itself when a
call asks for the cache and none is there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from accelerate.hooks import add_hook_to_module, remove_hook_from_module
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from memo.models.conditions import DiffusionConditions
from memo.models.diffusion_net import DeepFeatures

HOOK_NAME = "memo_deep_cache"


class DeepFeatureCache:
    """The deep features of the last whole step of a clip (one cache per clip).

    Args:
        outer_layers: layers of the last up block that shallow steps rerun, 1..3 for MEMO's net (3 layers
            per up block); the first down block reruns one layer fewer.

    Rows are laid out as the diffusion net's frames, (batch*frames, ...). Features kept from a batch of two
    (the unconditional and conditional halves of guidance) also serve a conditional-only step: the second
    half is taken. A shallow step whose batch the cache cannot serve raises ``RuntimeError``.
    """

    def __init__(self, outer_layers: int = 2):
        if not 1 <= outer_layers <= 3:
            raise ValueError(f"outer_layers must be 1, 2 or 3, got {outer_layers}.")
        self.outer_layers = outer_layers
        self.features: DeepFeatures | None = None
        self.batch = 0

    def can_serve(self, batch: int) -> bool:
        """Whether a shallow step with ``batch`` items (1 or 2) can run on the kept features."""
        return self.features is not None and (self.batch == batch or (self.batch == 2 and batch == 1))

    def store(self, features: DeepFeatures, batch: int) -> None:
        """Keep the deep features of a whole step of ``batch`` items."""
        self.features, self.batch = features, batch

    def load(self, batch: int) -> DeepFeatures:
        """The kept features for a shallow step of ``batch`` items."""
        if not self.can_serve(batch):
            raise RuntimeError(
                f"The deep-feature cache holds {'nothing' if self.features is None else f'a batch of {self.batch}'}; "
                f"a shallow step of batch {batch} needs a whole step of that batch (or of 2) before it."
            )
        if self.batch == batch:
            return self.features
        hidden, audio, outer_layers = self.features
        return DeepFeatures(hidden[hidden.shape[0] // 2 :], audio[audio.shape[0] // 2 :], outer_layers)


class DeepCacheHook(ModelHook):
    """Runs the diffusion net whole on the steps the plan marks whole (keeping its deep features) and only
    its outer layers on the others; a pass-through while :meth:`configure` has given it no plan.

    The cache is per clip: a step that updates the temporal memory (the first of each clip) starts a new one.
    """

    _is_stateful = True

    def __init__(self, outer_layers: int = 2):
        super().__init__()
        self.outer_layers = outer_layers
        self.whole: Sequence[bool] | None = None
        self.current_step: Callable[[], int] | None = None
        self.cache = DeepFeatureCache(outer_layers)

    def configure(self, whole: Sequence[bool] | None, current_step: Callable[[], int] | None = None) -> None:
        """Use the cache with ``whole[i]`` telling whether step ``current_step()`` runs the whole net; None
        turns the cache off (every call runs the whole net)."""
        self.whole, self.current_step = whole, current_step
        self.cache = DeepFeatureCache(self.outer_layers)

    def new_forward(
        self, module: nn.Module, sample: torch.Tensor, timestep: torch.Tensor | float, conditions: DiffusionConditions
    ) -> torch.Tensor:
        if self.whole is None:
            return self.fn_ref.original_forward(sample, timestep, conditions)
        if conditions.update_memory:
            self.cache = DeepFeatureCache(self.outer_layers)
        batch = conditions.batch
        if self.whole[self.current_step()]:
            noise_pred, deep = module.forward_keeping_deep_features(sample, timestep, conditions, self.outer_layers)
            self.cache.store(deep, batch)
            return noise_pred
        return module.forward_outer_layers(sample, timestep, conditions, self.cache.load(batch))

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.cache = DeepFeatureCache(self.outer_layers)
        return module


def apply_deep_cache(network: nn.Module, outer_layers: int = 2) -> DeepCacheHook:
    """The deep-cache hook of the diffusion net ``network``, installed (inactive) if it has none yet.

    Installed under accelerate's model-offload hook when the net has one (``offload=model``): that hook is
    taken off and put back around this one, as diffusers' pipelines remove and re-add it after every call
    (``maybe_free_model_hooks``), which would otherwise drop a hook registered outside it."""
    registry = HookRegistry.check_if_exists_or_initialize(network)
    hook = registry.get_hook(HOOK_NAME)
    if hook is None:
        hook = DeepCacheHook(outer_layers)
        offload = getattr(network, "_hf_hook", None)
        if offload is not None:
            remove_hook_from_module(network)
        registry.register_hook(hook, HOOK_NAME)
        if offload is not None:
            add_hook_to_module(network, offload)
    return hook
