"""What the speed settings cost in fidelity, measured on a tiny MEMO trained here on synthetic talking clips.

    python scripts/measure_fidelity.py --work_dir fidelity [--train_steps 600] [--clips 3]

Random weights say nothing about caching or few-step solvers (they rely on smooth step-to-step behaviour
that only a trained model has), so this script makes a model that has learned something, on CPU:

1. clips: talking clips made from ``assets/examples/portrait.jpg`` and ``speech.wav``: a 64x64 face crop
   whose head moves and whose mouth opens with the speech envelope, with a flat lower-right corner (a
   caption patch) and the speech as the audio track; the last clip is held out;
2. the tiny model pack (``scripts/make_tiny_checkpoint.py``), whose VAE is first fitted to the training
   clips' frames (a random VAE would make every pixel comparison meaningless; the VAE is not what is
   measured);
3. ``scripts/prepare_data.py`` on the clips, then ``accelerate launch finetune.py`` (CPU) training the
   tiny MEMO networks on the training clips;
4. on the held-out clip, with the same noise: the untrained and the trained model at the exact settings
   against the ground-truth frames, then each speed setting and the ``fast`` preset against the exact
   path's frames and against the ground truth (PSNR in dB and SSIM on frames in [0, 1]), and the paper's
   figures against the ground truth (FID, FVD, CSIM, motion, and Sync-C / Sync-D / offset against the clip's
   sound, from memo.evaluation as scripts/evaluate.py computes them, with ``--metric_models``' networks).

Each stage keeps its output in ``--work_dir`` and is skipped when that output is there, so a rerun only
evaluates. Prints a Markdown table (and writes ``results.json``). Run it alone: it trains on all cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import soundfile
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from memo.evaluation import metrics
from memo.evaluation.models import MetricModels
from memo.evaluation.run import score_frames
from memo.io.audio import audio_from_samples
from memo.io.video_writer import VideoWriter
from memo.pipeline import MemoPipeline
from memo.sampling.guidance import plan_steps
from memo.sampling.speed import SpeedSettings, variants
from memo.tiny.pack import write_tiny_pack

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "assets" / "examples"
SIZE, FPS, SAMPLE_RATE = 64, 30, 16000
CLIP_SECONDS = 2.4  # 72 frames: 9 clips of 8 frames
FRAMES_PER_CLIP, PAST_FRAMES = 8, 4
FACE_CENTRE, MOUTH, CROP = (230, 140), (226, 150), 256  # in the 512x512 portrait: face crop centre, mouth, side
CAPTION_BOX = (38, 40, SIZE, SIZE)  # flat lower-right patch (x1, y1, x2, y2): the tiny face detector's second box
GUIDANCE = 3.5
PAPER_FIGURES = ("fid", "fvd", "csim", "motion", "sync_c", "sync_d", "sync_offset")


def speech_envelope(samples: np.ndarray, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame RMS of the speech scaled to 0..1, and its slow (exponentially smoothed) version."""
    per_frame = SAMPLE_RATE // FPS
    rms = np.sqrt(np.mean(samples[: frames * per_frame].reshape(frames, per_frame) ** 2, axis=1))
    fast = np.clip(rms / np.percentile(rms, 95), 0, 1)
    slow = np.zeros_like(fast)
    for i, value in enumerate(fast):
        slow[i] = value if i == 0 else 0.85 * slow[i - 1] + 0.15 * value
    return fast, slow


def talking_frame(portrait: Image.Image, opening: float, slow: float) -> np.ndarray:
    """One 64x64 frame: the mouth opened by ``opening`` (0..1), the head moved by the slow envelope."""
    image = portrait.copy()
    draw = ImageDraw.Draw(image)
    mx, my = MOUTH
    half_height = 2 + 14 * opening
    draw.ellipse((mx - 20, my - half_height, mx + 20, my + half_height), fill=(70, 20, 25))
    cx, cy = FACE_CENTRE[0] + 24 * (slow - 0.3), FACE_CENTRE[1] - 8 * opening
    box = (cx - CROP / 2, cy - CROP / 2, cx + CROP / 2, cy + CROP / 2)
    frame = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=box)).copy()
    x1, y1, x2, y2 = CAPTION_BOX
    frame[y1:y2, x1:x2] = (40, 44, 70)
    return frame


def make_clips(folder: Path, count: int) -> list[Path]:
    """``count`` mp4 clips of CLIP_SECONDS each from consecutive stretches of the example speech."""
    portrait = Image.open(EXAMPLES / "portrait.jpg").convert("RGB")
    speech, rate = soundfile.read(EXAMPLES / "speech.wav", dtype="float32")
    assert rate == SAMPLE_RATE, f"{EXAMPLES / 'speech.wav'} must be 16 kHz"
    frames = round(CLIP_SECONDS * FPS)
    samples = frames * SAMPLE_RATE // FPS
    if count * samples > len(speech):
        raise SystemExit(f"The example speech holds at most {len(speech) // samples} clips of {CLIP_SECONDS} s.")
    paths = []
    for i in range(count):
        held_out = i == count - 1
        target = folder / ("heldout" if held_out else "train") / f"clip{i}.mp4"
        target.parent.mkdir(parents=True, exist_ok=True)
        segment = speech[i * samples : (i + 1) * samples]
        fast, slow = speech_envelope(segment, frames)
        video = np.stack([talking_frame(portrait, o, s) for o, s in zip(fast, slow)])
        sound = audio_from_samples(segment, SAMPLE_RATE, f"clip{i}")
        with VideoWriter(target, FPS, SIZE, SIZE, audio=sound, overwrite=True, crf=12) as writer:
            writer.write(video)
        paths.append(target)
    return paths


def read_frames(path: Path) -> np.ndarray:
    """(n, H, W, 3) uint8 frames of an mp4."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def fit_vae(pack: Path, videos: list[Path], steps: int) -> None:
    """Fit the pack's tiny VAE to the frames of ``videos`` (MSE plus a small KL term) and save it in place."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(pack / "vae")
    frames = torch.from_numpy(np.concatenate([read_frames(v) for v in videos])).permute(0, 3, 1, 2).float() / 127.5 - 1
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    vae.train()
    for step in range(steps):
        batch = frames[torch.randint(0, len(frames), (16,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step}: reconstruction MSE {loss.item():.4f}", flush=True)
    vae.eval().save_pretrained(pack / "vae")


def run(command: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, env=env, check=True)


def prepare(work: Path, pack_config: Path) -> None:
    for split in ("train", "heldout"):
        if not (work / "prepared" / split / "metadata.jsonl").is_file():
            run([sys.executable, "scripts/prepare_data.py", "--input_dir", str(work / "clips" / split),
                 "--output_dir", str(work / "prepared" / split), "--config", str(pack_config)])  # fmt: skip
        prepared = [line for line in (work / "prepared" / split / "metadata.jsonl").read_text().splitlines() if line]
        if not prepared:
            raise SystemExit(
                f"prepare_data.py prepared no {split} clip; see {work / 'prepared' / split}/failures.jsonl."
            )


def finetune(work: Path, pack: Path, steps: int) -> Path:
    """Train the tiny networks on the training clips; returns the final checkpoint folder."""
    run_dir = work / "runs" / "tiny"
    checkpoint = run_dir / f"checkpoint-{steps}"
    if checkpoint.is_dir():
        return checkpoint
    config = OmegaConf.load(REPO / "configs" / "finetune.yaml")
    settings = {
        "output_dir": str(work / "runs"), "report_to": "none", "seed": 0, "mixed_precision": "no",
        "model_name_or_path": str(pack), "vae": str(pack / "vae"),
        "data.data_dirs": [str(work / "prepared" / "train")], "data.width": SIZE, "data.height": SIZE,
        "data.num_generated_frames_per_clip": FRAMES_PER_CLIP, "data.num_past_frames": PAST_FRAMES,
        "data.num_workers": 0,
        "max_train_steps": steps, "learning_rate": 3e-4, "checkpointing_steps": steps, "logging_steps": 25,
        "gradient_checkpointing": False, "robust_training": False, "vae_batch_size": 16,
        "train_reference_net": True, "train_image_proj": True, "train_audio_proj": True, "trainable_modules": [],
        "uncond_img_ratio": 0.1, "uncond_audio_ratio": 0.1,
    }  # fmt: skip
    for key, value in settings.items():
        OmegaConf.update(config, key, value, merge=False)
    path = work / "finetune.yaml"
    OmegaConf.save(config, path)
    run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
         "finetune.py", "--config", str(path), "--exp_name", "tiny"])  # fmt: skip
    return checkpoint


def held_out_inputs(work: Path, clips: int) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """The pipeline inputs of the held-out clip's first ``clips`` clips, its frames as ground truth and its
    sound (16 kHz mono, None when it has none) for the Sync figures."""
    folder = work / "prepared" / "heldout"
    entry = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
    video = Path(entry["video"]) if Path(entry["video"]).is_absolute() else folder / entry["video"]
    frames = read_frames(video)[: clips * FRAMES_PER_CLIP]
    if len(frames) < clips * FRAMES_PER_CLIP:
        raise SystemExit(f"The held-out clip has {len(frames)} frames, fewer than {clips} clips of {FRAMES_PER_CLIP}.")
    reference = torch.from_numpy(frames[0]).permute(2, 0, 1)[None].float() / 127.5 - 1
    inputs = dict(
        reference_image=reference,
        face_embedding=load_file(folder / entry["face_emb"])["face_emb"].reshape(1, -1),
        audio_features=load_file(folder / entry["audio_emb"])["audio_emb"][: len(frames)],
        emotion_labels=load_file(folder / entry["audio_emotion"])["emotion"][: len(frames)],
    )
    sound = metrics.read_video(video).audio
    if sound is not None:
        sound = sound[: int(round(len(frames) / FPS * metrics.SYNC_SAMPLE_RATE))]
    return inputs, frames, sound


def scores(frames: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM over frames, both (n, H, W, 3) in [0, 1]."""
    psnr = np.mean([peak_signal_noise_ratio(t, f, data_range=1.0) for f, t in zip(frames, target)])
    ssim = np.mean([structural_similarity(t, f, data_range=1.0, channel_axis=-1) for f, t in zip(frames, target)])
    return float(psnr), float(ssim)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) frames in [0, 1] as uint8, as they would be written."""
    return np.round(np.clip(frames, 0, 1) * 255).astype(np.uint8)


def evaluations(speed: SpeedSettings) -> str:
    """Diffusion-net passes per clip, a batch of two counted twice: "W whole + S outer-layers-only"."""
    plan = plan_steps(speed.steps, GUIDANCE > 1, speed.guidance_window, speed.deep_cache_interval)
    whole = sum(2 if step.batched else 1 for step in plan if step.whole)
    outer = sum(2 if step.batched else 1 for step in plan if not step.whole)
    return f"{whole} whole" + (f" + {outer} outer-only" if outer else "")


def evaluate(work: Path, pack: Path, checkpoint: Path, clips: int, steps: int, models: MetricModels) -> dict:
    inputs, truth_frames, sound = held_out_inputs(work, clips)
    truth = truth_frames.astype(np.float32) / 255
    noise = torch.randn(clips, 1, 4, FRAMES_PER_CLIP, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(7))
    common = dict(
        inputs, frames_per_clip=FRAMES_PER_CLIP, past_frames=PAST_FRAMES, guidance_scale=GUIDANCE, latents=noise
    )
    speeds = variants(steps)

    def generate(model: Path, speed: SpeedSettings) -> np.ndarray:
        pipe = MemoPipeline.from_checkpoint(model, vae=pack / "vae")
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = speed.scheduler(pipe.scheduler)
        return pipe(**common, **speed.pipeline_kwargs(GUIDANCE)).frames.permute(1, 2, 3, 0).numpy()

    untrained = scores(generate(pack, speeds["exact"]), truth)
    results = {"untrained_vs_truth": untrained, "settings": {}}
    print(f"untrained model, exact settings, vs ground truth: PSNR {untrained[0]:.2f} dB, SSIM {untrained[1]:.3f}")
    exact = None
    for name, speed in speeds.items():
        start = time.perf_counter()
        frames = generate(checkpoint, speed)
        exact = frames if exact is None else exact
        results["settings"][name] = dict(
            vs_truth=scores(frames, truth),
            vs_exact=scores(frames, exact),
            paper_vs_truth=score_frames(to_uint8(frames), truth_frames, models, FPS, sound),
            evaluations=evaluations(speed),
            seconds=time.perf_counter() - start,
        )
        row = results["settings"][name]
        print(f"{name}: vs truth {row['vs_truth']}, vs exact {row['vs_exact']}, {row['paper_vs_truth']}", flush=True)
    return results


def table(results: dict) -> str:
    exact = results["settings"]["exact"]
    lines = [
        f"Untrained model, exact settings, vs ground truth: PSNR {results['untrained_vs_truth'][0]:.2f} dB, "
        f"SSIM {results['untrained_vs_truth'][1]:.3f}.",
        "",
        f"FID / FVD / CSIM / motion / Sync-C / Sync-D / offset vs ground truth (the held-out clip's frames and "
        f"sound) with the metric networks of {results['metric_models']}.",
        "",
        "| setting | diffusion-net passes per clip | PSNR / SSIM vs ground truth | PSNR / SSIM vs exact "
        "| FID | FVD | CSIM | motion | Sync-C | Sync-D | offset |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["settings"].items():
        vs_exact = "identical" if row is exact else f"{row['vs_exact'][0]:.2f} dB / {row['vs_exact'][1]:.3f}"
        paper = " | ".join(
            f"{row['paper_vs_truth'][key]:.4g}" if key in row["paper_vs_truth"] else "-" for key in PAPER_FIGURES
        )
        lines.append(
            f"| {name} | {row['evaluations']} | {row['vs_truth'][0]:.2f} dB / {row['vs_truth'][1]:.3f} | {vs_exact} "
            f"| {paper} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, required=True, help="where clips, model and runs are kept")
    parser.add_argument("--videos", type=int, default=4, help="synthetic clips to make; the last is held out")
    parser.add_argument("--vae_steps", type=int, default=300, help="steps fitting the tiny VAE")
    parser.add_argument("--train_steps", type=int, default=500, help="finetune.py steps")
    parser.add_argument("--clips", type=int, default=3, help=f"held-out clips of {FRAMES_PER_CLIP} frames generated")
    parser.add_argument("--steps", type=int, default=20, help="inference_steps of the exact path")
    parser.add_argument(
        "--metric_models",
        type=Path,
        help="model folder for FID/FVD/CSIM (scripts/evaluate.py's --models; default: the tiny pack's random "
        "stand-ins, which only show that the figures move)",
    )
    args = parser.parse_args(argv)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    if not (work / "clips" / "heldout").is_dir():
        make_clips(work / "clips", args.videos)
    pack = work / "pack"
    if not (pack / "vae" / "fitted").is_file():
        shutil.rmtree(pack, ignore_errors=True)
        write_tiny_pack(pack)
        fit_vae(pack, sorted((work / "clips" / "train").glob("*.mp4")), args.vae_steps)
        (pack / "vae" / "fitted").write_text(f"{args.vae_steps} steps\n")
    prepare(work, pack / "inference.yaml")
    checkpoint = finetune(work, pack, args.train_steps)
    metric_models = (args.metric_models or pack).resolve()
    results = evaluate(work, pack, checkpoint, args.clips, args.steps, MetricModels(metric_models))
    results["metric_models"] = str(metric_models)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
