"""torch.compile of the reference and diffusion nets, on CPU with the tiny checkpoint.

COMPILE TEST, one of the suite's slowest (minutes on two cores, all of it dynamo tracing 20,000 calls):
the networks are captured whole (``fullgraph=True``, so any graph break fails the test) and the captured
graphs run with the ``eager`` backend. What may go wrong on a GPU compile is the capture itself (graph
breaks, the temporal memory's updates replayed wrongly), which this checks; inductor's C++ code generation
would add tens of minutes on a small CPU (measured: 8 minutes for aot_eager alone, frames within 6e-5 of
eager), so inductor runs in the GPU check (scripts/gpu_check.py). Inductor's kernels round differently from
eager ones, and the tiny pack's random weights turn one rounding step into a visibly different video
(scripts/tiny_pack_sensitivity.py), so on the tiny pack only the capture can be compared, bit for bit.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile
import torch
from test_pipeline import FPC, make_inputs
from torch._dynamo.utils import counters

from memo.pipeline import MemoPipeline
from memo.runtime.compilation import compile_enabled, compile_networks, compiled_graphs, use_inductor_cache


def generate(pipe, **overrides):
    args = dict(make_inputs(clips=2), frames_per_clip=FPC, past_frames=FPC, num_inference_steps=2, seed=11)
    return pipe(**{**args, **overrides}, guidance_scale=3.5).frames


@pytest.mark.slow
def test_networks_compile_whole_and_match_eager(tiny_checkpoint):
    pipe = MemoPipeline.from_checkpoint(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    eager = generate(pipe)
    torch._dynamo.reset()
    counters.clear()
    compile_networks(pipe, backend="eager")
    compiled = generate(pipe)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    # One reference-net graph; three diffusion-net graphs: the memory created (first clip, first step),
    # folded into (later clips, first step), only read (other steps). A second video compiles nothing.
    assert compiled_graphs() == 4
    assert torch.equal(generate(pipe), compiled)
    assert compiled_graphs() == 4


@pytest.mark.slow
def test_the_deep_cache_passes_are_compiled_too(tiny_checkpoint):
    """speed=fast's deep cache (a hook on the diffusion net) runs the net's two partial passes, not its
    ``forward``: they are compiled as well, and give the eager frames."""
    pipe = MemoPipeline.from_checkpoint(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    cached = dict(num_inference_steps=4, deep_cache_interval=2)
    eager = generate(pipe, **cached)
    torch._dynamo.reset()
    counters.clear()
    compile_networks(pipe, backend="eager")
    net = pipe.diffusion_net
    calls = {name: 0 for name in ("forward_keeping_deep_features", "forward_outer_layers")}
    for name in calls:
        compiled_method = getattr(net, name)
        assert hasattr(compiled_method, "_torchdynamo_orig_callable"), name  # torch.compile's wrapper

        def counted(*args, _method=compiled_method, _name=name, **kwargs):
            calls[_name] += 1
            return _method(*args, **kwargs)

        setattr(net, name, counted)
    compiled = generate(pipe, **cached)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    assert all(count > 0 for count in calls.values()), calls
    assert compiled_graphs() > 1


@pytest.mark.parametrize(
    "setting, device, expected",
    [
        ("auto", "cuda", True),
        ("auto", "cpu", False),
        ("auto", "mps", False),
        ("true", "cpu", True),
        ("false", "cuda", False),
    ],
)
def test_compile_setting(setting, device, expected, caplog):
    assert compile_enabled(setting, torch.device(device)) is expected
    warned = "compile=true on the CPU" in caplog.text
    assert warned == (setting == "true" and device == "cpu")  # forced on the CPU: told it is slow and inexact


def test_inductor_cache_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    chosen = use_inductor_cache(tmp_path / "cache")
    assert chosen.is_dir() and chosen == tmp_path / "cache"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(chosen)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(chosen)  # where inductor will read and write its compiled graphs
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "theirs"))
    assert use_inductor_cache() == tmp_path / "theirs"  # a directory the user set is kept


@pytest.mark.slow
def test_the_command_line_compiles_a_bounded_number_of_graphs_and_matches_eager(pack, tmp_path, monkeypatch):
    """compile=true through inference.py's own main, on a 3-clip video with speech, emotion and guidance: the
    whole-graph capture (run with the eager backend, see the module docstring) gives the frames of
    compile=false, four graphs are compiled whatever the length, and the compile time is on the screen."""
    from conftest import REPO, run_main

    from memo import generator
    from memo.apps import cli
    from memo.evaluation.metrics import read_video

    audio, rate = soundfile.read(REPO / "assets" / "examples" / "speech.wav", dtype="float32")
    speech = tmp_path / "speech.wav"
    soundfile.write(speech, audio[: int(1.6 * rate)], rate)  # 48 frames at 30 fps: 3 clips of 16
    monkeypatch.setattr(generator, "compile_networks", lambda pipe: compile_networks(pipe, backend="eager"))
    base = [
        "--config",
        str(pack / "inference.yaml"),
        "--input_image",
        str(REPO / "assets" / "examples" / "portrait.jpg"),
    ]
    videos = {}
    for setting in ("false", "true"):
        torch._dynamo.reset()
        counters.clear()
        out = tmp_path / setting
        result = run_main(
            cli.main,
            [*base, "--input_audio", str(speech), "--output_dir", str(out), "device=cpu", f"compile={setting}"],
        )
        assert result.returncode == 0, result.stderr
        videos[setting] = read_video(out / "portrait_speech.mp4", with_audio=False).frames
        assert compiled_graphs() == (4 if setting == "true" else 0)
    assert "compiling the networks (4 graphs)" in result.stderr
    assert len(videos["true"]) == 48 and np.array_equal(videos["true"], videos["false"])
