"""GPU memory of generation in each offload mode, counted on the real pipeline call with the full-size networks.

    python scripts/memory_budget.py --resolution 512 --dtype bf16 --offload none model group [--fp8] [--json FILE]
    python scripts/memory_budget.py --table memo/runtime/memory_table.json --overwrite   # the table the program reads

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
import sys

import torch

from memo.bench.memory import KINDS, as_json, count_generation, full_size_pipeline
from memo.constants import DTYPES
from memo.errors import UserError, as_path
from memo.io.partial import write_atomically
from memo.io.video import check_output_path
from memo.settings.inference import OFFLOAD_CHOICES

GIB = 2**30
TABLE_RESOLUTIONS = (256, 512, 768)
"""The sizes ``--table`` counts (``memo/runtime/memory.py`` interpolates between them)."""


def _positive(value: str) -> int:
    number = int(value) if value.lstrip("-").isdigit() else None
    if number is None or number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return number


def _side(value: str) -> int:
    number = int(value) if value.lstrip("-").isdigit() else None
    if number is None or number < 64 or number % 64:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive multiple of 64 (e.g. 256, 512, 768)")
    return number


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=_side, help="square output side in pixels, a multiple of 64 (default 512)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="weight dtype")
    parser.add_argument("--offload", nargs="+", choices=OFFLOAD_CHOICES, help="modes to count (default: all three)")
    parser.add_argument(
        "--fp8", action="store_true", help="the fp8_weights setting: the two large networks' weights stored in fp8"
    )
    parser.add_argument(
        "--clips", type=_positive, default=2, help="clips of 16 frames to count (from the 2nd on, the memory is full)"
    )
    parser.add_argument(
        "--steps", type=_positive, default=2, help="denoising steps counted per clip (the peak repeats every step)"
    )
    parser.add_argument(
        "--full-steps", type=_positive, default=20, help="steps per clip the bytes moved per frame are scaled up to"
    )
    parser.add_argument("--json", help="write the counts here as JSON (bytes; see the README)")
    parser.add_argument(
        "--table", help=f"count {'/'.join(map(str, TABLE_RESOLUTIONS))} in every mode without fp8, write the table here"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json or --table file")
    args = parser.parse_args(argv)
    if args.table and (args.resolution or args.offload or args.fp8 or args.json):
        parser.error(
            "--table counts every mode at 256/512/768 without fp8: it takes none of --resolution, --offload, "
            "--fp8, --json"
        )
    args.resolution = args.resolution or 512
    args.offload = list(dict.fromkeys(args.offload or OFFLOAD_CHOICES))
    return args


def main(argv: list[str] | None = None) -> int:
    """Count and print; 2 with one ``error:`` line when an output file cannot be written (checked first)."""
    args = parse_args(argv)
    try:
        out = args.table or args.json
        flag = "--table" if args.table else "--json"
        out = check_output_path(as_path(out, flag), args.overwrite, example="counts.json") if out else None
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)  # checked above: it can be created
    if args.table:
        write_atomically(out, json.dumps(count_table(args), indent=2) + "\n")
        print(f"Wrote {out}")
        return 0
    settings = dict(resolution=args.resolution, dtype=DTYPES[args.dtype], clips=args.clips, steps=args.steps)
    counts = {mode: count_generation(mode, fp8=args.fp8, **settings) for mode in args.offload}
    print(
        f"{args.resolution}x{args.resolution} {args.dtype}{' fp8 weights' if args.fp8 else ''}, {args.clips} clip(s) "
        f"of 16 frames, {args.steps} step(s) each, guidance 3.5; COUNTED on fake CUDA tensors (no GPU), GiB"
    )
    print(
        f"{'mode':<6} {'peak':>6} "
        + " ".join(f"{k:>10.10}" for k in KINDS)
        + f"  host  moved/frame at {args.full_steps} steps  step peaks"
    )
    for mode, count in counts.items():
        split = " ".join(f"{count.peak_split.get(k, 0) / GIB:>10.2f}" for k in KINDS)
        steps = ", ".join(f"{p / GIB:.2f}" for p in count.step_peaks)
        moved = count.moved_per_frame_at(args.full_steps) / GIB
        print(
            f"{mode:<6} {count.peak_bytes / GIB:>6.2f} {split} {count.host_bytes / GIB:>5.2f} {moved:>23.3f}  {steps}"
        )
    if out:
        data = as_json(counts, **{**settings, "dtype": args.dtype, "fp8": args.fp8})
        for mode, count in counts.items():
            data["modes"][mode]["moved_per_frame"] = count.moved_per_frame_at(args.full_steps)
        write_atomically(out, json.dumps(data, indent=2) + "\n")
        print(f"Wrote {out}")
    return 0


def count_table(args: argparse.Namespace) -> dict:
    """Counted peak bytes per mode and resolution, read by memo/runtime/memory.py."""
    weights = full_size_pipeline("meta", DTYPES[args.dtype])
    weight_bytes = sum(
        t.numel() * t.element_size()
        for m in weights.components.values()
        if isinstance(m, torch.nn.Module)
        for t in m.state_dict().values()
    )
    table = {"dtype": args.dtype, "weights_bytes": weight_bytes, "peak_bytes": {}, "moved_per_frame": {}}
    for resolution in TABLE_RESOLUTIONS:
        for mode in OFFLOAD_CHOICES:
            count = count_generation(
                mode, resolution=resolution, dtype=DTYPES[args.dtype], steps=args.steps, clips=args.clips
            )
            table["peak_bytes"].setdefault(mode, {})[str(resolution)] = count.peak_bytes
            table["moved_per_frame"].setdefault(mode, {})[str(resolution)] = count.moved_per_frame_at(args.full_steps)
            print(mode, resolution, f"{count.peak_bytes / GIB:.2f} GiB", flush=True)
    return table


if __name__ == "__main__":
    sys.exit(main())
