"""What exact resume costs (issue 27), measured on the tiny pack and counted at 512x512 bf16.

    python scripts/resume_benchmark.py                      # tiny pack on the CPU, 6 clips of 16 frames
    python scripts/resume_benchmark.py --clips 8 --repeat 3

Measured, all in one process on the same device (named in the output), the smallest of ``--repeat`` runs each:

- the baseline: the clips rendered straight into one mp4 (:class:`memo.io.video_writer.VideoWriter`, no progress kept);
- a render as every render now goes (segments, a record per clip, the playlist, the mp4 remuxed; no memory
  snapshot in so short a run), and its overhead over the baseline;
- the same with a memory snapshot after every clip (``resume_snapshot_minutes=0``): the cost of one snapshot;
- a resume at the last clip with no snapshot (every done clip's memory update replayed): the replay's time per
  clip as a share of a clip's rendering.

Then the costs counted at 512x512 bf16 from the real shapes: the latents kept per clip, the temporal memory
(6.5 GiB, ``memo/runtime/memory.py``), disk written per minute of video and per hour of rendering, and the
resume time as a share of the time rendered, at ``--clip-seconds`` per clip (H100: 16 frames x 0.43 s).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import soundfile
import torch
from omegaconf import OmegaConf

from memo.generator import MemoGenerator
from memo.io.job_state import FIRST_SNAPSHOT_SECONDS, snapshot_due
from memo.io.video_writer import VideoWriter
from memo.pipeline import MemoPipeline
from memo.settings.inference import load_config
from memo.tiny.pack import cached_tiny_pack

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGE = REPO / "assets" / "examples" / "portrait.jpg"
EXAMPLE_AUDIO = REPO / "assets" / "examples" / "speech.wav"
MEMORY_BYTES_512 = 6.5 * 1024**3
"""The temporal memory at 512x512 in bf16 (memo/runtime/memory.py)."""
FRAMES_PER_CLIP = 16
LATENT_BYTES_512 = 4 * FRAMES_PER_CLIP * 64 * 64 * 2
"""One clip's denoised latents at 512x512 in bf16: 4 channels x 16 frames x 64 x 64 x 2 bytes."""
HOST_COPY_BYTES_PER_SECOND = 6e9
"""A GPU's memory copied to pageable host memory over PCIe: about 6 GB/s (counted, not measured here)."""
SEGMENT_BYTES_PER_MINUTE = 10e6
"""512x512 H.264 at crf 18 with AAC: about 10 MB a minute (memo/io/video.py, MIN_FREE_BYTES)."""


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=6, help="clips of 16 frames to render (default %(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per clip (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each measurement (default %(default)s)")
    parser.add_argument("--clip-seconds", type=float, default=16 * 0.43, help="a 512x512 clip's time, counting")
    parser.add_argument("--snapshot-minutes", type=float, default=10.0, help="resume_snapshot_minutes, counting")
    args = parser.parse_args()

    pack = cached_tiny_pack()
    overrides = [f"{k}={v}" for k, v in OmegaConf.to_container(OmegaConf.load(pack)).items()]
    overrides += [f"inference_steps={args.steps}", "vocal_separation=false", "emotion=neutral"]
    generator = MemoGenerator(load_config(None, overrides))
    generator.pipeline.set_progress_bar_config(disable=True)
    device = torch.cuda.get_device_name() if generator.device.type == "cuda" else f"{generator.device} (CPU)"
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        samples, rate = soundfile.read(EXAMPLE_AUDIO, dtype="float32")
        seconds = args.clips * FRAMES_PER_CLIP / generator.config.video.fps - 0.05
        soundfile.write(folder / "talk.wav", samples[: round(seconds * rate)], rate)
        image = generator.prepare_image(EXAMPLE_IMAGE)
        audio = generator.prepare_audio(folder / "talk.wav")
        clips = len(audio.features) // FRAMES_PER_CLIP
        size = generator.config.video.size

        def baseline():
            with VideoWriter(
                folder / "base.mp4", generator.config.video.fps, *size, audio=audio.source, overwrite=True
            ) as w:
                generator.render_clips(image, audio, 42, w.write)

        def segments(gen=generator):
            gen.render(image, audio, folder / "new.mp4", 42, overwrite=True)

        every_clip = generator.with_settings(resume_snapshot_minutes=0)
        baseline()  # warm-up: first-call costs (allocations, libx264 start) out of the timings
        runs = {"base": [], "new": [], "snap": []}
        for _ in range(args.repeat):  # interleaved, so that a busy machine slows each alike
            runs["base"].append(timed(baseline))
            runs["new"].append(timed(segments))
            runs["snap"].append(timed(lambda: segments(every_clip)))
        base, new, snap = (min(runs[key]) for key in ("base", "new", "snap"))

        # A resume at the last clip with no snapshot: the take-up replays every done clip's memory update.
        take_up_seconds = []
        original = MemoPipeline._take_up

        def counted(self, *a, **k):
            start = time.perf_counter()
            try:
                return original(self, *a, **k)
            finally:
                take_up_seconds.append(time.perf_counter() - start)

        class Stop(Exception):
            pass

        def stop_at_last_clip(fraction, what):
            if what.startswith(f"clip {clips}/"):
                raise Stop

        replays = []
        for _ in range(args.repeat):
            try:
                generator.render(image, audio, folder / "stopped.mp4", 42, overwrite=True, progress=stop_at_last_clip)
            except Stop:
                pass
            MemoPipeline._take_up = counted
            try:
                generator.render(image, audio, folder / "stopped.mp4", 42, overwrite=True)
            finally:
                MemoPipeline._take_up = original
            replays.append(take_up_seconds.pop())
        replay = min(replays)

    clip_time = new / clips
    replay_share = replay / ((clips - 1) * clip_time)
    # The replay runs one step of a clip's steps (and its conditions and decoding): at the counted
    # inference_steps=20 its share is about (steps / 20) of what is measured here at --steps.
    replay_share_20 = replay_share * args.steps / 20
    snapshot_cost = max(snap - new, 0.0) / clips
    print(f"device: {device}; tiny pack, {clips} clips x {args.steps} steps, {size[0]}x{size[1]}")
    print(f"baseline (one mp4, nothing kept): {base:.2f} s")
    print(
        f"segments + records + remux:       {new:.2f} s  ({new / base:.3f} x baseline, overhead {new / base - 1:+.1%})"
    )
    print(
        f"+ memory snapshot every clip:     {snap:.2f} s  (one snapshot {snapshot_cost:.3f} s, "
        f"{snapshot_cost / clip_time:.1%} of a clip)"
    )
    print(f"replay of {clips - 1} clips on resume:      {replay:.2f} s  ({replay_share:.1%} of their rendering time)")

    # Counted at 512x512 bf16, on the schedule the generator follows (memo.io.job_state.snapshot_due).
    every = 60 * args.snapshot_minutes
    clips_per_minute_video = 60 * 30 / FRAMES_PER_CLIP
    per_minute_video = clips_per_minute_video * LATENT_BYTES_512 + SEGMENT_BYTES_PER_MINUTE
    read_seconds = MEMORY_BYTES_512 / 1e9  # a snapshot read at 1 GB/s
    copy_seconds = MEMORY_BYTES_512 / HOST_COPY_BYTES_PER_SECOND  # the render waits for this part only
    rendered, held, snapshots, worst, share_from = 0.0, 0.0, [], 0.0, None
    while rendered < 2 * 3600:
        rendered += args.clip_seconds
        share = (read_seconds * (held > 0) + (rendered - held) * replay_share_20) / rendered  # kill -9 now
        worst = max(worst, share) if rendered > FIRST_SNAPSHOT_SECONDS else worst
        share_from = None if share > 0.05 else (share_from if share_from is not None else rendered)
        if snapshot_due(rendered - held, held, every):
            held = rendered
            snapshots.append(rendered)
    first_hour = sum(1 for at in snapshots if at <= 3600)
    later_hour = sum(1 for at in snapshots if 3600 < at <= 7200)
    latents_per_hour = 3600 / args.clip_seconds * LATENT_BYTES_512
    print(
        f"counted at 512x512 bf16, {args.clip_seconds:.2f} s per clip, "
        f"snapshots at most every {args.snapshot_minutes:g} min:"
    )
    print(f"  latents per clip {LATENT_BYTES_512 / 2**20:.2f} MiB; temporal memory {MEMORY_BYTES_512 / 2**30:.1f} GiB")
    print(f"  disk written per minute of video (latents + segments): {per_minute_video / 2**20:.0f} MiB")
    print(
        f"  snapshots: {first_hour} in the first hour, {later_hour} in the second: "
        f"{(first_hour * MEMORY_BYTES_512 + latents_per_hour) / 2**30:.1f} GiB and "
        f"{(later_hour * MEMORY_BYTES_512 + latents_per_hour) / 2**30:.1f} GiB written"
    )
    print(
        f"  the render's cost of a snapshot (its copy to the host at {HOST_COPY_BYTES_PER_SECOND / 1e9:g} GB/s; the "
        f"disk write runs beside it): {copy_seconds:.1f} s, {first_hour * copy_seconds / 3600:.2%} of the first hour"
    )
    print(
        f"  kill -9 (replay share scaled to 20 steps: {replay_share_20:.1%}, snapshot read {read_seconds:.0f} s): "
        f"at most {worst:.1%} of the time rendered after the first {FIRST_SNAPSHOT_SECONDS / 60:g} min, "
        f"<= 5 % from {share_from / 60:.1f} min on; a handled signal: the snapshot read only"
    )


if __name__ == "__main__":
    main()
