"""The GPU memory settings on CPU: offload modes give the video of offload=none, settings are validated,
the condition models' placement rule, VAE tiles. (Their memory savings need a GPU: scripts/gpu_check.py.)"""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import HookRegistry
from test_pipeline import FPC, make_inputs

from memo.models.temporal_memory import TemporalMemory
from memo.pipeline import MemoPipeline
from memo.runtime.placement import (
    apply_offload,
    condition_models_placement,
    effective_offload,
    generation_working_bytes,
    module_bytes,
)
from memo.settings.inference import ConfigError, load_config

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
GIB = 2**30


def generate(pipe, memory=None):
    args = dict(make_inputs(clips=2), frames_per_clip=FPC, past_frames=FPC, num_inference_steps=1, seed=7)
    args = {k: v.to(pipe.dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in args.items()}
    return pipe(**args, guidance_scale=3.5, memory=memory).frames


def load(checkpoint) -> MemoPipeline:
    """The tiny pipeline in float64. The modes round differently in float32: matrix kernels change with a
    weight's alignment (the memory-mapped checkpoint, the copies offload hooks make), with row chunks and with
    the VAE's batch size, and the random-weight tiny pack amplifies one float32 rounding step to several /255
    (scripts/tiny_pack_sensitivity.py). float64's rounding stays below what float32 frames can show."""
    pipe = MemoPipeline.from_checkpoint(checkpoint, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference_video(tiny_checkpoint):
    pipe = load(tiny_checkpoint)
    memory = TemporalMemory()
    return generate(pipe, memory), memory


@pytest.mark.parametrize("offload", ["model", "group"])
def test_offload_modes_give_the_video_of_none(tiny_checkpoint, reference_video, offload):
    expected, expected_memory = reference_video
    pipe = load(tiny_checkpoint)
    apply_offload(pipe, offload, CPU)  # the hooks run; on a CPU they move nothing
    if offload == "model":
        assert len(pipe._all_hooks) == len(pipe.model_cpu_offload_seq.split("->"))
    else:
        hooked = [m for m in pipe.diffusion_net.modules() if getattr(m, "_diffusers_hook", None) is not None]
        assert isinstance(pipe.diffusion_net.conv_in._diffusers_hook, HookRegistry) and len(hooked) > 100
    memory = TemporalMemory()
    video = generate(pipe, memory)
    torch.testing.assert_close(video, expected, rtol=0, atol=1e-6)
    # The temporal memory is carried across clips as without hooks.
    assert memory.states.keys() == expected_memory.states.keys()
    for name, state in memory.states.items():
        for got, want in zip(state, expected_memory.states[name]):
            assert got.dtype == torch.float64
            assert (got - want).abs().max() <= 1e-9 * want.abs().max()  # relative to the state's scale


def test_unknown_offload_mode_is_rejected_by_the_pipeline_helper(tiny_pipeline):
    with pytest.raises(ValueError, match="offload must be one of none, model, group; got 'disk'"):
        apply_offload(tiny_pipeline, "disk", CPU)


def test_offload_on_a_cpu_is_a_no_op_with_a_warning(caplog):
    assert effective_offload("model", CPU) == "none"
    assert "offload=model has no effect on the CPU" in caplog.text
    assert effective_offload("group", CUDA) == "group"
    assert effective_offload("none", CPU) == "none"


def test_settings_accept_the_documented_values():
    config = load_config("configs/inference.yaml")
    assert (config.compile, config.offload, config.vae_tile_size) == ("auto", "none", 768)
    config = load_config(None, ["compile=true", "offload=model", "vae_tile_size=0"])
    assert (config.compile, config.offload, config.vae_tile_size) == ("true", "model", 0)
    assert load_config(None, ["compile=false", "offload=group"]).compile == "false"


@pytest.mark.parametrize(
    "override, message",
    [
        ("compile=sometimes", "compile must be one of auto, true, false, got 'sometimes'"),
        ("offload=disk", "offload must be one of none, model, group, got 'disk'"),
        ("vae_tile_size=100", "vae_tile_size must be 0 (never tile) or a multiple of 64, got 100"),
        ("vae_tile_size=-64", "vae_tile_size must be 0 (never tile) or a multiple of 64"),
    ],
)
def test_bad_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_compile_cannot_be_forced_with_group_offload():
    with pytest.raises(ConfigError, match="compile=true cannot be combined with offload=group"):
        load_config(None, ["compile=true", "offload=group"])


def test_condition_models_placement_rule():
    need = generation_working_bytes(512, 512, torch.bfloat16)
    assert 11 * GIB < need <= 12 * GIB  # counted: 11.96 GiB, weights included (scripts/memory_budget.py)
    # Twice the pixels: the temporal memory and activations double, the weights (3.1 GiB of it) do not.
    assert 1.6 * need < generation_working_bytes(1024, 512, torch.bfloat16) < 2 * need
    assert generation_working_bytes(512, 512, torch.float32) == 2 * need
    models = 2 * GIB
    # Not on CUDA: nothing to gain.
    assert condition_models_placement(CPU, "none", None, models, need).keep_on_device
    assert condition_models_placement(torch.device("mps"), "group", None, models, need).keep_on_device
    # Offloading asked for: they leave.
    leave = condition_models_placement(CUDA, "model", 100 * GIB, models, need)
    assert not leave.keep_on_device and leave.reason == "offload=model"
    # No offload: they stay only with room for them and for the generation.
    assert condition_models_placement(CUDA, "none", models + need, models, need).keep_on_device
    tight = condition_models_placement(CUDA, "none", models + need - 1, models, need)
    assert not tight.keep_on_device and "free <" in tight.reason
    assert not condition_models_placement(CUDA, "none", None, models, need).keep_on_device


def test_module_bytes_counts_parameters_and_buffers():
    norm = torch.nn.BatchNorm1d(8)  # 16 parameters, 17 buffer elements (mean, var, the int64 counter)
    assert module_bytes(norm, None) == 16 * 4 + 16 * 4 + 8
    assert module_bytes(norm.to(torch.bfloat16)) == 16 * 2 + 16 * 2 + 8


def test_vae_tiles_only_above_the_tile_size(tiny_checkpoint):
    pipe = MemoPipeline.from_checkpoint(tiny_checkpoint)
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))  # 64x96 frames
    whole = pipe.decode_latents(latents, 2)
    pipe.use_vae_tiles(128)  # larger than the frames: untouched
    assert torch.equal(pipe.decode_latents(latents, 2), whole)
    pipe.use_vae_tiles(64)  # the 96-pixel width is tiled
    tiled = pipe.decode_latents(latents, 2)
    assert tiled.shape == whole.shape and not torch.equal(tiled, whole)
    assert (tiled - whole).abs().mean() < 0.1  # blended tiles of the same decoder, not another picture
    pipe.use_vae_tiles(0)
    assert torch.equal(pipe.decode_latents(latents, 2), whole)


@pytest.mark.slow
def test_model_offload_keeps_the_deep_cache_from_one_call_to_the_next(tiny_checkpoint):
    """diffusers' pipelines take accelerate's offload hooks off and put them back after every call; the deep
    cache's hook, installed by the first call, must still run in the second (same frames as offload=none)."""
    args = dict(make_inputs(clips=1), frames_per_clip=FPC, past_frames=FPC, num_inference_steps=2, seed=7)
    args = {k: v.to(torch.float64) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in args.items()}

    def twice(offload: str) -> list[torch.Tensor]:
        pipe = load(tiny_checkpoint)
        apply_offload(pipe, offload, CPU)
        return [pipe(**args, guidance_scale=3.5, deep_cache_interval=2).frames for _ in range(2)]

    plain, offloaded = twice("none"), twice("model")
    assert torch.equal(plain[0], plain[1])
    for frames in offloaded:
        torch.testing.assert_close(frames, plain[0], rtol=0, atol=1e-6)
