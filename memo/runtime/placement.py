"""Where the models live during generation: the ``offload`` setting and the condition models' placement rule.

``offload`` chooses between diffusers' own offloading hooks:

- ``none``: every network runs on the device; on an accelerator they take turns there, the others waiting
  in host memory (``memory.NetworkTurns``; frames unchanged).
- ``model``: :meth:`DiffusionPipeline.enable_model_cpu_offload` over ``MemoPipeline.model_cpu_offload_seq``:
  a whole network moves to the device when it runs and leaves when the next one in the sequence starts
  (each clip moves the VAE, the reference net and the diffusion net in once).
- ``group``: :meth:`DiffusionPipeline.enable_group_offload` at leaf level: each layer's weights are brought
  in just before it runs, with CUDA streams prefetching the next layer while the current one computes.
  Leaf level because the reference net calls its blocks' layers directly, so block-level hooks (on a block's
  ``forward``) would never fire.

The temporal memory is state, not weights: no hook moves it; its placement and the working memory's cuts
are the mode's ``memory.MemoryPlan``, which :func:`apply_offload` installs too. Opt-in, ``fp8`` stores the
two large networks' weights in float8 (diffusers' layerwise casting), computing in their own dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from memo.runtime.memory import PLANS, apply_memory_plan, can_stream, counted_peak_bytes

logger = logging.getLogger("memo")


FP8_STORAGE = torch.float8_e4m3fn
"""The storage dtype of ``fp8`` weights: e4m3 (3 mantissa bits), the format diffusers' layerwise casting
documents for inference."""


def apply_offload(pipe, offload: str, device: torch.device, fp8: bool = False) -> None:
    """Put ``pipe``'s networks on ``device`` (``none``) or install diffusers' ``model`` / ``group`` offload
    hooks that bring them there when they run, and the mode's memory plan (``memory.py``). The hooks also
    work with ``device`` a CPU (they then move nothing), which is how the tests check that every mode
    computes the same video. ``fp8``: the reference and diffusion nets' weights are stored in
    ``FP8_STORAGE`` and cast up layer by layer as they run (norms, embeddings and in/out convolutions stay
    as they are, diffusers' default skip list)."""
    if offload not in PLANS:
        raise ValueError(f"offload must be one of none, model, group; got {offload!r}.")
    if fp8:
        for network in (pipe.reference_net, pipe.diffusion_net):
            network.enable_layerwise_casting(storage_dtype=FP8_STORAGE, compute_dtype=network.dtype)
    apply_memory_plan(pipe, offload, device)
    if offload == "none":
        if pipe.network_turns is None:  # else they come to the device in turns (memory.NetworkTurns)
            pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "group":
        pipe.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=can_stream(device),  # (not on fake tensors, which count memory: memo/bench/memory.py)
        )


def effective_offload(offload: str, device: torch.device) -> str:
    """``offload`` as it applies on ``device``: offloading moves weights from the CPU to an accelerator, so on
    a CPU it is meaningless and becomes ``none`` (with a warning), never an error, so that one config file
    serves GPU and CPU machines."""
    if offload != "none" and device.type == "cpu":
        logger.warning(
            "offload=%s has no effect on the CPU (there is no accelerator memory to save); ignoring it.", offload
        )
        return "none"
    return offload


def module_bytes(*modules: torch.nn.Module | None) -> int:
    """Bytes of the parameters and buffers of ``modules`` (None entries count 0)."""
    return sum(
        t.numel() * t.element_size()
        for module in modules
        if module is not None
        for t in (*module.parameters(), *module.buffers())
    )


@dataclass(frozen=True)
class ConditionPlacement:
    """The decision of :func:`condition_models_placement` and why."""

    keep_on_device: bool
    reason: str


def condition_models_placement(
    device: torch.device, offload: str, free_bytes: int | None, condition_bytes: int, generation_bytes: int
) -> ConditionPlacement:
    """Whether the condition models (wav2vec2, emotion2vec, the emotion classifier) stay on ``device`` while
    the video is generated, or wait on the CPU.

    The rule: they stay on a CPU or Apple MPS device (nothing to gain: MPS memory is the system's); on CUDA
    they leave when any ``offload`` is asked for (memory is short by the user's own word), and otherwise stay
    only when the free device memory (``free_bytes``, from ``torch.cuda.mem_get_info`` with the networks
    loaded; None: unknown) holds their own size ``condition_bytes`` plus the generation's working memory
    ``generation_bytes`` (see :func:`generation_working_bytes`).
    """
    if device.type != "cuda":
        return ConditionPlacement(True, f"{device.type} device")
    if offload != "none":
        return ConditionPlacement(False, f"offload={offload}")
    if free_bytes is None:
        return ConditionPlacement(False, "free GPU memory unknown")
    needed = condition_bytes + generation_bytes
    gib = 2**30
    if free_bytes >= needed:
        return ConditionPlacement(True, f"{free_bytes / gib:.1f} GiB free >= {needed / gib:.1f} GiB needed")
    return ConditionPlacement(False, f"{free_bytes / gib:.1f} GiB free < {needed / gib:.1f} GiB needed")


def generation_working_bytes(width: int, height: int, dtype: torch.dtype) -> int:
    """Device memory generation with offload=none needs at ``width`` x ``height`` (bytes), weights included:
    on CUDA the networks wait in host memory between their turns (``memory.NetworkTurns``), so the free
    memory measured with them loaded does not hold them; the counted peak (``memory.MEMORY_TABLE``)."""
    return counted_peak_bytes("none", width, height, dtype)
