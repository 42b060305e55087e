"""Speed and memory of generation with the full-size MEMO architecture and random weights (no downloads).

    python scripts/benchmark.py --device cuda --dtype bf16 --resolution 512 --clips 2 --steps 20 --baseline
    python scripts/benchmark.py --device cuda --variants eager,compiled,model,group
    python scripts/benchmark.py --device cpu --dtype fp32 --resolution 64 --clips 1 --steps 2
    python scripts/benchmark.py --device cpu --dtype fp32 --resolution 64 --clips 1 --speed exact fast
    python scripts/benchmark.py --flops   # FLOPs per frame of every speed setting, counted, no run
    python scripts/benchmark.py --device cuda --parallel guidance   # one video on two GPUs against one

Prints seconds per frame, peak memory, and the time split between preprocessing (wav2vec2 features and
condition projections), the reference net, the denoising steps, VAE encoding and VAE decoding. With
``--baseline`` the same workload also runs with the original release's settings (memory-efficient
attention, which the original gets from xformers and here comes from SDPA's efficient backend; one VAE
call per frame; the condition model left on the device) in the same process, then ours once more (so drift
between runs shows), and the table reports the speed-up as a ratio. ``--variants`` runs each
``compile``/``offload`` choice (``eager``, ``compiled``, ``model``, ``group``, or joined as
``compiled+model``) on freshly built networks and prints, per phase, s/frame, achieved TFLOP/s and the
fraction of the chip's dense bf16 peak, and peak allocated/reserved GPU memory. ``--speed exact fast`` times
each speed preset (memo/sampling/speed.py) in turn in the same process and reports FLOPs per frame next to the time;
those FLOPs are counted with PyTorch's FLOP counter on the same networks built on the ``meta`` device
(memo/bench/flops.py). ``--parallel guidance`` times the same generation in one process, then on two
processes (``cuda:0`` and ``cuda:1``, or two CPU processes with gloo) with one guidance half each
(memo/runtime/parallel.py), and reports s/frame, the peak memory of each process and the bytes each sends
per denoising step.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import socket
import time
from collections import defaultdict
from collections.abc import Iterator

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from memo.bench.flops import audio_features_flops, clip_flops
from memo.bench.memory import full_size_pipeline
from memo.conditions.audio_features import Wav2VecAudioEncoder
from memo.constants import DTYPES, SAMPLE_RATE
from memo.pipeline import MemoPipeline
from memo.runtime.compilation import compile_networks, compile_seconds
from memo.runtime.parallel import WORLD_SIZE, GuidanceParallel
from memo.runtime.placement import apply_offload
from memo.sampling.speed import SPEEDS, SpeedSettings, preset, variants
from memo.tiny.networks import tiny_memo_networks, tiny_vae, tiny_wav2vec2_config


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


PHASES = ("preprocessing (wav2vec2)", "reference net", "denoising steps", "VAE encode", "VAE decode")
PHASE_METHODS = (
    ("vae.encode", "VAE encode"),
    ("decode_latents", "VAE decode"),
    ("reference_net.forward", "reference net"),
    ("diffusion_net.forward", "denoising steps"),
)

DENSE_BF16_TFLOPS = (
    # Dense (no 2:4 sparsity) bf16 tensor-core peaks, from NVIDIA's datasheets: the H100 and H200 datasheets
    # list 1,979 TFLOPS bf16 "with sparsity" for SXM (H100 PCIe 1,513; H100 NVL 1,671), half of it dense;
    # the A100 datasheet lists 312 TFLOPS bf16 dense. Matched against torch.cuda.get_device_name in order.
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.4),
    ("H200", 989.4),
    ("A100", 312.0),
)


def dense_bf16_peak(device: torch.device) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, or None for a device not in ``DENSE_BF16_TFLOPS``."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DENSE_BF16_TFLOPS if key in name), None)


class Timer:
    """Accumulates wall time per named phase, synchronising the device around each; on CUDA also the peak
    allocated and reserved memory reached within each phase (bytes)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak_allocated: dict[str, int] = defaultdict(int)
        self.peak_reserved: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start
        if cuda:
            self.peak_allocated[name] = max(self.peak_allocated[name], torch.cuda.max_memory_allocated(self.device))
            self.peak_reserved[name] = max(self.peak_reserved[name], torch.cuda.max_memory_reserved(self.device))


@contextlib.contextmanager
def around_phases(pipe: MemoPipeline, around) -> Iterator[None]:
    """Run every call of each phase's method inside ``around(phase_name)`` (a context manager factory), and
    put the methods back as they were afterwards (compiled forwards and offload hooks included)."""
    saved = []
    for path, name in PHASE_METHODS:
        *owner_path, method = path.split(".")
        owner = getattr(pipe, owner_path[0]) if owner_path else pipe
        original = getattr(owner, method)
        saved.append((owner, method, owner.__dict__.get(method)))

        def wrapped(*args, _original=original, _name=name, **kwargs):
            with around(_name):
                return _original(*args, **kwargs)

        setattr(owner, method, wrapped)
    try:
        yield
    finally:
        for owner, method, before in saved:
            if before is None:
                del owner.__dict__[method]
            else:
                setattr(owner, method, before)


def build_pipeline(size: str, device: torch.device, dtype: torch.dtype) -> tuple[MemoPipeline, Wav2VecAudioEncoder]:
    """Random-weight networks at the published sizes (``full``, :func:`memo.bench.memory.full_size_pipeline`)
    or the tiny ones, built on ``device``."""
    if size == "full":
        pipe = full_size_pipeline(device, dtype)
        with torch.device(device):
            wav2vec = Wav2Vec2Model(Wav2Vec2Config())
    else:
        with torch.device(device):
            nets = {**tiny_memo_networks(), "vae": tiny_vae()}
            wav2vec = Wav2Vec2Model(tiny_wav2vec2_config())
        pipe = MemoPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), **nets).to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, Wav2VecAudioEncoder(wav2vec.eval(), Wav2Vec2FeatureExtractor()).to(device)


def peak_memory(timer: Timer) -> str:
    """The run's peak: the largest of its phases' peaks on CUDA, the process's peak RSS elsewhere."""
    if timer.device.type == "cuda":
        return f"{max(timer.peak_allocated.values(), default=0) / 2**30:.2f} GiB (GPU)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def clip_waveform(frames: int, fps: float) -> torch.Tensor:
    """Random speech-level audio at the model's sample rate that gives ``frames`` video frames at ``fps``."""
    return torch.randn(math.ceil(frames / fps * SAMPLE_RATE) - 400) * 0.1


def generate(
    pipe: MemoPipeline,
    audio: Wav2VecAudioEncoder,
    args,
    vae_batch: int,
    around,
    speed: SpeedSettings | None = None,
    parallel: GuidanceParallel | None = None,
) -> None:
    """One generation of ``args.clips`` clips with random inputs, each phase inside ``around(phase)``, at
    ``speed`` (default: exact with ``args.steps``); with ``parallel``, this process's guidance half."""
    speed = speed or preset("exact", args.steps)
    waveform = clip_waveform(args.clips * args.frames_per_clip, args.fps)
    with around("preprocessing (wav2vec2)"):
        features = audio(waveform, args.fps, args.frames_per_clip)
    kwargs = speed.pipeline_kwargs(3.5)
    if parallel is not None:
        kwargs["guider"] = parallel.guider(kwargs["guider"])
    euler = pipe.scheduler
    pipe.scheduler = speed.scheduler(euler)
    try:
        with around_phases(pipe, around):
            pipe(
                torch.rand(1, 3, args.resolution, args.resolution) * 2 - 1,
                torch.randn(1, 512),
                features,
                torch.zeros(len(features), dtype=torch.long),
                num_frames=features.num_frames,
                frames_per_clip=args.frames_per_clip,
                seed=0,
                vae_batch_size=vae_batch,
                output_type=None,
                **kwargs,
            )
    finally:
        pipe.scheduler = euler


def run_timed(
    pipe: MemoPipeline,
    audio: Wav2VecAudioEncoder,
    args,
    vae_batch: int,
    speed: SpeedSettings | None = None,
    parallel: GuidanceParallel | None = None,
) -> Timer:
    """One timed generation; the Timer holds the per-phase seconds and memory peaks, ``total`` the seconds."""
    device = pipe._execution_device
    timer = Timer(device)
    start = time.perf_counter()
    generate(pipe, audio, args, vae_batch, timer.phase, speed, parallel)
    synchronize(device)
    timer.total = time.perf_counter() - start
    return timer


def count_flops_per_frame(audio: Wav2VecAudioEncoder, args) -> dict[str, float]:
    """FLOPs per video frame of each phase of an exact generation of ``args.steps`` steps, counted by
    memo.bench.flops (torch's FlopCounterMode: matmuls, convolutions and attention; elementwise work is not
    counted): the networks' calls of one clip on the networks built on the meta device, and the audio
    features of one clip's audio on ``audio``'s own device. Per-clip work (VAE, reference net) and per-step
    work scale alike with clips, so one clip gives the per-frame count of any length."""
    clip = clip_flops(
        meta_pipeline(args),
        preset("exact", args.steps),
        args.resolution,
        args.resolution,
        frames_per_clip=args.frames_per_clip,
    )
    wav2vec = audio_features_flops(audio, clip_waveform(args.frames_per_clip, args.fps), args.fps, args.frames_per_clip)
    counts = {
        "preprocessing (wav2vec2)": wav2vec,
        "reference net": clip.reference_net,
        "denoising steps": clip.denoising,
        "VAE encode": clip.vae_encode,
        "VAE decode": clip.vae_decode,
    }
    return {name: flops / args.frames_per_clip for name, flops in counts.items()}


@contextlib.contextmanager
def original_attention(device: torch.device) -> Iterator[str]:
    """Attention as the original release runs it on a GPU: memory-efficient attention (xformers there, SDPA's
    efficient backend here). Other devices have no efficient backend: SDPA's math backend stands in, and
    the yielded label says so."""
    if device.type == "cuda":
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            yield "memory-efficient attention"
    else:
        with sdpa_kernel(SDPBackend.MATH):
            yield "math attention (no efficient backend off CUDA)"


VARIANT_PARTS = {"eager", "compiled", "none", "model", "group"}


def parse_variant(spec: str) -> tuple[bool, str]:
    """``"compiled+model"`` -> (compile, offload); parts: eager/compiled and none/model/group."""
    parts = set(spec.split("+"))
    if not parts <= VARIANT_PARTS or {"eager", "compiled"} <= parts or len(parts & {"none", "model", "group"}) > 1:
        raise SystemExit(f"--variants: {spec!r} is not eager/compiled optionally joined with +none/+model/+group")
    offload = next(iter(parts & {"none", "model", "group"}), "none")
    compiled = "compiled" in parts
    if compiled and offload == "group":
        raise SystemExit("--variants: compiled+group is not supported (see memo/settings/inference.py)")
    return compiled, offload


def build_variant(args, device: torch.device, dtype: torch.dtype, compiled: bool, offload: str):
    """Networks with the same random weights (seed 0), compiled and/or offloaded as asked; warmed up on two
    clips of two steps so that every compiled graph exists before timing. Returns (pipe, audio, compile s)."""
    torch.manual_seed(0)
    pipe, audio = build_pipeline(args.size, device, dtype)
    if offload != "none":
        pipe.to("cpu")  # as loaded from disk: the hooks bring the weights in
    if compiled:
        compile_networks(pipe, mode=args.compile_mode, backend=args.compile_backend)
    apply_offload(pipe, offload, device)
    before = compile_seconds()
    warm = argparse.Namespace(**{**vars(args), "clips": min(2, args.clips), "steps": min(2, args.steps)})
    generate(pipe, audio, warm, args.vae_batch_size, lambda name: contextlib.nullcontext())
    return pipe, audio, compile_seconds() - before


def run_variants(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Each of ``args.variants`` on fresh networks: per phase seconds, s/frame, FLOPs, TFLOP/s, fraction of
    the dense bf16 peak (bf16/fp16 only), peak allocated and reserved memory. Returns one dict per variant."""
    frames = args.clips * args.frames_per_clip
    peak = dense_bf16_peak(device) if dtype in (torch.bfloat16, torch.float16) else None
    results, flops = [], None
    for spec in args.variants.split(","):
        compiled, offload = parse_variant(spec)
        pipe, audio, compile_s = build_variant(args, device, dtype, compiled, offload)
        if flops is None:  # the same work whatever the variant: counted once
            flops = count_flops_per_frame(audio, args)
        timer = run_timed(pipe, audio, args, args.vae_batch_size)
        phases = {}
        for name in PHASES:
            seconds = timer.seconds.get(name, 0.0)
            row = {"seconds": seconds, "s_per_frame": seconds / frames}
            if seconds > 0:
                row["flops_per_frame"] = flops.get(name, 0.0)
                row["tflops_per_s"] = flops.get(name, 0.0) * frames / seconds / 1e12
                if peak is not None:
                    row["fraction_of_peak"] = row["tflops_per_s"] / peak
            if device.type == "cuda":
                row["peak_allocated_gib"] = timer.peak_allocated.get(name, 0) / 2**30
                row["peak_reserved_gib"] = timer.peak_reserved.get(name, 0) / 2**30
            phases[name] = row
        results.append(
            {
                "variant": spec,
                "compiled": compiled,
                "offload": offload,
                "compile_seconds": compile_s,
                "total_seconds": timer.total,
                "s_per_frame": timer.total / frames,
                "phases": phases,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                "dense_bf16_peak_tflops": peak,
            }
        )
        del pipe, audio
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def print_variants(results: list[dict]) -> None:
    for result in results:
        phases = result["phases"].values()
        allocated = max((row.get("peak_allocated_gib", 0.0) for row in phases), default=0.0)
        reserved = max((row.get("peak_reserved_gib", 0.0) for row in phases), default=0.0)
        memory = f", peak {allocated:.2f} GiB allocated / {reserved:.2f} GiB reserved" if reserved else ""
        print(
            f"\n{result['variant']} on {result['device']}: {result['total_seconds']:.2f} s, "
            f"{result['s_per_frame']:.3f} s/frame"
            f"{memory} (compiling: {result['compile_seconds']:.1f} s before timing)"
        )
        print(
            f"{'phase':26}{'s/frame':>10}{'GFLOP/frame':>13}{'TFLOP/s':>9}{'of peak':>9}"
            f"{'alloc GiB':>11}{'reserved GiB':>14}"
        )
        for name, row in result["phases"].items():
            gflop = f"{row['flops_per_frame'] / 1e9:.1f}" if "flops_per_frame" in row else "-"
            tflops = f"{row['tflops_per_s']:.1f}" if "tflops_per_s" in row else "-"
            share = f"{row['fraction_of_peak']:.0%}" if "fraction_of_peak" in row else "-"
            alloc = f"{row['peak_allocated_gib']:.2f}" if "peak_allocated_gib" in row else "-"
            res = f"{row['peak_reserved_gib']:.2f}" if "peak_reserved_gib" in row else "-"
            print(f"{name:26}{row['s_per_frame']:>10.4f}{gflop:>13}{tflops:>9}{share:>9}{alloc:>11}{res:>14}")


def meta_pipeline(args) -> MemoPipeline:
    """The ``args.size`` networks built on the meta device, where memo.bench.flops counts at no cost."""
    return build_pipeline(args.size, torch.device("meta"), DTYPES[args.dtype])[0]


def flops_per_frame(args, speeds: dict[str, SpeedSettings]) -> dict[str, float]:
    """FLOPs per frame of one clip for each of ``speeds``, counted on the networks built on the meta device."""
    meta = meta_pipeline(args)
    return {
        name: clip_flops(meta, speed, args.resolution, args.resolution, frames_per_clip=args.frames_per_clip).per_frame
        for name, speed in speeds.items()
    }


def print_flops_table(args) -> None:
    """FLOPs per frame of exact, of each fast setting alone and of fast, and their share of exact's."""
    counted = flops_per_frame(args, variants(args.steps))
    print(
        f"\n{args.size} size, {args.resolution}x{args.resolution}, clips of {args.frames_per_clip} frames, "
        f"{args.steps} exact steps, guidance 3.5: FLOPs per frame (torch FlopCounterMode, meta device)"
    )
    for name, flops in counted.items():
        print(f"{name:36}{flops / 1e12:>10.2f} TFLOP{flops / counted['exact']:>8.1%} of exact")


def compare_speeds(args, pipe: MemoPipeline, audio: Wav2VecAudioEncoder) -> None:
    """Time one generation per ``--speed`` preset in turn, and print seconds and FLOPs per frame side by side."""
    speeds = {name: preset(name, args.steps) for name in args.speed}
    counted = flops_per_frame(args, speeds)
    frames = args.clips * args.frames_per_clip
    timed = {name: run_timed(pipe, audio, args, args.vae_batch_size, speed).total for name, speed in speeds.items()}
    first = args.speed[0]
    print(
        f"\n{args.size} size, {args.resolution}x{args.resolution}, {args.clips} clips x {args.frames_per_clip} frames, "
        f"{args.steps} exact steps, guidance on, {pipe.device} {args.dtype}"
    )
    print(
        f"{'speed':8}{'total s':>10}{'s/frame':>10}{'TFLOP/frame':>13}{'time vs ' + first:>16}{'FLOPs vs ' + first:>17}"
    )
    for name in speeds:
        print(
            f"{name:8}{timed[name]:>10.2f}{timed[name] / frames:>10.3f}{counted[name] / 1e12:>13.3f}"
            f"{timed[first] / timed[name]:>15.2f}x{counted[name] / counted[first]:>17.1%}"
        )


def parallel_device(args, rank: int) -> torch.device:
    """Rank ``rank``'s device: its own GPU on CUDA, else ``args.device`` (both processes on the CPU)."""
    return torch.device("cuda", rank) if args.device.startswith("cuda") else torch.device(args.device)


def guidance_rank(rank: int, args, port: int, results) -> None:
    """One process of ``--parallel guidance``: the same seeded networks, a warm-up, one timed generation."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    device = parallel_device(args, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    pipe, audio = build_pipeline(args.size, device, DTYPES[args.dtype])
    parallel = GuidanceParallel(device)
    warm_up = argparse.Namespace(**{**vars(args), "clips": 1, "steps": 1})
    run_timed(pipe, audio, warm_up, args.vae_batch_size, parallel=parallel)
    sent, steps = parallel.bytes_sent, parallel.steps
    timer = run_timed(pipe, audio, args, args.vae_batch_size, parallel=parallel)
    per_step = (parallel.bytes_sent - sent) / max(parallel.steps - steps, 1)
    results.put((rank, str(device), timer.total, peak_memory(timer), per_step))
    parallel.close()


def compare_guidance_parallel(args) -> None:
    """``--parallel guidance``: one process, then two, on the same workload; s/frame, memory, bytes per step."""
    import torch.multiprocessing as mp

    if args.device.startswith("cuda") and torch.cuda.device_count() < WORLD_SIZE:
        raise SystemExit(f"--parallel guidance on CUDA needs 2 GPUs, found {torch.cuda.device_count()}.")
    frames = args.clips * args.frames_per_clip
    device, dtype = parallel_device(args, 0), DTYPES[args.dtype]
    torch.manual_seed(0)
    pipe, audio = build_pipeline(args.size, device, dtype)
    run_timed(pipe, audio, argparse.Namespace(**{**vars(args), "clips": 1, "steps": 1}), args.vae_batch_size)
    one = run_timed(pipe, audio, args, args.vae_batch_size)
    del pipe, audio
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(guidance_rank, args=(args, port, results), nprocs=WORLD_SIZE, start_method="spawn")
    ranks = sorted(results.get() for _ in range(WORLD_SIZE))
    print(
        f"\nparallel=guidance, {args.size} size, {args.resolution}x{args.resolution}, {args.clips} clips x "
        f"{args.frames_per_clip} frames, {args.steps} steps, {args.dtype}"
    )
    print(f"{'':22}{'device':>10}{'s/frame':>10}{'bytes sent/step':>17}  peak memory")
    print(f"{'one process':22}{str(device):>10}{one.total / frames:>10.3f}{0:>17,}  {peak_memory(one)}")
    for rank, name, total, peak, per_step in ranks:
        print(f"{f'two processes, rank {rank}':22}{name:>10}{total / frames:>10.3f}{per_step:>17,.0f}  {peak}")
    slowest = max(total for _, _, total, _, _ in ranks)
    print(f"\ntwo processes against one: {one.total / slowest:.2f}x the speed (slower rank's time)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="published sizes or the tiny pack's")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--frames-per-clip", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--vae-batch-size", type=int, default=8)
    parser.add_argument("--baseline", action="store_true", help="also run with the original's settings, for ratios")
    parser.add_argument("--variants", help="comma-separated compile/offload choices, e.g. eager,compiled,model,group")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode for compiled variants")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for compiled variants")
    parser.add_argument("--speed", nargs="+", choices=SPEEDS, help="time these speed presets side by side instead")
    parser.add_argument("--flops", action="store_true", help="only count FLOPs per frame of every speed setting")
    parser.add_argument("--parallel", choices=("guidance",), help="time one video on two processes against one")
    args = parser.parse_args()
    if args.flops:
        print_flops_table(args)
        return
    if args.parallel:
        compare_guidance_parallel(args)
        return
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.variants:
        print_variants(run_variants(args, device, dtype))
        return

    start = time.perf_counter()
    torch.manual_seed(0)
    pipe, audio = build_pipeline(args.size, device, dtype)
    print(f"built {args.size}-size networks on {device} ({args.dtype}) in {time.perf_counter() - start:.1f} s")
    frames = args.clips * args.frames_per_clip
    run_timed(pipe, audio, argparse.Namespace(**{**vars(args), "clips": 1, "steps": 1}), args.vae_batch_size)  # warm-up
    if args.speed:
        compare_speeds(args, pipe, audio)
        return
    ours = run_timed(pipe, audio, args, args.vae_batch_size)
    rows = [("ours", ours.seconds, ours.total, peak_memory(ours))]
    if args.baseline:
        with original_attention(device) as attention:
            base = run_timed(pipe, audio, args, vae_batch=1)
        print(f"original's settings: {attention}, one VAE call per frame, wav2vec2 left on {device}")
        rows.append(("original's set.", base.seconds, base.total, peak_memory(base)))
        again = run_timed(pipe, audio, args, args.vae_batch_size)  # ours once more: drift shows here
        rows.append(("ours, again", again.seconds, again.total, peak_memory(again)))

    print(
        f"\n{args.size} size, {args.resolution}x{args.resolution}, {args.clips} clips x {args.frames_per_clip} frames, "
        f"{args.steps} steps, guidance on, {device} {args.dtype}"
    )
    phases = list(PHASES)
    header = f"{'':16}" + "".join(f"{p:>26}" for p in phases) + f"{'total s':>10}{'s/frame':>10}  peak memory"
    print(header)
    for name, split, total, peak in rows:
        cells = "".join(f"{split.get(p, 0.0):>20.2f} ({split.get(p, 0.0) / total:4.0%})" for p in phases)
        print(f"{name:16}{cells}{total:>10.2f}{total / frames:>10.3f}  {peak}")
    if args.baseline:
        ours_split = {p: (rows[0][1].get(p, 0.0) + rows[2][1].get(p, 0.0)) / 2 for p in phases}
        ours_mean = (rows[0][2] + rows[2][2]) / 2
        print(
            "\nspeed-up over the original's settings (against the mean of our two runs): "
            f"{rows[1][2] / ours_mean:.2f}x overall; "
            + ", ".join(f"{p} {rows[1][1].get(p, 0) / max(ours_split[p], 1e-9):.2f}x" for p in phases[1:])
        )


if __name__ == "__main__":
    main()
