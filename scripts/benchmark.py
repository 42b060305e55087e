"""Speed and memory of generation with the full-size MEMO architecture and random weights (no downloads).

    python scripts/benchmark.py --device cuda --dtype bf16 --resolution 512 --clips 2 --steps 20 --baseline
    python scripts/benchmark.py --device cpu --dtype fp32 --resolution 64 --clips 1 --steps 2
    python scripts/benchmark.py --device cpu --dtype fp32 --resolution 64 --clips 1 --speed exact fast
    python scripts/benchmark.py --flops   # FLOPs per frame of every speed setting, counted, no run

Prints seconds per frame, peak memory, and the time split between preprocessing (wav2vec2 features and
condition projections), the reference net, the denoising steps, VAE encoding and VAE decoding. With
``--baseline`` the same workload also runs the original release's way (one VAE call per frame, attention
computed eagerly with explicit softmax) in the same process, then ours once more (so drift between runs
shows), and the table reports the speed-up as a ratio. ``--speed exact fast`` times each speed preset
(memo/speed.py) in turn in the same process and reports FLOPs per frame next to the time; FLOPs are counted
with PyTorch's FLOP counter on the same networks built on the ``meta`` device (memo/flops.py).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import resource
import time
from collections import defaultdict
from collections.abc import Iterator

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, JointAttnProcessor2_0
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from memo.conditions.audio_features import Wav2VecAudioEncoder
from memo.flops import clip_flops
from memo.models.diffusion_net import DiffusionNet
from memo.models.projections import AudioProjModel, ImageProjModel
from memo.models.reference_net import ReferenceNet
from memo.pipeline import MemoPipeline
from memo.speed import SPEEDS, SpeedSettings, preset, variants
from memo.tiny.networks import TOKEN_DIM, UNET, WAV2VEC_DIM, WAV2VEC_LAYERS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=256)
TINY_VAE = dict(block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Timer:
    """Accumulates wall time per named phase, synchronising the device around each."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start

    def wrap(self, obj, method: str, name: str) -> None:
        """Time every call of ``obj.method`` as phase ``name``."""
        original = getattr(obj, method)

        def timed(*args, **kwargs):
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(obj, method, timed)


def build_pipeline(size: str, device: torch.device, dtype: torch.dtype) -> tuple[MemoPipeline, Wav2VecAudioEncoder]:
    """Random-weight networks at the published sizes (``full``) or the tiny ones, built on ``device``."""
    with torch.device(device):
        if size == "full":
            nets = dict(reference_net=ReferenceNet(), diffusion_net=DiffusionNet(), image_proj=ImageProjModel(),
                        audio_proj=AudioProjModel(), vae=AutoencoderKL(**SD_VAE))
            wav2vec = Wav2Vec2Model(Wav2Vec2Config())
        else:
            nets = dict(reference_net=ReferenceNet(**UNET), diffusion_net=DiffusionNet(**UNET, audio_attention_dim=TOKEN_DIM),
                        image_proj=ImageProjModel(cross_attention_dim=TOKEN_DIM),
                        audio_proj=AudioProjModel(blocks=WAV2VEC_LAYERS, channels=WAV2VEC_DIM, intermediate_dim=32,
                                                  output_dim=TOKEN_DIM, context_tokens=4),
                        vae=AutoencoderKL(**TINY_VAE))
            wav2vec = Wav2Vec2Model(Wav2Vec2Config(hidden_size=WAV2VEC_DIM, num_hidden_layers=WAV2VEC_LAYERS,
                                                   num_attention_heads=2, intermediate_size=32, conv_dim=(16,) * 7,
                                                   num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2))
    pipe = MemoPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), **nets).to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, Wav2VecAudioEncoder(wav2vec.eval(), Wav2Vec2FeatureExtractor()).to(device)


def use_eager_attention(pipe: MemoPipeline, eager: bool) -> None:
    """Switch the self- and cross-attention layers between explicit softmax and PyTorch SDPA."""
    for net in (pipe.reference_net, pipe.diffusion_net):
        for module in net.modules():
            if isinstance(module, Attention) and not isinstance(module.processor, JointAttnProcessor2_0):
                module.set_processor(AttnProcessor() if eager else AttnProcessor2_0())


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (GPU)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def run(
    pipe: MemoPipeline, audio: Wav2VecAudioEncoder, args, vae_batch: int, speed: SpeedSettings | None = None
) -> tuple[dict[str, float], float]:
    """One generation of ``args.clips`` clips (``speed``: default exact); returns the time split and the total seconds."""
    speed = speed or preset("exact", args.steps)
    device = pipe.device
    timer = Timer(device)
    frames = args.clips * args.frames_per_clip
    waveform = torch.randn(math.ceil(frames / args.fps * 16000) - 400) * 0.1
    start = time.perf_counter()
    with timer.phase("preprocessing (wav2vec2)"):
        features = audio(waveform, args.fps, args.frames_per_clip)
    for obj, method, name in ((pipe, "encode_frames", "VAE encode"), (pipe, "decode_latents", "VAE decode"),
                              (pipe.reference_net, "forward", "reference net"), (pipe.diffusion_net, "forward", "denoising steps")):
        timer.wrap(obj, method, name)
    try:
        pipe(torch.rand(1, 3, args.resolution, args.resolution) * 2 - 1, torch.randn(1, 512), features,
             torch.zeros(len(features), dtype=torch.long), num_frames=features.num_frames,
             frames_per_clip=args.frames_per_clip, guidance_scale=3.5, seed=0,
             vae_batch_size=vae_batch, output_type=None, **speed.pipeline_kwargs())
    finally:
        for obj, method in ((pipe, "encode_frames"), (pipe, "decode_latents"), (pipe.reference_net, "forward"),
                            (pipe.diffusion_net, "forward")):
            del obj.__dict__[method]
    synchronize(device)
    return dict(timer.seconds), time.perf_counter() - start


def flops_per_frame(args, speeds: dict[str, SpeedSettings]) -> dict[str, float]:
    """FLOPs per frame of one clip for each of ``speeds``, counted on the networks built on the meta device."""
    meta, _ = build_pipeline(args.size, torch.device("meta"), DTYPES[args.dtype])
    return {
        name: clip_flops(meta, speed, args.resolution, args.resolution, frames_per_clip=args.frames_per_clip).per_frame
        for name, speed in speeds.items()
    }


def print_flops_table(args) -> None:
    """FLOPs per frame of exact, of each fast setting alone and of fast, and their share of exact's."""
    counted = flops_per_frame(args, variants(args.steps))
    print(f"\n{args.size} size, {args.resolution}x{args.resolution}, clips of {args.frames_per_clip} frames, "
          f"{args.steps} exact steps, guidance 3.5: FLOPs per frame (torch FlopCounterMode, meta device)")
    for name, flops in counted.items():
        print(f"{name:36}{flops / 1e12:>10.2f} TFLOP{flops / counted['exact']:>8.1%} of exact")


def compare_speeds(args, pipe: MemoPipeline, audio: Wav2VecAudioEncoder) -> None:
    """Time one generation per ``--speed`` preset in turn, and print seconds and FLOPs per frame side by side."""
    speeds = {name: preset(name, args.steps) for name in args.speed}
    counted = flops_per_frame(args, speeds)
    frames = args.clips * args.frames_per_clip
    timed = {name: run(pipe, audio, args, args.vae_batch_size, speed)[1] for name, speed in speeds.items()}
    first = args.speed[0]
    print(f"\n{args.size} size, {args.resolution}x{args.resolution}, {args.clips} clips x {args.frames_per_clip} frames, "
          f"{args.steps} exact steps, guidance on, {pipe.device} {args.dtype}")
    print(f"{'speed':8}{'total s':>10}{'s/frame':>10}{'TFLOP/frame':>13}{'time vs ' + first:>16}{'FLOPs vs ' + first:>17}")
    for name in speeds:
        print(f"{name:8}{timed[name]:>10.2f}{timed[name] / frames:>10.3f}{counted[name] / 1e12:>13.3f}"
              f"{timed[first] / timed[name]:>15.2f}x{counted[name] / counted[first]:>17.1%}")


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
    parser.add_argument("--baseline", action="store_true", help="also run the original's way, for ratios")
    parser.add_argument("--speed", nargs="+", choices=SPEEDS, help="time these speed presets side by side instead")
    parser.add_argument("--flops", action="store_true", help="only count FLOPs per frame of every speed setting")
    args = parser.parse_args()
    if args.flops:
        print_flops_table(args)
        return
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    start = time.perf_counter()
    torch.manual_seed(0)
    pipe, audio = build_pipeline(args.size, device, dtype)
    print(f"built {args.size}-size networks on {device} ({args.dtype}) in {time.perf_counter() - start:.1f} s")
    frames = args.clips * args.frames_per_clip
    run(pipe, audio, argparse.Namespace(**{**vars(args), "clips": 1, "steps": 1}), args.vae_batch_size)  # warm-up
    if args.speed:
        compare_speeds(args, pipe, audio)
        return
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ours, ours_total = run(pipe, audio, args, args.vae_batch_size)
    ours_peak = peak_memory(device)
    rows = [("ours", ours, ours_total, ours_peak)]
    if args.baseline:
        use_eager_attention(pipe, eager=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base, base_total = run(pipe, audio, args, vae_batch=1)
        rows.append(("original's way", base, base_total, peak_memory(device)))
        use_eager_attention(pipe, eager=False)
        again, again_total = run(pipe, audio, args, args.vae_batch_size)  # ours once more: drift shows here
        rows.append(("ours, again", again, again_total, ours_peak))

    print(f"\n{args.size} size, {args.resolution}x{args.resolution}, {args.clips} clips x {args.frames_per_clip} frames, "
          f"{args.steps} steps, guidance on, {device} {args.dtype}")
    phases = ["preprocessing (wav2vec2)", "reference net", "denoising steps", "VAE encode", "VAE decode"]
    header = f"{'':16}" + "".join(f"{p:>26}" for p in phases) + f"{'total s':>10}{'s/frame':>10}  peak memory"
    print(header)
    for name, split, total, peak in rows:
        cells = "".join(f"{split.get(p, 0.0):>20.2f} ({split.get(p, 0.0) / total:4.0%})" for p in phases)
        print(f"{name:16}{cells}{total:>10.2f}{total / frames:>10.3f}  {peak}")
    if args.baseline:
        ours_split = {p: (rows[0][1].get(p, 0.0) + rows[2][1].get(p, 0.0)) / 2 for p in phases}
        ours_mean = (rows[0][2] + rows[2][2]) / 2
        print(f"\nspeed-up over the original's way (against the mean of our two runs): {rows[1][2] / ours_mean:.2f}x overall; "
              + ", ".join(f"{p} {rows[1][1].get(p, 0) / max(ours_split[p], 1e-9):.2f}x" for p in phases[1:]))


if __name__ == "__main__":
    main()
