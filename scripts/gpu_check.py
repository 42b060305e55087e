"""The GPU measurements of the speed-and-memory work, in one run that writes everything to a directory.

    PYTHONPATH=. python scripts/gpu_check.py --out "$OUT"                         # on the GPU: the issue's workload
    PYTHONPATH=. python scripts/gpu_check.py --device cpu --size tiny --out /tmp/gpu-check   # dry run, minutes

Full-size networks with random weights (no downloads). Parts, each written as soon as it is done (a part
that fails writes its traceback and the next one runs):

1. ``budget.json``: what must sit on the device, counted on the meta device: weights per network, the
   temporal memory and the reference features at the workload's size and dtype.
2. ``profile/<phase>.txt``: torch.profiler's kernel table (key_averages) of one call of each phase of the
   eager path (after a warm-up), sorted by device time.
3. ``variants.json`` + ``variants.txt``: the workload (default 512x512, 2 clips of 16 frames, 20 steps,
   guidance 3.5) for each compile/offload choice (eager, compiled, model, group by default): s/frame, per
   phase s/frame, TFLOP/s and fraction of the dense bf16 peak, peak allocated/reserved memory, compile time.
4. ``deviation.json``: frames of one short clip in fp32, in bf16 eager and in bf16 compiled from the same
   weights and noise; the bf16 paths' deviation from fp32 (the compiled path must stay in the bf16 class).

``summary.txt`` gathers the printed lines. On a CPU dry run use ``--compile-backend eager`` unless there
are tens of minutes to spare for inductor's C++ code generation.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import (  # noqa: E402  (scripts/ is not a package)
    DTYPES,
    build_pipeline,
    generate,
    print_variants,
    run_variants,
    synchronize,
)

from memo.bench.memory import full_size_pipeline  # noqa: E402
from memo.models.temporal_memory import TemporalMemory  # noqa: E402
from memo.runtime.compilation import compile_networks  # noqa: E402
from memo.runtime.placement import module_bytes  # noqa: E402

GIB = 2**30


def memory_budget(args) -> dict:
    """Bytes the full-size networks keep on the device at the workload (meta device: nothing is computed)."""
    dtype = DTYPES[args.dtype]
    pipe = full_size_pipeline("meta", dtype)
    nets = {name: getattr(pipe, name) for name in ("reference_net", "diffusion_net", "image_proj", "audio_proj", "vae")}
    with torch.device("meta"):
        batch, past, frames, side = 2, args.frames_per_clip, args.frames_per_clip, args.resolution // 8
        with torch.no_grad():
            latents = torch.empty(batch * (1 + past), 4, side, side, dtype=dtype)
            reference = nets["reference_net"](latents, 0.0, torch.empty(batch * (1 + past), 4, 768, dtype=dtype))
            memory = TemporalMemory()
            nets["diffusion_net"](
                torch.empty(batch, 4, frames, side, side, dtype=dtype),
                torch.tensor(999.0),
                reference,
                torch.empty(batch, 4, 768, dtype=dtype),
                torch.empty(batch, frames, 32, 768, dtype=dtype),
                torch.tensor([9, 0]),
                memory,
                True,
                (True, False),
            )
    features = [f for group in (reference.down, [reference.mid], reference.up) for layer in group for f in layer]
    return {
        "dtype": args.dtype,
        "resolution": args.resolution,
        "weights_gib": {name: module_bytes(net) / GIB for name, net in nets.items()},
        "temporal_memory_gib": sum(t.numel() * t.element_size() for kv in memory.states.values() for t in kv) / GIB,
        "temporal_memory_entries": len(memory),
        "reference_features_gib": sum(f.numel() * f.element_size() for f in features) / GIB,
    }


def profile_phases(args, device: torch.device, out: Path) -> dict:
    """One profiled call of each phase of the eager path, after a warm-up; kernel tables to out/profile/."""
    torch.manual_seed(0)
    pipe, audio = build_pipeline(args.size, device, DTYPES[args.dtype])
    short = argparse.Namespace(**{**vars(args), "clips": 2, "steps": 2})
    generate(pipe, audio, short, args.vae_batch_size, lambda name: contextlib.nullcontext())  # warm-up
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    done: dict[str, float] = {}
    (out / "profile").mkdir(exist_ok=True)

    @contextlib.contextmanager
    def profile_once(name: str):
        if name in done:  # only the first call of each phase (the second step of a clip is a plain read step)
            yield
            return
        synchronize(device)
        start = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            yield
            synchronize(device)
        done[name] = time.perf_counter() - start
        table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60)
        (out / "profile" / f"{name.split(' (')[0].replace(' ', '_')}.txt").write_text(table)

    generate(pipe, audio, short, args.vae_batch_size, profile_once)
    return {"profiled_seconds": done}


def frames_of(pipe, audio, args, device: torch.device) -> torch.Tensor:
    """Frames (3, F, H, W) in [0, 1] of one clip of ``args.deviation_steps`` steps from fixed inputs."""
    g = torch.Generator().manual_seed(1)
    frames = args.frames_per_clip
    waveform = torch.randn(int(frames / args.fps * 16000) + 16000, generator=g) * 0.1
    features = audio(waveform, args.fps, args.frames_per_clip)
    with torch.no_grad():
        return pipe(
            torch.rand(1, 3, args.resolution, args.resolution, generator=g) * 2 - 1,
            torch.randn(1, 512, generator=g),
            features[slice(0, frames)],
            torch.zeros(frames, dtype=torch.long),
            frames_per_clip=frames,
            num_inference_steps=args.deviation_steps,
            guidance_scale=3.5,
            seed=0,
            vae_batch_size=args.vae_batch_size,
        ).frames


def deviation(args, device: torch.device) -> dict:
    """bf16 eager and bf16 compiled against fp32, same weights (seed 0, built in fp32 then cast) and noise."""
    result = {}
    torch.manual_seed(0)
    pipe, audio = build_pipeline(args.size, device, torch.float32)
    reference = frames_of(pipe, audio, args, device)
    for name, compiled in (("bf16 eager", False), ("bf16 compiled", True)):
        pipe.to(dtype=torch.bfloat16)
        if compiled:
            compile_networks(pipe, mode=args.compile_mode, backend=args.compile_backend)
        frames = frames_of(pipe, audio, args, device)
        difference = (frames.double() - reference.double()).abs()
        result[name] = {"max_abs": float(difference.max()), "mean_abs": float(difference.mean())}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="directory for the results (created)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--resolution", type=int, default=None, help="default 512 (full) or 64 (tiny)")
    parser.add_argument("--clips", type=int, default=None, help="default 2")
    parser.add_argument("--frames-per-clip", type=int, default=None, help="default 16 (full) or 4 (tiny)")
    parser.add_argument("--steps", type=int, default=None, help="default 20 (full) or 2 (tiny)")
    parser.add_argument("--deviation-steps", type=int, default=4)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--vae-batch-size", type=int, default=8)
    parser.add_argument("--variants", default="eager,compiled,model,group")
    parser.add_argument("--compile-mode", default=None)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--parts", default="budget,profile,variants,deviation")
    args = parser.parse_args()
    tiny = args.size == "tiny"
    args.resolution = args.resolution or (64 if tiny else 512)
    args.clips = args.clips or 2
    args.frames_per_clip = args.frames_per_clip or (4 if tiny else 16)
    args.steps = args.steps or (2 if tiny else 20)
    device = torch.device(args.device)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        (out / "summary.txt").write_text(log.getvalue())

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    say(
        f"gpu_check on {name}, torch {torch.__version__}: {args.size} size, {args.resolution}x{args.resolution}, "
        f"{args.clips} clips x {args.frames_per_clip} frames, {args.steps} steps, {args.dtype}"
    )
    parts = {
        "budget": lambda: memory_budget(args),
        "profile": lambda: profile_phases(args, device, out),
        "variants": lambda: run_variants(args, device, DTYPES[args.dtype]),
        "deviation": lambda: deviation(args, device),
    }
    for part in args.parts.split(","):
        start = time.perf_counter()
        try:
            result = parts[part]()
        except Exception:  # one failing part must not lose the others' device time
            (out / f"{part}.error.txt").write_text(traceback.format_exc())
            say(f"{part}: FAILED after {time.perf_counter() - start:.0f} s, see {part}.error.txt")
            continue
        (out / f"{part}.json").write_text(json.dumps(result, indent=2))
        if part == "variants":
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                print_variants(result)
            (out / "variants.txt").write_text(printed.getvalue())
            say(printed.getvalue())
        else:
            say(f"{part}: {json.dumps(result)}")
        say(f"{part}: done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
