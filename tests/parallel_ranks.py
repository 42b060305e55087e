"""Run by tests/test_parallel.py on each of two processes (torch.distributed.run): the tiny pipeline's video
with parallel=guidance, compared on rank 0 with the same call in one process, for each of the settings given
(one launch checks them all). Prints one JSON line per setting on rank 0."""

from __future__ import annotations

import json
import sys

import torch
from test_pipeline import FPC, make_inputs

from memo.models.temporal_memory import TemporalMemory
from memo.pipeline import MemoPipeline
from memo.runtime.parallel import GuidanceParallel
from memo.runtime.placement import apply_offload
from memo.sampling.guidance import ClassifierFreeGuidance
from memo.sampling.solvers import flow_scheduler


def compare(checkpoint: str, offload: str, steps: int, guidance_end: float, deep_cache_interval: int, solver: str):
    """One setting: rank 0's report of the split video against the one-process video (None on rank 1)."""
    pipe = MemoPipeline.from_checkpoint(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    apply_offload(pipe, offload, torch.device("cpu"))
    parallel = GuidanceParallel(torch.device("cpu"))
    args = dict(
        make_inputs(clips=2),
        frames_per_clip=FPC,
        past_frames=FPC,
        num_inference_steps=steps,
        seed=3,
        deep_cache_interval=deep_cache_interval,
    )
    pipe.scheduler = flow_scheduler(solver, pipe.scheduler)
    guider = ClassifierFreeGuidance(3.5, 0.0, guidance_end)
    memory = TemporalMemory()
    split = pipe(**args, memory=memory, guider=parallel.guider(guider)).frames
    if not parallel.is_main:
        return parallel, None
    alone_memory = TemporalMemory()
    alone = pipe(**args, memory=alone_memory, guider=guider).frames
    half = {n: kv.shape[0] for n, (kv, _) in memory.states.items()}
    whole = {n: kv.shape[0] for n, (kv, _) in alone_memory.states.items()}
    return parallel, dict(
        offload=offload,
        equal=bool(torch.equal(split, alone)),
        max_difference=float((split - alone).abs().max()),
        memory_halved=all(2 * half[n] == whole[n] for n in whole),
        steps=parallel.steps,
        bytes_sent=parallel.bytes_sent,
    )


def main(checkpoint: str, settings: list[str]) -> None:
    """``settings``: one "offload,steps,guidance_end,deep_cache_interval,solver" per comparison."""
    parallel = None
    for setting in settings:
        offload, steps, guidance_end, interval, solver = setting.split(",")
        parallel, report = compare(checkpoint, offload, int(steps), float(guidance_end), int(interval), solver)
        if report is not None:
            print(json.dumps(report), flush=True)
    parallel.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
