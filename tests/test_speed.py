"""Speed settings: each changes the computation as it says (counted network calls and FLOPs), outputs stay
finite and the right shape, exact stays bit-identical, settings validate with clear errors, and the
fidelity measurement runs end to end in a reduced form."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from conftest import REPO, link_example_files, run_main
from diffusers import FlowMatchEulerDiscreteScheduler
from test_pipeline import FPC, make_inputs

from memo.apps import cli
from memo.apps.batch import ManifestError, load_jobs
from memo.io.video import probe_video
from memo.models.conditions import DiffusionConditions
from memo.models.diffusion_net import DeepFeatures
from memo.models.temporal_memory import TemporalMemory
from memo.sampling.deep_cache import DeepFeatureCache
from memo.sampling.guidance import ClassifierFreeGuidance, plan_steps
from memo.sampling.solvers import flow_scheduler
from memo.sampling.speed import SpeedSettings, preset
from memo.settings.inference import ConfigError, load_config

STEPS = 4


def run(pipe, **overrides):
    args = dict(
        make_inputs(), frames_per_clip=FPC, past_frames=FPC, num_inference_steps=STEPS, guidance_scale=3.5, seed=4
    )
    return pipe(**{**args, **overrides})


class CallLog:
    """Records the batch of every call of some modules of a pipeline's networks."""

    def __init__(self, pipe):
        self.calls: dict[str, list[int]] = {}
        self.handles = []
        net = pipe.diffusion_net
        watched = {"reference_net": pipe.reference_net, "conv_in": net.conv_in, "mid_block": net.mid_block}
        watched |= {"up_block_0": net.up_blocks[0], "up_block_last": net.up_blocks[-1]}
        for name, module in watched.items():
            self.calls[name] = []
            hook = lambda module, args, name=name: self.calls[name].append(args[0].shape[0])  # noqa: E731
            self.handles.append(module.register_forward_pre_hook(hook))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def check_frames(frames):
    assert frames.shape == (3, 2 * FPC, 64, 64)
    assert torch.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1


def run_speed(pipe, speed: SpeedSettings, **overrides):
    """A call with ``speed`` as the generator makes it: the solver's scheduler swapped in, its guider and deep
    cache interval passed."""
    euler = pipe.scheduler
    pipe.scheduler = speed.scheduler(euler)
    try:
        return run(pipe, **{**speed.pipeline_kwargs(3.5), **overrides})
    finally:
        pipe.scheduler = euler


def test_exact_is_the_default_computation_bit_for_bit(tiny_pipeline):
    default = run(tiny_pipeline).frames
    exact = run_speed(tiny_pipeline, preset("exact", STEPS)).frames
    assert torch.equal(default, exact)
    assert load_config(REPO / "configs" / "inference.yaml").speed_settings == preset("exact", 20)


def test_guidance_window_runs_the_conditional_pass_alone_outside_it(tiny_pipeline):
    exact = run(tiny_pipeline).frames
    rows = FPC  # frames per clip: a batch of b items is b * FPC frame rows in the net
    with CallLog(tiny_pipeline) as log:
        early = run(tiny_pipeline, guider=ClassifierFreeGuidance(3.5, 0.0, 0.5)).frames
    assert log.calls["conv_in"] == [2 * rows, 2 * rows, rows, rows] * 2
    with CallLog(tiny_pipeline) as log:
        late = run(tiny_pipeline, guider=ClassifierFreeGuidance(3.5, 0.5, 1.0)).frames
    # Step 0 runs both halves even outside the window: it writes the memory both halves read later.
    assert log.calls["conv_in"] == [2 * rows, rows, 2 * rows, 2 * rows] * 2
    with CallLog(tiny_pipeline) as log:
        never = run(tiny_pipeline, guider=ClassifierFreeGuidance(3.5, 0.0, 0.0)).frames
    assert log.calls["conv_in"] == [rows] * STEPS * 2 and log.calls["reference_net"] == [1 + FPC] * 2
    unguided = run(tiny_pipeline, guidance_scale=1.0).frames
    for frames in (early, late, never):
        check_frames(frames)
        assert (frames - exact).abs().max() > 1e-3
    torch.testing.assert_close(never, unguided)


def test_deep_cache_runs_the_deep_blocks_every_interval(tiny_pipeline):
    with CallLog(tiny_pipeline) as log:
        cached = run(tiny_pipeline, num_inference_steps=6, deep_cache_interval=3).frames
    check_frames(cached)
    assert len(log.calls["conv_in"]) == 12  # outer layers: every step of both clips
    assert len(log.calls["mid_block"]) == len(log.calls["up_block_0"]) == 4  # deep blocks: steps 0 and 3
    # The last up block: once per shallow step, twice per whole one (its inner layers, kept, then its outer).
    assert len(log.calls["up_block_last"]) == 8 * 2
    assert (cached - run(tiny_pipeline, num_inference_steps=6).frames).abs().max() > 1e-3


def test_shallow_step_on_its_own_features_equals_the_whole_step(tiny_pipeline):
    """The cache wiring is right: outer layers on the deep features of the same input give the whole net's output."""
    pipe = tiny_pipeline
    g = torch.Generator().manual_seed(0)
    net, ref = pipe.diffusion_net, pipe.reference_net
    tokens = pipe.image_proj(torch.randn(2, 512, generator=g))
    reference = ref(torch.randn(2 * (1 + FPC), 4, 8, 8, generator=g), 0.0, tokens.repeat(1 + FPC, 1, 1))
    audio = pipe.audio_proj(torch.randn(2, FPC, 5, 2, 16, generator=g))
    sample = torch.randn(2, 4, FPC, 8, 8, generator=g)
    drop = (True, False)
    with torch.no_grad():
        memory = TemporalMemory()
        conditions = DiffusionConditions(reference, tokens, audio, torch.tensor([9, 3]), memory, drop_reference=drop)
        plain = net(sample, 700.0, conditions.with_update(True))
        cache = DeepFeatureCache()
        whole, deep = net.forward_keeping_deep_features(sample, 700.0, conditions, 2)
        cache.store(deep, 2)
        again = net(sample, 700.0, conditions)
        shallow = net.forward_outer_layers(sample, 700.0, conditions, cache.load(2))
    assert torch.equal(whole, again)  # keeping the features does not change the whole step
    torch.testing.assert_close(shallow, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, whole)  # the memory, written by the first call, is only read after it
    with pytest.raises(RuntimeError, match="holds a batch of 1"):
        cache.store(DeepFeatures(deep.hidden[:FPC], deep.audio[:FPC], 2), 1)
        cache.load(2)
    with pytest.raises(ValueError, match="cannot update the memory"):
        net.forward_outer_layers(sample, 700.0, conditions.with_update(True), deep)


def test_plan_steps():
    plan = plan_steps(8, True, (0.0, 0.25), 2)
    assert [(s.batched, s.guided, s.whole) for s in plan[:4]] == [
        (True, True, True), (True, True, False), (False, False, True), (False, False, False)
    ]  # fmt: skip
    # A batched step after a conditional-only whole step runs whole: the cache holds one half only.
    late = plan_steps(6, True, (0.5, 1.0), 2)
    assert [s.batched for s in late] == [True, False, False, True, True, True]
    assert [s.whole for s in late] == [True, False, True, True, True, False]
    assert all(not s.batched for s in plan_steps(4, False, (0.0, 1.0), 1))


@pytest.mark.parametrize("steps", [2, 8, 20])
def test_unipc_noise_levels_against_euler(steps):
    """UniPC's N levels are Euler's N + 1 without the last: the same start (pure noise), the same even
    spacing down to 1/1000, then 0; the net sees them as timesteps sigma x 1000 (to the integer below)."""
    euler = FlowMatchEulerDiscreteScheduler()
    unipc = flow_scheduler("unipc", euler)
    unipc.set_timesteps(steps)
    euler.set_timesteps(steps + 1)
    assert len(unipc.timesteps) == steps and unipc.sigmas[-1] == 0
    torch.testing.assert_close(unipc.sigmas[:-1], euler.sigmas[:-2], atol=2e-6, rtol=0)
    torch.testing.assert_close(unipc.timesteps.float(), euler.timesteps[:-1].floor(), atol=1.0, rtol=0)


def solve_gaussian_flow(solver: str, steps: int) -> torch.Tensor:
    """The flow-matching ODE of Gaussian data N(2, 0.3^2) (exact velocity known: curved paths), from noise."""
    mean, std = 2.0, 0.3

    def velocity(x, sigma):  # E[noise - x0 | x] for x = (1 - sigma) x0 + sigma noise
        var = (1 - sigma) ** 2 * std**2 + sigma**2
        centred = x - (1 - sigma) * mean
        return sigma / var * centred - (mean + (1 - sigma) * std**2 / var * centred)

    scheduler = flow_scheduler(solver, FlowMatchEulerDiscreteScheduler())
    scheduler.set_timesteps(steps)
    x = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(9, 1, 1)
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(velocity(x, float(scheduler.sigmas[i])), t, x, return_dict=False)[0]
    return x


def test_unipc_is_more_accurate_than_euler_at_few_steps():
    truth = solve_gaussian_flow("euler", 2000)
    for steps, factor in ((8, 2), (16, 100)):
        euler_error = (solve_gaussian_flow("euler", steps) - truth).abs().max()
        unipc_error = (solve_gaussian_flow("unipc", steps) - truth).abs().max()
        assert unipc_error < euler_error / factor, (steps, unipc_error, euler_error)


def test_fast_preset_computes_fewer_steps_and_stays_finite(tiny_pipeline):
    fast = preset("fast", 10)
    assert fast == SpeedSettings("unipc", 4, (0.0, 0.25), 2)
    with CallLog(tiny_pipeline) as log:
        frames = run_speed(tiny_pipeline, fast).frames
    check_frames(frames)
    rows = FPC
    assert log.calls["conv_in"] == [2 * rows, rows, rows, rows] * 2
    assert log.calls["mid_block"] == [2 * rows, rows] * 2


@pytest.mark.slow
def test_full_size_fast_costs_under_a_quarter_of_exact_at_512():
    """Counted with torch's FLOP counter on the published-size networks built on the meta device."""
    sys.path.insert(0, str(REPO / "scripts"))
    from benchmark import build_pipeline

    from memo.bench.flops import clip_flops

    pipe, _ = build_pipeline("full", torch.device("meta"), torch.float32)
    exact = clip_flops(pipe, preset("exact"), 512, 512)
    fast = clip_flops(pipe, preset("fast"), 512, 512)
    assert 50e12 < exact.per_frame < 100e12  # about 70 TFLOP per frame: 40 net calls of ~1.6 TFLOP each
    assert fast.per_frame <= 0.25 * exact.per_frame, fast.per_frame / exact.per_frame
    assert fast.vae_and_projections == exact.vae_and_projections and fast.reference_net == exact.reference_net


@pytest.mark.slow
def test_counted_flops_match_a_whole_pipeline_call(tiny_pipeline):
    """memo.bench.flops sums per-call counts over the step plan; on the tiny nets it agrees with counting a real
    call."""
    from torch.utils.flop_counter import FlopCounterMode

    from memo.bench.flops import clip_flops

    # Exact, and a plan with each kind of step: guided and alone, whole and shallow (deep cache every 2).
    for speed in (preset("exact", 2), SpeedSettings("unipc", 4, (0.0, 0.5), 2)):
        with FlopCounterMode(display=False) as counter:
            run_speed(tiny_pipeline, speed, audio_features=make_inputs()["audio_features"][:FPC])
        counted = clip_flops(tiny_pipeline, speed, 64, 64, frames_per_clip=FPC, past_frames=FPC)
        assert abs(counted.total - counter.get_total_flops()) / counted.total < 0.01


def test_pipeline_rejects_bad_speed_arguments(tiny_pipeline):
    with pytest.raises(ValueError, match="Unknown solver 'heun'"):
        flow_scheduler("heun", tiny_pipeline.scheduler)
    with pytest.raises(ValueError, match="guidance window must satisfy"):
        ClassifierFreeGuidance(3.5, 0.6, 0.2)
    with pytest.raises(ValueError, match="deep_cache_interval must be"):
        run(tiny_pipeline, deep_cache_interval=0)
    with (
        pytest.warns(FutureWarning, match="solver=...\\) is deprecated"),
        pytest.raises(ValueError, match="solver must be"),
    ):
        run(tiny_pipeline, solver="heun")  # the older call form still checks and warns


def test_settings_validate_with_clear_errors():
    config = load_config(None, ["speed=fast", "deep_cache_interval=1", "solver_steps=12", "inference_steps=30"])
    assert config.speed_settings == SpeedSettings("unipc", 12, (0.0, 0.25), 1)  # explicit settings win
    assert load_config(None, ["speed=fast", "inference_steps=30"]).speed_settings.steps == 12
    for override, message in (
        ("speed=turbo", "speed must be one of exact, fast, got 'turbo'"),
        ("solver=heun", "solver must be one of euler, unipc"),
        ("solver_steps=0", "solver_steps must be positive"),
        ("guidance_end=1.5", "guidance_end must be a fraction of the steps in 0..1"),
        ("deep_cache_interval=0", "deep_cache_interval must be 1 (off) or more"),
        ("guidance_start=0.5", "guidance_start (0.5) must not exceed guidance_end (0.25)"),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(None, ["speed=fast", override])


def test_speed_is_a_manifest_column(pack, tmp_path):
    link_example_files(tmp_path, a="a.jpg", b="b.jpg", c="a.wav", d="b.wav")
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("image,audio,speed,deep_cache_interval\na.jpg,a.wav,fast,\nb.jpg,b.wav,exact,3\n")
    _, jobs = load_jobs(manifest, tmp_path / "out", pack / "inference.yaml", [])
    assert jobs[0].settings == {"speed": "fast"} and jobs[1].settings == {"deep_cache_interval": 3}
    manifest.write_text("image,audio,speed\na.jpg,a.wav,quick\n")
    with pytest.raises(ManifestError, match="line 2: .*speed must be one of exact, fast"):
        load_jobs(manifest, tmp_path / "out", pack / "inference.yaml", [])


def test_inference_renders_a_video_at_speed_fast(pack, tmp_path):
    """The command line in this process (test_inference.py starts ``inference.py`` itself as a program)."""
    speech, rate = soundfile.read(REPO / "assets" / "examples" / "speech.wav", dtype="float32")
    soundfile.write(tmp_path / "speech.wav", speech[:rate], rate)  # 1 s: two clips, the second with a past
    args = ["--config", str(pack / "inference.yaml"),
            "--input_image", str(REPO / "assets" / "examples" / "portrait.jpg"),
            "--input_audio", str(tmp_path / "speech.wav"),
            "--output_dir", str(tmp_path), "speed=fast", "inference_steps=5"]  # fmt: skip
    result = run_main(cli.main, args, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "speed fast (unipc, guided steps 0%-25%, deep cache every 2)" in result.stderr
    info = probe_video(tmp_path / "portrait_speech.mp4")
    assert info.num_frames == 30 and info.has_audio  # 1 s x 30 fps


@pytest.mark.e2e
def test_fidelity_measurement_runs_end_to_end(tmp_path):
    """scripts/measure_fidelity.py reduced: 2 clips, a few VAE and training steps, 1 held-out clip, 5 steps."""
    command = [sys.executable, "scripts/measure_fidelity.py", "--work_dir", str(tmp_path), "--videos", "2",
               "--vae_steps", "3", "--train_steps", "2", "--clips", "1", "--steps", "5"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    names = list(results["settings"])
    assert names[0] == "exact" and names[-1] == "fast" and len(names) == 6
    assert results["settings"]["exact"]["vs_exact"][0] == float("inf")
    for row in results["settings"].values():
        assert np.isfinite(row["vs_truth"]).all() and 0 < row["vs_truth"][1] <= 1
    assert results["settings"]["fast"]["vs_exact"][0] < float("inf")
    assert (tmp_path / "runs" / "tiny" / "checkpoint-2" / "diffusion_net").is_dir()
    assert "| fast |" in result.stdout
