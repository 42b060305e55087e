"""The memory counter checked against real runs, and the memory modes' frames (memo/bench/memory.py,
memo/runtime/memory.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import load_program
from test_pipeline import FPC, make_inputs

from memo.bench.memory import MemoryCounter, fake_device, run_counted
from memo.pipeline import MemoPipeline
from memo.runtime.memory import HostTemporalMemory, ReferenceFramesOnlyHook, ReferenceOnHostHook
from memo.runtime.placement import apply_offload

CPU = torch.device("cpu")


def inputs(clips: int) -> dict:
    args = make_inputs(clips=clips)
    args["emotion_labels"] = torch.zeros_like(args["emotion_labels"])  # counted runs take emotion 0
    return args


def call(clips: int = 2) -> dict:
    return dict(past_frames=FPC, num_inference_steps=2, guidance_scale=3.5, seed=3, vae_batch_size=4)


def load(checkpoint, offload: str = "none", dtype: torch.dtype | None = None) -> MemoPipeline:
    pipe = MemoPipeline.from_checkpoint(checkpoint, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    apply_offload(pipe, offload, CPU)
    return pipe


@pytest.mark.slow
def test_counted_peak_matches_the_real_run(tiny_checkpoint):
    """The same call once on real CPU tensors and once on fake ones: the fake run must allocate and free as
    the real one does (within 5 %)."""
    offload = "none"
    real = run_counted(load(tiny_checkpoint, offload), MemoryCounter(CPU), inputs(2), frames_per_clip=FPC, **call())
    pipe = load(tiny_checkpoint, offload)  # real weights; everything the call makes is fake
    with fake_device():
        counted = run_counted(pipe, MemoryCounter(CPU), inputs(2), frames_per_clip=FPC, **call())
    assert real.frames == counted.frames == 2 * FPC
    weights = real.peak_split["weights"]
    working = real.peak_bytes - weights  # the run's own allocations, beyond the weights it starts with
    assert working > 0.1 * weights
    # Within 5 % of what the run allocates itself (stricter than 5 % of the whole peak).
    assert abs(counted.peak_bytes - real.peak_bytes) <= 0.05 * working
    assert counted.peak_split["weights"] == weights


@pytest.mark.slow
def test_peak_does_not_grow_with_video_length_or_videos(tiny_checkpoint):
    pipe = load(tiny_checkpoint)
    with fake_device():
        one = run_counted(pipe, MemoryCounter(CPU), inputs(1), frames_per_clip=FPC, **call())
        many = run_counted(pipe, MemoryCounter(CPU), inputs(6), frames_per_clip=FPC, **call())
        counter = MemoryCounter(CPU)
        for _ in range(3):  # three videos in one process, one counter
            again = run_counted(pipe, counter, inputs(1), frames_per_clip=FPC, **call())
    assert many.frames == 6 * FPC
    assert many.peak_bytes <= 1.02 * one.peak_bytes
    assert again.peak_bytes <= 1.02 * one.peak_bytes


@pytest.fixture(scope="module")
def none_video(tiny_checkpoint):
    return load(tiny_checkpoint)(**inputs(2), frames_per_clip=FPC, **call()).frames


def float64_inputs(clips: int) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs(clips).items()}


@pytest.fixture(scope="module")
def none_video_float64(tiny_checkpoint):
    return load(tiny_checkpoint, dtype=torch.float64)(**float64_inputs(2), frames_per_clip=FPC, **call()).frames


@pytest.mark.parametrize("offload", ["model", "group"])
def test_memory_modes_give_the_video_of_none(tiny_checkpoint, none_video_float64, offload):
    """Host-streamed temporal memory, chunked feed-forward layers and one-frame VAE calls: the frames of
    offload=none. In float64: the modes round differently (VAE batch size, chunked and re-placed matrix
    products, which pick other kernels), and the random-weight tiny pack amplifies a float32 rounding step
    to several /255 (scripts/tiny_pack_sensitivity.py); float64's rounding stays far below float32 frames'."""
    pipe = load(tiny_checkpoint, offload, dtype=torch.float64)
    memory = pipe.memory_factory()
    assert isinstance(memory, HostTemporalMemory)
    video = pipe(**float64_inputs(2), frames_per_clip=FPC, memory=memory, **call()).frames
    assert len(memory) > 0 and all(kv.device == CPU and kv.dtype == torch.float64 for kv, _ in memory.states.values())
    assert video.shape == none_video_float64.shape
    torch.testing.assert_close(video, none_video_float64, rtol=0, atol=1e-6)


def test_the_mode_that_fits_comes_from_the_counted_table():
    from memo.runtime.memory import MEMORY_TABLE, counted_peak_bytes, fitting_mode

    gib, bf16 = 2**30, torch.bfloat16
    assert counted_peak_bytes("group", 512, 512, bf16) == MEMORY_TABLE["peak_bytes"]["group"]["512"]
    peaks = [counted_peak_bytes(mode, 512, 512, bf16) for mode in ("none", "model", "group")]
    assert peaks == sorted(peaks, reverse=True)  # each lower mode needs less
    assert fitting_mode(24 * gib, 512, 512, bf16) == "none"
    assert fitting_mode(8 * gib, 512, 512, bf16) == "model"
    assert fitting_mode(4 * gib, 512, 512, bf16) == "group"
    assert fitting_mode(1 * gib, 768, 768, bf16) is None
    assert counted_peak_bytes("none", 512, 512, torch.float32) == 2 * peaks[0]
    assert fitting_mode(24 * gib, 512, 512, bf16, lighter_than="model") == "group"  # never a heavier mode
    assert fitting_mode(24 * gib, 512, 512, bf16, lighter_than="group") is None


@pytest.mark.parametrize(
    "offload, available_gib, vae_batch_size, fp8, expected, absent",
    [
        ("none", 8, 8, False, ["offload=model fits", "Or try vae_batch_size=1, fp8_weights=true"], ["group fits"]),
        ("model", 4, 1, False, ["offload=group fits", "Or try fp8_weights=true, a smaller"], ["vae_batch_size"]),
        ("none", 40, 8, False, ["offload=none is counted at 12.0 GiB", "another program"], ["fits:"]),
        ("group", 1, 1, True, ["Try a smaller resolution"], ["offload=", "Or try", "fp8", "vae_batch"]),
        ("none", None, 8, False, ["Try vae_batch_size=1"], ["offload=", "Or try"]),
    ],
)
def test_out_of_memory_advice_names_only_what_would_help(offload, available_gib, vae_batch_size, fp8, expected, absent):
    from memo.runtime.memory import out_of_memory_advice

    available = None if available_gib is None else available_gib * 2**30
    advice = out_of_memory_advice(offload, available, 512, 512, torch.bfloat16, vae_batch_size, fp8)
    assert all(fragment in advice for fragment in expected), advice
    assert not any(fragment in advice for fragment in absent), advice


def fake_cuda_pipeline(checkpoint, scheduler) -> MemoPipeline:
    """The tiny networks (the checkpoint's configs) with random fake weights; call inside ``fake_device()``
    with a ``scheduler`` made outside (its set-up reads tensor values)."""
    from diffusers import AutoencoderKL

    from memo.pipeline import NETWORKS

    networks = {name: cls.from_config(cls.load_config(checkpoint / name)) for name, cls in NETWORKS.items()}
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(checkpoint / "vae"))
    pipe = MemoPipeline(vae=vae, scheduler=scheduler, **networks)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
def test_networks_take_turns_on_an_accelerator_and_leave_after_each_video(tiny_checkpoint):
    """offload=none on a (fake) CUDA device: the networks that do not run wait on the host, so the peak holds
    fewer weights than there are; every video gives its device memory back; length does not raise the peak."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from memo.bench.memory import _all_weights
    from memo.runtime.memory import NETWORK_NAMES
    from memo.runtime.placement import module_bytes

    cuda = torch.device("cuda", 0)
    scheduler = FlowMatchEulerDiscreteScheduler()
    with fake_device():
        pipe = fake_cuda_pipeline(tiny_checkpoint, scheduler)
        apply_offload(pipe, "none", cuda)
        assert pipe._execution_device == cuda and all(t.device == CPU for t in _all_weights(pipe))
        counter = MemoryCounter(cuda)
        one = run_counted(pipe, counter, inputs(1), frames_per_clip=FPC, **call())
        left = counter.device_bytes()  # weights, memory and features all gone: the scheduler's timesteps stay
        assert left <= 1024
        for _ in range(2):  # more videos in the same process
            again = run_counted(pipe, counter, inputs(1), frames_per_clip=FPC, **call())
        assert counter.device_bytes() == left
        many = run_counted(pipe, MemoryCounter(cuda), inputs(6), frames_per_clip=FPC, **call())
    every = module_bytes(*(getattr(pipe, name) for name in NETWORK_NAMES))
    assert one.peak_split["weights"] < every
    assert one.to_device_bytes >= every  # each network came in at least once
    assert again.peak_bytes <= 1.02 * one.peak_bytes
    assert many.frames == 6 * FPC and many.peak_bytes <= 1.02 * one.peak_bytes


def test_reference_frames_only_after_the_memory_step_give_the_same_frames(tiny_checkpoint, none_video):
    """offload=none on an accelerator keeps the reference features on the host until a clip's first step and
    then only the reference frame's rows (hooks on the reference and diffusion nets): on the CPU the same
    hooks (installed by hand) give bit-identical frames."""
    from diffusers.hooks import HookRegistry

    pipe = load(tiny_checkpoint)
    cuts = []

    class CountedCut(ReferenceFramesOnlyHook):
        def new_forward(self, module, sample, timestep, conditions):
            output = super().new_forward(module, sample, timestep, conditions)
            if conditions.update_memory:
                cuts.append(conditions.reference)
            return output

    HookRegistry.check_if_exists_or_initialize(pipe.reference_net).register_hook(ReferenceOnHostHook(), "on_host")
    HookRegistry.check_if_exists_or_initialize(pipe.diffusion_net).register_hook(CountedCut(CPU), "frames_only")
    video = pipe(**inputs(2), frames_per_clip=FPC, **call()).frames
    assert len(cuts) == 2 and all(f.shape[0] in (0, 2) for block in cuts[0].down for f in block)
    assert torch.equal(video, none_video)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--offload", "bogus"], "invalid choice: 'bogus'"),
        (["--resolution", "100"], "'100' is not a positive multiple of 64"),
        (["--resolution", "-64"], "'-64' is not a positive multiple of 64"),
        (["--clips", "0"], "'0' is not a whole number of at least 1"),
        (["--steps", "0"], "'0' is not a whole number of at least 1"),
        (["--table", "t.json", "--fp8"], "--table counts every mode at 256/512/768 without fp8"),
    ],
)
def test_memory_budget_refuses_bad_arguments_in_one_line(args, fragment, capsys):
    program = load_program("scripts/memory_budget.py")
    with pytest.raises(SystemExit) as stopped:
        program.main(args)
    assert stopped.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: " in last and fragment in last


def test_memory_budget_checks_its_output_file_before_counting(tmp_path, capsys, monkeypatch):
    program = load_program("scripts/memory_budget.py")
    monkeypatch.setattr(program, "count_generation", lambda *a, **k: pytest.fail("counted before the check"))
    existing = tmp_path / "counts.json"
    existing.write_text("kept")
    assert program.main(["--json", str(tmp_path)]) == 2
    assert f"give a file name such as '{tmp_path / 'counts.json'}'" in capsys.readouterr().err
    assert program.main(["--json", str(existing)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and existing.read_text() == "kept"
    (tmp_path / "file").write_text("")
    assert program.main(["--table", str(tmp_path / "file" / "t.json")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counts.json", "file"]
