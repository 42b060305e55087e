"""Run by tests/test_parallel.py on each of two processes (torch.distributed.run): the tiny pipeline's video
with parallel=guidance, compared on rank 0 with the same call in one process. Prints one JSON line on rank 0."""

from __future__ import annotations

import json
import sys

import torch
from test_pipeline import FPC, make_inputs

from memo.models.temporal_memory import TemporalMemory
from memo.pipeline import MemoPipeline
from memo.runtime.parallel import GuidanceParallel
from memo.runtime.placement import apply_offload


def main(checkpoint: str, offload: str, steps: int, guidance_end: float, deep_cache_interval: int, solver: str) -> None:
    pipe = MemoPipeline.from_checkpoint(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    apply_offload(pipe, offload, torch.device("cpu"))
    parallel = GuidanceParallel(torch.device("cpu"))
    args = dict(
        make_inputs(clips=2),
        frames_per_clip=FPC,
        past_frames=FPC,
        num_inference_steps=steps,
        guidance_scale=3.5,
        seed=3,
        guidance_window=(0.0, guidance_end),
        deep_cache_interval=deep_cache_interval,
        solver=solver,
    )
    memory = TemporalMemory()
    split = pipe(**args, memory=memory, parallel=parallel).frames
    if parallel.is_main:
        alone_memory = TemporalMemory()
        alone = pipe(**args, memory=alone_memory).frames
        half = {n: kv.shape[0] for n, (kv, _) in memory.states.items()}
        whole = {n: kv.shape[0] for n, (kv, _) in alone_memory.states.items()}
        result = dict(
            equal=bool(torch.equal(split, alone)),
            max_difference=float((split - alone).abs().max()),
            memory_halved=all(2 * half[n] == whole[n] for n in whole),
            steps=parallel.steps,
            bytes_sent=parallel.bytes_sent,
        )
        print(json.dumps(result))
    parallel.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
