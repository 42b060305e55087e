"""GPU memory of generation in each offload mode, counted on the real pipeline call with the full-size networks.

    python scripts/memory_budget.py --resolution 512 --dtype bf16 --offload none model group [--fp8] [--json FILE]
    python scripts/memory_budget.py --table memo/runtime/memory_table.json   # the table the program reads

No GPU is used or needed: the networks (shapes from the published configs) run on fake tensors that stand
for a CUDA device, and every allocation, free and host<->device copy is counted (memo/bench/memory.py).
Counted peaks are allocated bytes (torch.cuda.max_memory_allocated's measure); the CUDA context and the
allocator's fragmentation come on top. Two clips of 16 frames and --steps steps each are counted: the first
clip starts with an empty temporal memory, the second has it full, as every later clip does; the step peaks
are printed, so that more steps or clips can be seen not to raise it; the bytes moved per frame are
extended to --full-steps steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memo.bench.memory import KINDS, as_json, count_generation, full_size_pipeline
from memo.constants import DTYPES

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512, help="square output side in pixels")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="weight dtype")
    parser.add_argument("--offload", nargs="+", default=["none", "model", "group"], help="modes to count")
    parser.add_argument("--fp8", action="store_true", help="fp8 weight storage (offload's fp8 option)")
    parser.add_argument(
        "--clips", type=int, default=2, help="clips of 16 frames to count (from the 2nd on, the memory is full)"
    )
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per clip to count")
    parser.add_argument("--full-steps", type=int, default=20, help="steps per clip the transfer cost is given for")
    parser.add_argument("--json", type=Path, help="write the counts here as JSON")
    parser.add_argument("--table", type=Path, help="count 256/512/768 in every mode and write the table here")
    args = parser.parse_args()
    if args.table:
        write_table(args)
        return
    settings = dict(resolution=args.resolution, dtype=DTYPES[args.dtype], clips=args.clips, steps=args.steps)
    counts = {mode: count_generation(mode, fp8=args.fp8, **settings) for mode in args.offload}
    print(
        f"{args.resolution}x{args.resolution} {args.dtype}{' fp8 weights' if args.fp8 else ''}, {args.clips} clip(s) "
        f"of 16 frames, guidance 3.5; COUNTED on fake CUDA tensors (no GPU), GiB"
    )
    print(f"{'mode':<6} {'peak':>6} " + " ".join(f"{k:>10.10}" for k in KINDS) + "  host  moved/frame  step peaks")
    for mode, count in counts.items():
        split = " ".join(f"{count.peak_split.get(k, 0) / GIB:>10.2f}" for k in KINDS)
        steps = ", ".join(f"{p / GIB:.2f}" for p in count.step_peaks)
        moved = count.moved_per_frame_at(args.full_steps) / GIB
        print(
            f"{mode:<6} {count.peak_bytes / GIB:>6.2f} {split} {count.host_bytes / GIB:>5.2f} {moved:>12.3f}  {steps}"
        )
    if args.json:
        data = as_json(counts, **{**settings, "dtype": args.dtype, "fp8": args.fp8})
        for mode, count in counts.items():
            data["modes"][mode]["moved_per_frame"] = count.moved_per_frame_at(args.full_steps)
        args.json.write_text(json.dumps(data, indent=2))


def write_table(args) -> None:
    """Counted peak bytes per mode and resolution, read by memo/runtime/memory.py."""
    weights = full_size_pipeline("meta", DTYPES[args.dtype])
    weight_bytes = sum(
        t.numel() * t.element_size()
        for m in weights.components.values()
        if isinstance(m, torch.nn.Module)
        for t in m.state_dict().values()
    )
    table = {"dtype": args.dtype, "weights_bytes": weight_bytes, "peak_bytes": {}, "moved_per_frame": {}}
    for resolution in (256, 512, 768):
        for mode in ("none", "model", "group"):
            count = count_generation(
                mode, resolution=resolution, dtype=DTYPES[args.dtype], steps=args.steps, clips=args.clips
            )
            table["peak_bytes"].setdefault(mode, {})[str(resolution)] = count.peak_bytes
            table["moved_per_frame"].setdefault(mode, {})[str(resolution)] = count.moved_per_frame_at(args.full_steps)
            print(mode, resolution, f"{count.peak_bytes / GIB:.2f} GiB", flush=True)
    args.table.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
