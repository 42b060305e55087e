"""Guidance-parallel generation: one video on two processes, each running one half of classifier-free guidance.

Launched as two processes (``accelerate launch --num_processes 2`` or ``torchrun --nproc_per_node 2``, which
set ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``), with ``parallel=guidance``. Rank 0 holds
the unconditional half, rank 1 the conditional half; each runs the diffusion net on its half alone and keeps
only its half of the temporal memory. What the halves share, and how:

- The reference net's features. The conditional frames join reference frames of *both* halves (row i of the
  batch of two meets batch item i mod 2, ``models/spatial.py``), and a reference net run on half the rows
  does not round as the batched one does (its time embedding is a matrix product of as many rows as the
  batch), so both ranks run the reference net on the whole batch, once per clip, and exchange nothing for it.
- The VAE: both ranks decode each clip and encode the next clip's past frames (rank 1 would otherwise wait
  for rank 0's VAE work, which lies on the path of the next clip), so nothing is exchanged for it either.
- The noise prediction: one collective per step. A guided (batched) step all-gathers the two halves' predictions,
  so both ranks combine the same batch of two, bit for bit; a conditional-only step (outside the guidance
  window, ``guidance_end`` of ``speed=fast``) runs on rank 1 alone while rank 0 waits, and rank 1 broadcasts
  its prediction. Both ranks then take the same solver step, so their latents never diverge.

Each half is computed as its rows of the batch of two, bit for bit (``ReferenceFeatures.item``; the emotion
label is given twice so that its small projections run with the two rows they have in the batch; where the
offload mode runs the feed-forward layers in row chunks, a half runs in half as many, so that its chunks are
the batch's chunks of its rows: :func:`half_the_chunks`). A failure of
either process ends the other's wait on the next collective (gloo notices a closed connection at once; a hung
peer after :data:`COLLECTIVE_TIMEOUT`) as a :class:`ParallelError`.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memo.errors import UserError
from memo.models.conditions import DiffusionConditions
from memo.sampling.guidance import CONDITIONAL, ClassifierFreeGuidance, StepPlan

logger = logging.getLogger("memo")

PARALLEL_CHOICES = ("none", "guidance")
WORLD_SIZE = 2
"""Processes of guidance-parallel generation: one per guidance half."""
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
"""How long a process waits for the other at a collective before it gives up (first steps may compile)."""


class ParallelError(UserError, RuntimeError):
    """Guidance-parallel generation cannot start, or the other process stopped. ``quiet``: rank 0 has
    already said why (rank 1 then stops without a message of its own)."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def select_rank_device() -> None:
    """Make the launcher's ``LOCAL_RANK`` GPU this process's current CUDA device (when there is CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 when not launched by one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_rank() -> int:
    """This process's rank under a launcher (``RANK``; 0 when not launched by one)."""
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def half_the_chunks(network: nn.Module) -> Iterator[None]:
    """Run ``network``'s row-chunked feed-forward layers (``ff_chunks``, set by the offload mode's memory plan)
    in half as many chunks while one guidance half runs alone.

    A layer's rows are the batch's, unconditional half first: ``c`` chunks of the batch of two are then
    ``c / 2`` chunks of each half, the same rows in the same matrix products (for halves whose row count the
    chunk size divides, as at every layer of the published sizes and the tiny pack), so a half rounds as the
    batch does. Steps that run the conditional half alone in one process keep the whole count, as there."""
    chunked = [module for module in network.modules() if getattr(module, "ff_chunks", 1) > 1]
    counts = [module.ff_chunks for module in chunked]
    for module, count in zip(chunked, counts):
        module.ff_chunks = max(1, count // WORLD_SIZE)
    try:
        yield
    finally:
        for module, count in zip(chunked, counts):
            module.ff_chunks = count


class GuidanceParallel:
    """The two-process group of guidance-parallel generation and its exchanges.

    Attributes:
        rank: 0 (unconditional half; decodes the inputs and writes the video) or 1 (conditional half).
        bytes_sent: bytes of tensors this process has sent, counted from the tensors themselves.
        steps: collectives of noise predictions so far (one per denoising step).
    """

    def __init__(self, device: torch.device):
        processes = launched_processes()
        if processes != WORLD_SIZE:
            raise ParallelError(
                f"parallel=guidance needs exactly {WORLD_SIZE} processes, got {processes}; launch with "
                "`accelerate launch --num_processes 2 inference.py ...` (on CPUs add --multi_gpu, else accelerate "
                "starts one process) or "
                "`torchrun --nproc_per_node 2 inference.py ...`, "
                "or set parallel=none.",
                quiet=process_rank() != 0,  # each launched process finds it; the first one says it
            )
        self.rank = process_rank()
        self.device = device
        self.bytes_sent = 0
        self.steps = 0
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            try:
                dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
            except (RuntimeError, ValueError) as error:
                raise ParallelError(f"parallel=guidance could not connect the two processes: {error}") from error
        # Left at interpreter teardown (a process stopping on an error), gloo's process group can abort the
        # process ("terminate called without an active exception", exit -6) instead of exiting with its status.
        atexit.register(self.close)

    @property
    def is_main(self) -> bool:
        """Whether this process writes the output and shows the progress."""
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group (after the last video)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- exchanges -----------------------------------------------------------------------------------

    def _collective(self, run: Callable[[], Any]) -> Any:
        try:
            return run()
        except (RuntimeError, dist.DistBackendError) as error:
            other = 1 - self.rank
            raise ParallelError(
                f"the other process (rank {other}) of parallel=guidance stopped, so this one stops too; no output "
                "was written (its own messages, if any, say why)."
            ) from error

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object: a job, or an error to stop on) on both ranks."""
        box = [value if self.is_main else None]
        self._collective(lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def agree(self, settings: dict[str, Any]) -> None:
        """Check that both processes were given the same ``settings`` (a video's settings, from each process's
        own config); raises :class:`ParallelError` naming the keys that differ, on both ranks (rank 1 quiet)."""
        both: list[Any] = [None] * WORLD_SIZE
        self._collective(lambda: dist.all_gather_object(both, settings))
        first, second = both  # rank 0's, rank 1's
        differing = sorted(key for key in first.keys() | second.keys() if first.get(key) != second.get(key))
        if differing:
            shown = "; ".join(f"{key}={first.get(key)!r} on rank 0, {second.get(key)!r} on rank 1" for key in differing)
            raise ParallelError(
                f"the two processes of parallel=guidance were given different settings ({shown}); "
                "launch both with the same command and settings.",
                quiet=not self.is_main,
            )

    def gather_halves(self, half: torch.Tensor) -> torch.Tensor:
        """The two ranks' (1, ...) predictions as one (2, ...) batch, unconditional first, on both ranks."""
        half = half.contiguous()
        parts = [torch.empty_like(half) for _ in range(WORLD_SIZE)]
        self._collective(lambda: dist.all_gather(parts, half))
        self.bytes_sent += half.numel() * half.element_size()
        self.steps += 1
        return torch.cat(parts)

    def from_conditional(self, prediction: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """Rank 1's ``prediction`` on both ranks (rank 0 passes None and a tensor ``like`` it)."""
        buffer = prediction.contiguous() if prediction is not None else torch.empty_like(like)
        self._collective(lambda: dist.broadcast(buffer, src=1))
        if prediction is not None:
            self.bytes_sent += buffer.numel() * buffer.element_size()
        self.steps += 1
        return buffer

    def guider(self, guidance: ClassifierFreeGuidance) -> ParallelClassifierFreeGuidance:
        """``guidance`` with its two halves computed on the two processes of this group."""
        return ParallelClassifierFreeGuidance(guidance.guidance_scale, guidance.start, guidance.stop, group=self)


@dataclass(frozen=True)
class ParallelClassifierFreeGuidance(ClassifierFreeGuidance):
    """Classifier-free guidance whose halves run on the two processes of ``group``: a batched step computes
    this rank's half as its rows of the batch (``DiffusionConditions.item(as_in_batch=True)``) and gathers
    the other's; a conditional-only step runs on rank 1 alone and is broadcast. Each rank's temporal memory
    holds its own half only."""

    group: GuidanceParallel | None = None

    def predict(
        self,
        network: nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        conditions: DiffusionConditions,
        todo: StepPlan,
    ) -> torch.Tensor:
        """(2, C, frames, h, w) for a batched step, (1, ...) for a conditional-only one, the same on both ranks."""
        group = self.group
        if conditions.batch != WORLD_SIZE:
            raise ParallelError("parallel=guidance needs guidance (cfg_scale above 1).")
        if latents.shape[2] % WORLD_SIZE:
            raise ParallelError(f"parallel=guidance needs an even number of frames per clip, got {latents.shape[2]}.")
        if todo.batched:
            half = conditions.item(group.rank, as_in_batch=True, memory=conditions.memory)
            with half_the_chunks(network):
                prediction = network(latents, timestep, half)
            return group.gather_halves(prediction)
        if group.is_main:
            return group.from_conditional(None, latents)
        alone = conditions.item(CONDITIONAL, memory=conditions.memory)
        return group.from_conditional(network(latents, timestep, alone), latents)
