"""Finetuning on real files: a tiny prepared dataset of two mp4 videos, the tiny checkpoint, accelerate launch.

Covers the dataset (shapes, dtypes, past frames, replacement of corrupt samples), the flow-matching pieces,
the training loop end to end under ``accelerate launch`` (``e2e`` tier: finite loss, checkpoints in the
published layout that the pipeline loads, exact resume), and that the loss of a clip falls when it is trained on.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
from conftest import REPO, TINY_CHECKPOINT
from safetensors.torch import load_file, save_file

try:
    import decord
except ImportError:  # the training data is decoded with decord, an optional dependency
    decord = None
needs_decord = pytest.mark.skipif(decord is None, reason="decord is not installed (pip install decord)")

SIZE, FRAMES, FPS = 64, 40, 30
AUDIO_WINDOW = (5, 2, 16)  # the tiny checkpoint's audio windows: (window, layers, dim)


def write_video(path: Path, frames: int = FRAMES, size: int = SIZE, seed: int = 0) -> None:
    """An mp4 of a gradient background with a square and a disc moving across it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    background = np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, 96)], axis=-1).astype(np.uint8)
    colour = rng.integers(64, 255, size=3)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            image = background.copy()
            x = (4 + 2 * t) % (size - 16)
            image[20:36, x : x + 16] = colour
            disc = (yy - (10 + t % 40)) ** 2 + (xx - size // 2) ** 2 < 36
            image[disc] = (255, 255, 255)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def make_prepared_data(root: Path, videos: int = 2, frames: int = FRAMES) -> Path:
    """A data directory in the prepare_data.py format: metadata.jsonl, mp4s and random features."""
    g = torch.Generator().manual_seed(0)
    for folder in ("video", "audio_emb", "face_emb", "audio_emotion", "vocals"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(videos):
        vid = f"clip{i}"
        write_video(root / "video" / f"{vid}.mp4", frames=frames, seed=i)
        save_file(
            {"audio_emb": torch.randn(frames, *AUDIO_WINDOW, generator=g)}, root / "audio_emb" / f"{vid}.safetensors"
        )
        save_file({"face_emb": torch.randn(512, generator=g)}, root / "face_emb" / f"{vid}.safetensors")
        save_file(
            {"emotion": torch.randint(0, 9, (frames,), generator=g)}, root / "audio_emotion" / f"{vid}.safetensors"
        )
        save_file(
            {"vocals": torch.randn(frames * 16000 // FPS, generator=g) * 0.1}, root / "vocals" / f"{vid}.safetensors"
        )
        lines.append(
            {
                "id": vid,
                "video": f"video/{vid}.mp4",
                "fps": float(FPS),
                "num_frames": frames,
                "width": SIZE,
                "height": SIZE,
                "audio_emb": f"audio_emb/{vid}.safetensors",
                "face_emb": f"face_emb/{vid}.safetensors",
                "audio_emotion": f"audio_emotion/{vid}.safetensors",
                "vocals": f"vocals/{vid}.safetensors",
            }
        )
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_prepared_data(tmp_path_factory.mktemp("prepared"))


def tiny_config(tmp_path: Path, data_dir: Path, **overrides) -> Path:
    """A finetuning config for the tiny checkpoint on CPU: short clips, few steps, no trackers."""
    config = {
        "output_dir": str(tmp_path / "outputs"),
        "report_to": "none",
        "model_name_or_path": str(TINY_CHECKPOINT),
        "vae": str(TINY_CHECKPOINT / "vae"),
        "mixed_precision": "no",
        "seed": 0,
        "data": {
            "data_dirs": [str(data_dir)],
            "width": 64,
            "height": 64,
            "num_generated_frames_per_clip": 4,
            "num_past_frames": 2,
            "num_workers": 0,
        },
        "max_train_steps": 3,
        "learning_rate": 1e-4,
        "checkpointing_steps": 2,
        "checkpoints_total_limit": 2,
        "logging_steps": 1,
        "robust_training": False,
        "vae_batch_size": 8,
    }
    for key, value in overrides.items():
        target = config
        *parents, last = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[last] = value
    path = tmp_path / "finetune.yaml"
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(config), path)
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def launch(config: Path, exp_name: str, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch --num_processes 1 --cpu finetune.py`` as a user would run it."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
        str(REPO / "finetune.py"), "--config", str(config), "--exp_name", exp_name, *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


# -- the dataset ------------------------------------------------------------------------------------


@needs_decord
def test_dataset_samples_have_the_training_shapes(data_dir):
    from memo.data import TalkingVideoDataset

    torch.manual_seed(0)
    dataset = TalkingVideoDataset(
        [data_dir], width=48, height=32, n_sample_frames=8, num_past_frames=4, audio_window_shape=AUDIO_WINDOW
    )
    assert len(dataset) == 2
    sample = dataset[1]
    assert sample["pixel_values"].shape == (8, 3, 32, 48) and sample["pixel_values"].dtype == torch.float32
    assert sample["reference_values"].shape == (5, 3, 32, 48)
    for key in ("pixel_values", "reference_values"):
        assert sample[key].min() >= -1 and sample[key].max() <= 1 and sample[key].std() > 0.05
    assert sample["audio_emb"].shape == (8, *AUDIO_WINDOW) and sample["audio_emb"].dtype == torch.float32
    assert sample["face_emb"].shape == (512,)
    assert sample["emotion_frames"].shape == (8,) and sample["emotion"].dtype == torch.long
    labels = sample["emotion_frames"]
    assert int(sample["emotion"]) == int(torch.bincount(labels, minlength=9).argmax())
    assert sample["replaced"] == 0 and sample["num_past"] == 4 and sample["id"] == "clip1"

    # The clip's audio windows are the prepared windows of the clip's frames.
    audio = load_file(data_dir / "audio_emb" / "clip1.safetensors")["audio_emb"]
    starts = [s for s in range(audio.shape[0] - 7) if torch.equal(audio[s : s + 8], sample["audio_emb"])]
    assert len(starts) == 1 and starts[0] >= 4


@needs_decord
def test_past_frames_are_the_frames_before_the_clip(data_dir):
    from memo.data import TalkingVideoDataset

    torch.manual_seed(1)
    dataset = TalkingVideoDataset([data_dir], width=64, height=64, n_sample_frames=4, num_past_frames=3)
    sample = dataset[0]
    audio = load_file(data_dir / "audio_emb" / "clip0.safetensors")["audio_emb"]
    start = next(s for s in range(audio.shape[0] - 3) if torch.equal(audio[s : s + 4], sample["audio_emb"]))
    frames = torch.from_numpy(
        decord.VideoReader(str(data_dir / "video" / "clip0.mp4")).get_batch(list(range(start - 3, start + 4))).asnumpy()
    )
    expected = frames.permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(sample["reference_values"][1:], expected[:3], atol=1e-4, rtol=0)
    torch.testing.assert_close(sample["pixel_values"], expected[3:], atol=1e-4, rtol=0)


@needs_decord
def test_dynamic_past_frames_are_padded_with_the_reference(data_dir):
    from memo.data import TalkingVideoDataset

    dataset = TalkingVideoDataset(
        [data_dir], width=64, height=64, n_sample_frames=4, num_past_frames=30, dynamic_past_frames=True
    )
    torch.manual_seed(2)
    samples = [dataset[0] for _ in range(6)]
    assert {s["reference_values"].shape for s in samples} == {(31, 3, 64, 64)}
    for s in samples:
        padding = 30 - s["num_past"]
        assert 0 <= s["num_past"] <= 30
        for row in range(1, 1 + padding):
            torch.testing.assert_close(s["reference_values"][row], s["reference_values"][0])
    assert len({s["num_past"] for s in samples}) > 1


@needs_decord
def test_augmentations_of_the_original(data_dir):
    from memo.data import TalkingVideoDataset

    torch.manual_seed(3)
    first = TalkingVideoDataset([data_dir], 64, 64, n_sample_frames=4, num_past_frames=2, past_first_frame_ratio=1.0)[0]
    assert torch.equal(first["reference_values"][1], first["pixel_values"][0])
    assert torch.equal(first["reference_values"][2], first["pixel_values"][0])
    zero = TalkingVideoDataset([data_dir], 64, 64, n_sample_frames=4, num_past_frames=2, past_zero_ratio=1.0)[0]
    assert zero["reference_values"][1:].abs().max() == 0 and zero["reference_values"][0].abs().max() > 0
    start = TalkingVideoDataset([data_dir], 64, 64, n_sample_frames=4, num_past_frames=2, audio_start_ratio=1.0)[0]
    audio = start["audio_emb"]
    assert torch.equal(audio[0, 0], audio[0, 2]) and torch.equal(audio[0, 1], audio[0, 2])
    assert torch.equal(audio[1, 0], audio[1, 1]) and not torch.equal(audio[1, 1], audio[1, 2])


@needs_decord
def test_corrupt_samples_are_replaced_and_counted(tmp_path):
    from memo.data import TalkingVideoDataset

    root = make_prepared_data(tmp_path / "data", videos=2)
    entries = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    (root / "video" / "broken.mp4").write_bytes(b"not a video at all")
    entries.append({**entries[0], "id": "broken", "video": "video/broken.mp4"})
    entries.append({**entries[0], "id": "missing", "face_emb": "face_emb/missing.safetensors"})
    save_file({"audio_emb": torch.randn(12, *AUDIO_WINDOW)}, root / "audio_emb" / "short.safetensors")
    entries.append({**entries[0], "id": "mismatch", "audio_emb": "audio_emb/short.safetensors"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))

    torch.manual_seed(0)
    dataset = TalkingVideoDataset([root], 64, 64, n_sample_frames=4, num_past_frames=2, audio_window_shape=AUDIO_WINDOW)
    for index, name in ((2, "broken"), (3, "missing"), (4, "mismatch")):
        before = dataset.num_replaced
        sample = dataset[index]
        assert sample["id"] in ("clip0", "clip1") and sample["replaced"] >= 1
        assert dataset.num_replaced == before + sample["replaced"]
        assert name in dataset.bad_entries[index]
    assert set(dataset.bad_entries) == {2, 3, 4}

    # Too short for a clip and its past: replaced too; when nothing is usable, a clear error.
    too_long = TalkingVideoDataset([root], 64, 64, n_sample_frames=FRAMES, num_past_frames=4, max_attempts=5)
    with pytest.raises(RuntimeError, match="5 samples in a row could not be loaded"):
        too_long[0]
    assert too_long.num_replaced == 5


def test_metadata_of_several_dirs_and_cut_lines(tmp_path, data_dir):
    from memo.data import TalkingVideoDataset, load_metadata

    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        TalkingVideoDataset([tmp_path], 64, 64)
    other = tmp_path / "other"
    other.mkdir()
    line = (data_dir / "metadata.jsonl").read_text().splitlines()[0]
    (other / "metadata.jsonl").write_text(line.replace('"video/', f'"{data_dir}/video/') + '\n{"id": "cut", "vid')
    entries = load_metadata([data_dir, other / "metadata.jsonl"])
    assert [e["id"] for e in entries] == ["clip0", "clip1", "clip0"]
    assert entries[2]["video"] == entries[0]["video"] and entries[2]["audio_emb"].startswith(str(other))
    (other / "metadata.jsonl").write_text("{broken\n")
    with pytest.raises(ValueError, match="lists no videos"):
        TalkingVideoDataset([other], 64, 64)


# -- the training pieces ----------------------------------------------------------------------------


def test_flow_matching_pieces():
    from memo.training.flow_matching import FlowMatchingObjective, robust_mean

    objective = FlowMatchingObjective({"num_train_timesteps": 1000})
    torch.manual_seed(0)
    timesteps, sigmas = objective.sample_timesteps(4096)
    assert timesteps.shape == sigmas.shape == (4096,)
    torch.testing.assert_close(sigmas, timesteps / 1000)
    assert (
        abs(float(sigmas.mean()) - 0.5) < 0.02 and float(((sigmas - 0.5).abs() < 0.25).float().mean()) > 0.6
    )  # logit-normal
    x0, noise = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)
    sig = torch.tensor([0.2, 0.9])
    noisy = objective.add_noise(x0, noise, sig)
    torch.testing.assert_close(noisy[1], 0.9 * noise[1] + 0.1 * x0[1])
    exact = objective.per_sample_loss(noise - x0, noisy, x0, sig)  # the true velocity gives a zero loss
    assert exact.abs().max() < 1e-10
    off = objective.per_sample_loss(noise - x0 + 1.0, noisy, x0, sig)
    torch.testing.assert_close(off, sig**2)
    loss, kept = robust_mean(torch.tensor([0.05, 0.5, 0.08]), 0.1)
    assert int(kept) == 2 and math.isclose(float(loss), 0.065, rel_tol=1e-6)
    assert float(robust_mean(torch.tensor([0.5, 0.7]), 0.1)[0]) == 0
    cosmap = FlowMatchingObjective({}, weighting_scheme="cosmap").per_sample_loss(noise - x0 + 1.0, noisy, x0, sig)
    torch.testing.assert_close(cosmap, sig**2 * 2 / (math.pi * (1 - 2 * sig + 2 * sig**2)))


def test_trainable_selection(tiny_checkpoint):
    from memo.models.diffusion_net import DiffusionNet
    from memo.models.projections import AudioProjModel
    from memo.training.trainable import select_trainable

    networks = {
        "diffusion_net": DiffusionNet.from_pretrained(tiny_checkpoint / "diffusion_net"),
        "audio_proj": AudioProjModel.from_pretrained(tiny_checkpoint / "audio_proj"),
    }
    counts = select_trainable(networks, {"diffusion_net": True, "audio_proj": True}, ["motion_modules"])
    trained = [n for n, p in networks["diffusion_net"].named_parameters() if p.requires_grad]
    assert trained and all("motion_modules" in n for n in trained)
    assert counts["audio_proj"] == sum(p.numel() for p in networks["audio_proj"].parameters())
    with pytest.raises(ValueError, match="motion_modulez"):
        select_trainable(networks, {"diffusion_net": True}, ["motion_modulez"])


def test_gradient_checkpointing_gives_the_same_gradients(tiny_checkpoint):
    """Checkpointed layers (the temporal memory's update included) give the gradients of the plain run."""
    from memo.models.conditions import DiffusionConditions
    from memo.models.diffusion_net import DiffusionNet
    from memo.models.reference_net import ReferenceNet
    from memo.models.temporal_memory import TemporalMemory

    def gradients(checkpointing: bool) -> dict:
        reference_net = ReferenceNet.from_pretrained(tiny_checkpoint / "reference_net").double()
        diffusion_net = DiffusionNet.from_pretrained(tiny_checkpoint / "diffusion_net").double().eval()
        if checkpointing:
            reference_net.enable_gradient_checkpointing()
            diffusion_net.enable_gradient_checkpointing()
        g = torch.Generator().manual_seed(0)
        context = torch.randn(2, 4, 64, generator=g, dtype=torch.float64).repeat_interleave(3, 0)
        features = reference_net(torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64), 0.0, context)
        memory = TemporalMemory()
        sample = torch.randn(2, 4, 3, 8, 8, generator=g, dtype=torch.float64)
        conditions = DiffusionConditions(
            reference=features,
            image_tokens=torch.randn(2, 4, 64, generator=g, dtype=torch.float64),
            audio_tokens=torch.randn(2, 3, 4, 64, generator=g, dtype=torch.float64),
            emotion=torch.tensor([1, 3]),
            memory=memory,
            drop_reference=(True, False),
            update_memory=True,
        )
        out = diffusion_net(sample, 500.0, conditions)
        out.square().mean().backward()
        named = list(reference_net.named_parameters()) + list(diffusion_net.named_parameters())
        return {name: p.grad for name, p in named if p.grad is not None}, out, memory

    plain, plain_out, plain_memory = gradients(False)
    checked, checked_out, checked_memory = gradients(True)
    torch.testing.assert_close(checked_out, plain_out)
    assert plain.keys() == checked.keys() and len(plain) > 1000
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], msg=name)
    assert checked_memory.states.keys() == plain_memory.states.keys()
    for name, (kv, _) in plain_memory.states.items():
        torch.testing.assert_close(checked_memory.states[name][0], kv)


def test_8bit_adam_without_bitsandbytes_says_what_to_install():
    from memo.training.optim import build_optimizer

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install bitsandbytes"):
            build_optimizer([torch.nn.Parameter(torch.zeros(2))], 1e-4, use_8bit_adam=True)
    else:
        pytest.skip("bitsandbytes is installed")


def test_config_rejects_unknown_and_bad_keys(tmp_path, data_dir):
    from memo.settings.training import ConfigError, load_config

    path = tiny_config(tmp_path, data_dir)
    config = load_config(path, ["data.width=32", "learning_rate=2e-5"], exp_name="run")
    assert config.data.width == 32 and config.output_dir.endswith(os.path.join("outputs", "run"))
    with pytest.raises(
        ConfigError, match="Unknown setting 'learnin_rate' in the command line; did you mean 'learning_rate'"
    ):
        load_config(path, ["learnin_rate=1"])
    with pytest.raises(ValueError, match="weighting_scheme"):
        load_config(path, ["weighting_scheme=lognorm"])


def test_each_dropped_condition_changes_only_its_sample(tiny_checkpoint):
    """Every dropout mode: dropping a sample's image, audio or emotion changes that sample's prediction only."""
    from memo.training.conditioning import ConditionDropout, DroppedConditions
    from memo.training.model import MemoTrainingModel
    from memo.training.networks import load_model_components

    networks, _, _ = load_model_components(str(tiny_checkpoint), str(tiny_checkpoint / "vae"))
    torch.manual_seed(0)
    args = (
        torch.randn(2, 4, 2, 8, 8),
        torch.tensor([300.0, 800.0]),
        torch.randn(2 * 3, 4, 8, 8),
        torch.randn(2, 512),
        torch.randn(2, 2, *AUDIO_WINDOW),
        torch.tensor([1, 4]),
    )
    no, first = torch.tensor([False, False]), torch.tensor([True, False])
    model = MemoTrainingModel(**networks).eval()
    with torch.no_grad():
        base = model(*args)
        cases = [
            ({"image_mode": "zero_reference"}, DroppedConditions(first, no, no)),
            ({"image_mode": "drop_reference"}, DroppedConditions(first, no, no)),
            ({"audio_mode": "zero_features"}, DroppedConditions(no, first, no)),
            ({"audio_mode": "zero_tokens"}, DroppedConditions(no, first, no)),
            ({}, DroppedConditions(no, no, first)),
        ]
        outputs = []
        for modes, dropped in cases:
            model.dropout = ConditionDropout(**modes)
            out = model(*args, dropped)
            assert (out[0] - base[0]).abs().max() > 1e-6, modes
            torch.testing.assert_close(out[1], base[1])
            outputs.append(out[0])
        assert (outputs[0] - outputs[1]).abs().max() > 1e-6 and (outputs[2] - outputs[3]).abs().max() > 1e-6
    # A sample of a batch gets the prediction it gets alone, and gradients reach the networks.
    alone = model(args[0][1:], args[1][1:], args[2][3:], args[3][1:], args[4][1:], args[5][1:])
    torch.testing.assert_close(alone[0], base[1], atol=1e-5, rtol=1e-4)
    alone.square().mean().backward()
    assert networks["diffusion_net"].conv_out.weight.grad.abs().sum() > 0


# -- the training loop ------------------------------------------------------------------------------


@needs_decord
@pytest.mark.e2e
def test_finetune_runs_checkpoints_and_resumes(tmp_path, data_dir, tiny_checkpoint, pack):
    """finetune.py and then inference.py on its checkpoint, started as a user starts them."""
    config = tiny_config(
        tmp_path,
        data_dir,
        use_ema=True,
        **{
            "validation.steps": 3,
            "validation.num_frames": 4,
            "validation.inference_steps": 2,
            "validation.cfg_scale": 2.0,
        },
    )
    launch(config, "run")
    run_dir = tmp_path / "outputs" / "run"
    metrics = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(
        math.isfinite(m["loss"]) and m["samples_per_second"] > 0 and m["lr"] == pytest.approx(1e-4) for m in metrics
    )

    # checkpoint-2 and the final checkpoint-3, each in the published layout plus accelerate's state.
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not list(run_dir.glob(".checkpoint-*"))  # each was written under a hidden name and renamed once done
    checkpoint = run_dir / "checkpoint-3"
    for name in ("reference_net", "diffusion_net", "image_proj", "audio_proj"):
        assert (checkpoint / name / "config.json").is_file()
        assert (checkpoint / name / "diffusion_pytorch_model.safetensors").is_file()
    assert (checkpoint / "optimizer.bin").is_file() and (checkpoint / "scheduler.bin").is_file()
    assert json.loads((checkpoint / "training_state.json").read_text())["step"] == 3
    assert (checkpoint / "misc" / "audio_emotion_classifier" / "config.json").is_file()
    assert (checkpoint / "ema" / "diffusion_net" / "diffusion_pytorch_model.safetensors").is_file()
    # The preview video rendered at step 3.
    video = run_dir / "validation" / "step-3.mp4"
    assert len(decord.VideoReader(str(video))) == 4
    # Only the trained modules changed.
    trained = load_file(checkpoint / "diffusion_net" / "diffusion_pytorch_model.safetensors")
    source = load_file(tiny_checkpoint / "diffusion_net" / "diffusion_pytorch_model.safetensors")
    changed = {k for k in source if not torch.equal(source[k], trained[k])}
    assert changed and all("motion_modules" in k or "audio_modules" in k for k in changed)
    assert (
        load_file(checkpoint / "reference_net" / "diffusion_pytorch_model.safetensors").keys()
        == load_file(tiny_checkpoint / "reference_net" / "diffusion_pytorch_model.safetensors").keys()
    )

    # The pipeline renders from the checkpoint.
    from memo.pipeline import MemoPipeline

    pipe = MemoPipeline.from_checkpoint(checkpoint, vae=tiny_checkpoint / "vae")
    pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(pipe.diffusion_net.state_dict()[next(iter(changed))], trained[next(iter(changed))])
    g = torch.Generator().manual_seed(0)
    frames = pipe(
        torch.rand(1, 3, 64, 64, generator=g) * 2 - 1,
        torch.randn(1, 512, generator=g),
        torch.randn(4, *AUDIO_WINDOW, generator=g),
        torch.randint(0, 9, (4,), generator=g),
        frames_per_clip=4,
        past_frames=2,
        num_inference_steps=2,
        seed=0,
    ).frames
    assert frames.shape == (3, 4, 64, 64) and torch.isfinite(frames).all()

    # inference.py renders from the checkpoint as its model (face analysis and vocal separator from the pack).
    from memo.io.video import probe_video

    render = tmp_path / "render"
    command = [
        sys.executable, str(REPO / "inference.py"), "--config", str(pack / "inference.yaml"),
        "--output_dir", str(render), f"model_name_or_path={checkpoint}", f"misc_model_dir={pack}",
        "emotion=happy", "fps=5", "inference_steps=1", "cfg_scale=1",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    seconds = len(soundfile.read(REPO / "assets" / "examples" / "speech.wav")[0]) / 16000
    assert probe_video(render / "portrait_speech.mp4").num_frames == math.ceil(seconds * 5)

    # Resume from checkpoint-2: continues at step 3 with the saved optimizer state.
    saved = torch.load(run_dir / "checkpoint-2" / "optimizer.bin", weights_only=False)
    saved_steps = {int(s["step"]) for s in saved["state"].values()}
    assert saved_steps == {2}
    launch(config, "run", "resume_from_checkpoint=checkpoint-2", "max_train_steps=4", "checkpoints_total_limit=3")
    lines = read_metrics(run_dir)
    resume = [m for m in lines if m.get("event") == "resume"]
    assert resume and resume[-1]["step"] == 2 and resume[-1]["optimizer_steps"] == 2
    after = [m for m in lines[lines.index(resume[-1]) :] if "loss" in m]
    assert [m["step"] for m in after] == [3, 4]
    # Step 3 again, now resumed: the uninterrupted run's loss to the last bit (same weights, optimizer state,
    # batch, noise and dropout draws).
    assert after[0]["loss"] == metrics[2]["loss"]
    assert json.loads((run_dir / "checkpoint-4" / "training_state.json").read_text())["step"] == 4
    resumed = torch.load(run_dir / "checkpoint-4" / "optimizer.bin", weights_only=False)
    assert {int(s["step"]) for s in resumed["state"].values()} == {4}

    # "latest" picks checkpoint-4; a run already at max_train_steps does nothing more.
    launch(config, "run", "resume_from_checkpoint=latest", "max_train_steps=4")
    assert [m for m in read_metrics(run_dir) if m.get("event") == "resume"][-1]["step"] == 4


KILL_AT = """
import os, runpy, signal, sys
from memo.training import checkpointing
point, step = sys.argv[1], int(sys.argv[2])
state = {"saves": 0}
def kill_at(reached):
    state["saves"] += reached == "partial_created"
    if reached == point and state["saves"] == step:
        os.kill(os.getpid(), signal.SIGKILL)
checkpointing.on_save_point = kill_at
sys.argv = [sys.argv[3], *sys.argv[4:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.e2e
@needs_decord
def test_finetune_killed_mid_save_resumes_from_the_last_checkpoint(tmp_path, data_dir):
    """finetune.py with ``checkpoints_total_limit: 1`` killed (SIGKILL) while it saves checkpoint-2, after the
    new state is written and before it is published: checkpoint-1 is still there, ``resume_from_checkpoint=latest``
    goes on from step 1 (it used to start from 0, the old checkpoint removed before the new one was written), and
    the resumed run removes the killed save's partial folder. Every point of a save: tests/test_checkpoint_saves.py."""
    config = tiny_config(tmp_path, data_dir, max_train_steps=2, checkpointing_steps=1, checkpoints_total_limit=1)
    args = [str(REPO / "finetune.py"), "--config", str(config), "--exp_name", "run"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT, "state_written", "2", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "run"
    left = sorted(p.name for p in run_dir.glob("*checkpoint-*"))
    assert len(left) == 2 and left[0].startswith(".checkpoint-2.") and left[1] == "checkpoint-1"

    resumed = subprocess.run(
        [sys.executable, *args, "resume_from_checkpoint=latest"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resume = [m for m in read_metrics(run_dir) if m.get("event") == "resume"]
    assert [m["step"] for m in resume] == [1]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-2", "config.yaml", "logs"]


@pytest.mark.slow
@needs_decord
def test_loss_falls_when_one_clip_is_trained_on(tmp_path, tiny_checkpoint):
    """Training on a single clip lowers its loss, measured at fixed noise and timesteps before and after."""
    from memo.data import TalkingVideoDataset
    from memo.sampling.conditioning import encode_frames
    from memo.settings.training import load_config
    from memo.training.flow_matching import FlowMatchingObjective
    from memo.training.loop import train
    from memo.training.model import MemoTrainingModel
    from memo.training.networks import load_model_components

    data = make_prepared_data(tmp_path / "one", videos=1, frames=8)
    path = tiny_config(
        tmp_path,
        data,
        **{
            "data.num_generated_frames_per_clip": 4,
            "data.num_past_frames": 4,  # 8 frames: the one clip there is
            "data.past_first_frame_ratio": 0.0,
            "data.past_zero_ratio": 0.0,
            "data.audio_start_ratio": 0.0,
            "uncond_img_ratio": 0.0,
            "uncond_audio_ratio": 0.0,
            "learning_rate": 6e-3,  # 15 steps at 6e-3 fall as far as 40 at 3e-3 did, in 3/8 of the time
            "max_train_steps": 15,
            "checkpointing_steps": 1000,
            "trainable_modules": ["motion_modules", "conv_out"],
        },
    )
    config = load_config(path, exp_name="overfit")
    summary = train(config)
    assert summary["step"] == 15

    def probe_loss(model_dir: Path) -> float:
        networks, vae, _ = load_model_components(str(model_dir), str(tiny_checkpoint / "vae"))
        model = MemoTrainingModel(**networks).eval()
        dataset = TalkingVideoDataset([data], 64, 64, n_sample_frames=4, num_past_frames=4)
        torch.manual_seed(0)
        sample = dataset[0]

        def encode(pixels):
            return encode_frames(vae, pixels, 8, torch.device("cpu"), sample=True)

        objective = FlowMatchingObjective({"num_train_timesteps": 1000})
        total = 0.0
        with torch.no_grad():
            latents = encode(sample["pixel_values"]).transpose(0, 1)[None]
            reference = encode(sample["reference_values"])
            for seed, sigma in ((1, 0.3), (2, 0.5), (3, 0.7), (4, 0.9)):
                noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
                sigmas = torch.tensor([sigma])
                noisy = objective.add_noise(latents, noise, sigmas)
                prediction = model(
                    noisy,
                    sigmas * 1000,
                    reference,
                    sample["face_emb"][None],
                    sample["audio_emb"][None],
                    sample["emotion"][None],
                )
                total += float(objective.per_sample_loss(prediction, noisy, latents, sigmas)[0])
        return total / 4

    before = probe_loss(tiny_checkpoint)
    after = probe_loss(Path(config.output_dir) / "checkpoint-15")
    assert after < 0.8 * before, (before, after)  # about 0.6 x in practice


def test_validation_reference_image_is_loaded_as_inference_loads_it(tmp_path):
    """A cut-out portrait as ``validation.reference_image``: its transparent background is white, as in
    inference, not the colour hidden under it."""
    from PIL import Image

    from memo.training.validation import _reference_image

    pixels = np.zeros((96, 96, 4), np.uint8)
    pixels[..., :3] = (255, 0, 255)  # hidden under the transparent background
    pixels[24:72, 24:72] = (90, 60, 40, 255)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "cut_out.png")
    reference = _reference_image({}, str(tmp_path / "cut_out.png"), 64, 64)
    assert reference.shape == (1, 3, 64, 64)
    torch.testing.assert_close(reference[0, :, 0, 0], torch.ones(3))
    torch.testing.assert_close(reference[0, :, 32, 32], torch.tensor([90, 60, 40]) / 127.5 - 1, atol=0.02, rtol=0)


def test_a_step_whose_every_sample_is_left_out_warns_once(caplog, monkeypatch):
    """Robust training leaves out samples above the threshold; a model far from MEMO's weights (the tiny pack,
    another base) may have every sample above it, and then nothing is learned: the run says so, once."""
    import logging
    from types import SimpleNamespace

    import memo.training.step
    from memo.settings.training import ObjectiveSettings
    from memo.training.step import TrainState, end_optimizer_step

    run = SimpleNamespace(
        ema=None,
        accumulation=1,
        lr_scheduler=SimpleNamespace(get_last_lr=lambda: [1e-5]),
        accelerator=SimpleNamespace(log=lambda *args, **kwargs: None),
        record=lambda metrics: None,
        config=SimpleNamespace(objective=ObjectiveSettings(), tracking=SimpleNamespace(logging_steps=100)),
    )
    # accelerate's logger needs a process state, which would outlive this test: a plain logger stands in
    monkeypatch.setattr(memo.training.step, "logger", logging.getLogger("memo.training.step"))
    state = TrainState()
    with caplog.at_level(logging.WARNING):
        for kept in (0.0, 0.0, 1.0):
            state.seen_sum, state.kept_sum = 2.0, kept
            end_optimizer_step(run, state, 0, None)
    warnings = [r.getMessage() for r in caplog.records if "robust_loss_threshold" in r.getMessage()]
    assert len(warnings) == 1 and "step 1:" in warnings[0] and "robust_training=false" in warnings[0]
