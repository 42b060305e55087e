"""What ``paste_back`` costs, measured: pasting each frame against the VAE decode of the same frames, the larger
H.264 encode, and peak host memory against the video's length.

    python scripts/paste_back_benchmark.py --device cuda --dtype bf16        # on a GPU: the ratio that matters
    python scripts/paste_back_benchmark.py --device cpu --dtype fp32 --frames 8
    python scripts/paste_back_benchmark.py --memory                          # peak host memory, 2, 6 and 12 clips

The cost part decodes ``--frames`` random latents with the SD VAE's architecture (sd-vae-ft-mse, random weights,
no downloads) at ``--size``, then pastes the decoded frames into a ``--photo`` picture (4K by default, written at
``--max_output_side``) exactly as the generator does (``PasteBack.streaming``: tensor to 8-bit, resample, blend),
and encodes them with the program's writer at the crop's size and at the pasted size. It prints seconds per frame
of each, the device, and the ratio of the paste to the decode.

``--memory`` renders whole videos with the tiny pack (``inference.py --tiny``'s random models, on the CPU) from a
4K photo, ``--lengths`` clips long (2, 6 and 12), with ``paste_back`` false and true, each in a fresh process, and
prints each process's peak resident memory, against what holding the pasted frames would take. With paste_back it
grows until libx264's lookahead is full (about 40 frames of the larger size, reached within 3 clips), then stays
flat.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
from diffusers import AutoencoderKL
from PIL import Image

from memo.bench.memory import SD_VAE_CONFIG
from memo.conditions.framing import crop_box
from memo.conditions.paste_back import PasteBack, output_size
from memo.constants import DTYPES
from memo.io.video_writer import VideoWriter

REPO = Path(__file__).resolve().parents[1]
SPEECH = REPO / "assets" / "examples" / "speech.wav"
FRAMES_PER_CLIP = 16
FPS = 30


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def photo(width: int, height: int) -> Image.Image:
    """A busy picture (shading and grain) of the given size; the tiny detector finds its face at its usual place."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([60 + 120 * x / width, 50 + 100 * y / height, 110 + 60 * np.sin(x / 150) * np.cos(y / 130)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8))


def parse_size(text: str) -> tuple[int, int]:
    width, height = (int(part) for part in text.lower().split("x"))
    return width, height


def measure_cost(args: argparse.Namespace) -> None:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    with torch.device(device):
        vae = AutoencoderKL(**SD_VAE_CONFIG).eval()
    torch.nn.Module.to(vae, dtype)  # torch's own cast: diffusers' warns about float32 modules, of which it has none
    side = args.size // 8
    latents = torch.randn(args.frames, 4, side, side, device=device, dtype=dtype)
    frames = []
    with torch.inference_mode():
        vae.decode(latents[:1])  # warm-up: kernels chosen, memory allocated
        synchronize(device)
        start = time.perf_counter()
        for chunk in latents.split(args.vae_batch_size):
            frames.append(vae.decode(chunk).sample)
        synchronize(device)
        decode = (time.perf_counter() - start) / args.frames
    # As the pipeline hands clips to the generator: (3, n, H, W) in [0, 1] on the CPU.
    clip = (torch.cat(frames).float() / 2 + 0.5).clamp(0, 1).permute(1, 0, 2, 3).cpu()

    picture = photo(*args.photo)
    face = tuple(v * max(picture.size) / 64 for v in (20, 11, 44, 41))  # where the tiny detector puts a face
    paste = PasteBack.plan(picture, crop_box(picture.size, face, args.size, args.size), (args.size,) * 2, args.max_side)
    on_clip = paste.streaming(lambda pixels: None)
    on_clip(clip[:, :1])  # warm-up: the band's strips are made on the first frame
    start = time.perf_counter()
    on_clip(clip)
    pasted = (time.perf_counter() - start) / args.frames

    encode = {}
    pasted_frames: list[np.ndarray] = []
    paste.streaming(lambda pixels: pasted_frames.append(pixels.copy()))(clip)
    with tempfile.TemporaryDirectory() as folder:
        for name, size, write in (
            ("crop", (args.size, args.size), lambda writer: writer.write(clip)),
            ("pasted", paste.size, lambda writer: [writer.write(frame) for frame in pasted_frames]),
        ):
            start = time.perf_counter()
            with VideoWriter(Path(folder) / f"{name}.mp4", FPS, *size) as writer:
                write(writer)
            encode[name] = (time.perf_counter() - start) / args.frames

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}, {args.dtype}; {args.frames} frames of {args.size}x{args.size}")
    print(
        f"photo {args.photo[0]}x{args.photo[1]} -> output {paste.size[0]}x{paste.size[1]}, crop "
        f"{paste.roi[2] - paste.roi[0]}x{paste.roi[3] - paste.roi[1]}, band {paste.band:.0f} px"
    )
    print(f"VAE decode      {decode * 1000:8.2f} ms/frame")
    print(f"paste back      {pasted * 1000:8.2f} ms/frame   ratio paste / VAE decode = {pasted / decode:.2g}")
    print(f"encode (crop)   {encode['crop'] * 1000:8.2f} ms/frame   {args.size}x{args.size}")
    print(f"encode (pasted) {encode['pasted'] * 1000:8.2f} ms/frame   {paste.size[0]}x{paste.size[1]}")


def render_child(args: argparse.Namespace) -> None:
    """One whole render with the tiny pack and paste_back, then this process's peak resident memory."""
    from memo.apps.cli import model_settings, setup_logging
    from memo.generator import MemoGenerator
    from memo.settings.inference import load_config
    from memo.tiny.pack import cached_tiny_pack

    setup_logging()
    folder = Path(args.child)
    image, audio = folder / "photo.png", folder / f"speech_{args.clips}.wav"
    photo(*args.photo).save(image)
    samples, rate = soundfile.read(SPEECH, dtype="float32")
    seconds = args.clips * FRAMES_PER_CLIP / FPS - 0.01  # exactly that many clips
    soundfile.write(audio, np.resize(samples, int(seconds * rate)), rate)
    overrides = [*model_settings(cached_tiny_pack()), "inference_steps=1", "cfg_scale=1", "vocal_separation=false"]
    overrides += ["device=cpu", "emotion=neutral", f"paste_back={args.paste}", f"max_output_side={args.max_side}"]
    generator = MemoGenerator(load_config(None, overrides))
    generator.generate(image, audio, folder / f"out_{args.clips}.mp4", overwrite=True)
    print(f"peak_rss_bytes={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}")


def measure_memory(args: argparse.Namespace) -> None:
    width, height = output_size(args.photo, args.max_side)
    peaks: dict[tuple[str, int], int] = {}
    with tempfile.TemporaryDirectory() as folder:
        for paste in ("false", "true"):
            for clips in args.lengths:
                command = [sys.executable, __file__, "--child", folder, "--clips", str(clips), "--paste", paste]
                command += ["--photo", f"{args.photo[0]}x{args.photo[1]}", "--max_side", str(args.max_side)]
                result = subprocess.run(command, capture_output=True, text=True, check=False)
                line = [text for text in result.stdout.splitlines() if text.startswith("peak_rss_bytes=")]
                if result.returncode or not line:
                    sys.exit(f"the {clips}-clip render (paste_back={paste}) failed:\n{result.stderr}")
                peaks[paste, clips] = int(line[0].split("=")[1])
    frame = width * height * 3
    print(f"tiny pack on the CPU, a {args.photo[0]}x{args.photo[1]} photo; paste_back=true writes {width}x{height}")
    print("clips  frames  paste_back=false  paste_back=true  (the pasted frames held together)")
    for clips in args.lengths:
        frames = clips * FRAMES_PER_CLIP
        plain, pasted = peaks["false", clips] / 2**20, peaks["true", clips] / 2**20
        print(f"{clips:5d}  {frames:6d}  {plain:12.1f} MiB  {pasted:11.1f} MiB  ({frames * frame / 2**20:.0f} MiB)")
    first, last = args.lengths[-2], args.lengths[-1]
    grown = (peaks["true", last] - peaks["true", first]) / 2**20
    print(f"paste_back=true, {first} -> {last} clips: {grown:+.1f} MiB; one pasted frame is {frame / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--size", type=int, default=512, help="generated frame side (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=16, help="frames to decode and paste (default: %(default)s)")
    parser.add_argument("--vae_batch_size", type=int, default=8)
    parser.add_argument("--photo", type=parse_size, default=(3840, 2160), help="photo WxH (default: 3840x2160)")
    parser.add_argument("--max_side", type=int, default=1920, help="max_output_side (default: %(default)s)")
    parser.add_argument("--memory", action="store_true", help="peak host memory of whole renders of --lengths clips")
    parser.add_argument(
        "--lengths", type=lambda text: [int(n) for n in text.split(",")], default=[2, 6, 12], help="default: 2,6,12"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--clips", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--paste", default="true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        render_child(args)
    elif args.memory:
        measure_memory(args)
    else:
        measure_cost(args)


if __name__ == "__main__":
    main()
