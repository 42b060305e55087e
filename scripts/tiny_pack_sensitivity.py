"""How far the tiny pack's video moves when the networks' matrix products round differently.

    python scripts/tiny_pack_sensitivity.py                      # relative sizes 1e-7, 1e-6, 1e-5
    python scripts/tiny_pack_sensitivity.py --relative 1e-7 --pack PACK --audio speech.wav

Renders the bundled portrait with the first second of the bundled speech through the command line's own
generator (``memo.generator.MemoGenerator``, the tiny pack's settings, CPU, fp32, compile=false), then again
with each change and prints how far the decoded frames are from the first video's, in 1/255 of the pixel
range. The changes: none (the run is repeatable), every linear and convolution layer's output of the
reference and diffusion nets copied (hooks alone change nothing), then multiplied by ``1 + r * N(0, 1)``
(noise from its own seeded generator, so the sampling noise is unchanged) for each ``--relative`` r.
``r = 1e-7`` is about one float32 rounding step (2**-23 = 1.2e-7): what a kernel that adds in another order
(a compiled or fused kernel, another library) changes. The pack's random weights amplify it through the
steps and the temporal memory into a visibly different video (measured on 2 CPU cores: 3.1/255 mean, 44
max), as large as what inductor's CPU kernels change (``compile=true``: 5.2 mean, 58 max), so on the tiny
pack two computations can only be compared bit for bit (``tests/test_compile.py`` does so for the compiled
capture on the command line), not within a tolerance. Whether the published weights amplify as much is not
measured here.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import soundfile
import torch

from memo.evaluation.metrics import read_video
from memo.generator import MemoGenerator
from memo.settings.inference import load_config
from memo.tiny.pack import write_tiny_pack

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "assets" / "examples"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relative", nargs="+", type=float, default=[1e-7, 1e-6, 1e-5], help="sizes r")
    parser.add_argument("--pack", type=Path, help="a tiny pack folder (default: one written to a temporary folder)")
    parser.add_argument("--audio", type=Path, help="speech to render (default: the bundled example's first second)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        pack = args.pack or write_tiny_pack(work / "pack").parent
        audio = args.audio
        if audio is None:
            samples, rate = soundfile.read(EXAMPLES / "speech.wav", dtype="float32")
            audio = work / "speech.wav"
            soundfile.write(audio, samples[:rate], rate)
        generator = MemoGenerator(load_config(pack / "inference.yaml", ["device=cpu", "compile=false"]))
        baseline = render(generator, audio, work / "baseline.mp4")
        print(f"tiny pack, CLI path, CPU fp32, {len(baseline)} frames; frames' distance from the unperturbed video")
        print(f"{'change':>14} {'mean /255':>10} {'max /255':>9} {'frame 1 mean':>13}")
        changes = {"none (again)": None, "copy (r = 0)": lambda output: output.clone()}
        for relative in args.relative:
            noise = torch.Generator().manual_seed(0)
            changes[f"r = {relative:g}"] = lambda output, r=relative, noise=noise: (
                output
                * (
                    1 + r * torch.empty_like(output).normal_(generator=noise)  # empty_like: the output's strides
                )
            )
        pipe = generator.pipeline
        layers = [
            module
            for network in (pipe.reference_net, pipe.diffusion_net)
            for module in network.modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d))
        ]
        for label, change in changes.items():
            hooks = (
                []
                if change is None
                else [layer.register_forward_hook(lambda m, i, o, c=change: c(o)) for layer in layers]
            )
            try:
                frames = render(generator, audio, work / "changed.mp4")
            finally:
                for hook in hooks:
                    hook.remove()
            distance = np.abs(frames.astype(np.int16) - baseline.astype(np.int16))
            print(f"{label:>14} {distance.mean():>10.2f} {distance.max():>9d} {distance[0].mean():>13.2f}")


def render(generator: MemoGenerator, audio: Path, output: Path) -> np.ndarray:
    """The decoded frames (T, H, W, 3) uint8 of the portrait speaking ``audio``."""
    generator.generate(EXAMPLES / "portrait.jpg", audio, output, overwrite=True)
    return read_video(output, with_audio=False).frames


if __name__ == "__main__":
    main()
