"""``torch.compile`` of the reference and diffusion nets: the ``compile`` setting, the inductor cache, compile time.

Both networks trace as single graphs (``fullgraph=True``): nothing in them branches on tensor values or
moves data to the host. The diffusion net gets one graph per memory situation (the first step of the first
clip creates the temporal memory, the first step of a later clip folds into it, the other steps only read
it), so a video compiles three diffusion-net graphs and one reference-net graph, all in the first two clips.
Compiled kernels are kept in the inductor cache (``TORCHINDUCTOR_CACHE_DIR``, default
``$XDG_CACHE_HOME/memo/torchinductor``, ``~/.cache/memo/torchinductor``; ``memo.environment`` sets it before
torch._dynamo is imported, which makes the folder) so a later run with the same shapes loads them instead of
compiling again.

CUDA graphs (``mode="reduce-overhead"``) are not used: the temporal memory and the reference features are
new tensors every clip, inputs that CUDA graphs would copy into static buffers on every step (twice their
memory); see the README's Speed and memory section.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from memo.environment import INDUCTOR_CACHE_FOLDER, memo_cache_dir

logger = logging.getLogger("memo")

COMPILED_NETWORKS = ("reference_net", "diffusion_net")
COMPILED_METHODS = {"diffusion_net": ("forward", "forward_keeping_deep_features", "forward_outer_layers")}
"""The methods compiled per network where not only ``forward``: the diffusion net's deep-cache passes too."""
_COMPILE_METRIC = "_compile.compile_inner"  # torch._dynamo's timer around tracing + inductor codegen of one graph


def compile_enabled(setting: str, device: torch.device) -> bool:
    """Whether to compile, for a validated ``compile`` setting: ``auto`` compiles on CUDA only (on a CPU the
    compile takes longer than it saves on one video); ``true``/``false`` force it."""
    if setting == "true" and device.type == "cpu":
        logger.warning(
            "compile=true on the CPU: inductor compiles for many minutes (about 18 on two cores for the tiny "
            "pack) and saves less than that; its kernels round differently from eager ones, which a random-weight "
            "pack turns into visibly different frames (scripts/tiny_pack_sensitivity.py). compile=false is "
            "exact and faster here."
        )
    return device.type == "cuda" if setting == "auto" else setting == "true"


def use_inductor_cache(directory: str | os.PathLike | None = None) -> Path:
    """Point the inductor cache at ``directory`` (default: ``TORCHINDUCTOR_CACHE_DIR`` if set, else
    ``$XDG_CACHE_HOME/memo/torchinductor``, which survives reboots unlike torch's default in /tmp); returns it.

    The FX graph cache (on by default since torch 2.5) keys compiled graphs by their code, shapes, dtypes and
    the torch version, so a stale entry is never reused."""
    default = memo_cache_dir() / INDUCTOR_CACHE_FOLDER
    chosen = Path(directory or os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default).expanduser()
    chosen.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(chosen)
    return chosen


def compile_networks(pipe: torch.nn.Module | object, mode: str | None = None, backend: str = "inductor") -> None:
    """Compile the ``forward`` of ``pipe.reference_net`` and ``pipe.diffusion_net`` in place, whole-graph, and the
    diffusion net's two deep-cache passes (``forward_keeping_deep_features``, ``forward_outer_layers``, which the
    deep-cache hook calls on the steps of ``speed=fast``).

    Only these methods are replaced, so the modules keep their type, weights and state-dict keys, and offload
    hooks added afterwards (``offload=model``) wrap the compiled forward. ``mode`` is passed to
    :func:`torch.compile` (None: inductor's default; ``"max-autotune-no-cudagraphs"`` tunes matmul and
    convolution kernels at a much longer compile); ``backend`` too (the tests use ``"eager"``: the same
    whole-graph capture, run without code generation). Compilation itself happens on the first calls.
    """
    for name in COMPILED_NETWORKS:
        network = getattr(pipe, name)
        for method in COMPILED_METHODS.get(name, ("forward",)):
            setattr(
                network, method, torch.compile(getattr(network, method), fullgraph=True, mode=mode, backend=backend)
            )


def compile_seconds() -> float:
    """Seconds spent compiling graphs in this process so far (dynamo tracing and inductor code generation,
    cache hits included at their, much lower, cost)."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get(_COMPILE_METRIC, [])))


def compiled_graphs() -> int:
    """Graphs compiled in this process so far (torch._dynamo's own count: each recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
