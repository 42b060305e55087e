"""Draw docs/images/paste-back.png: a wide photo, the square video MEMO renders from it, and the first frame of the
same video pasted back into the photo (``paste_back=true``), side by side.

    python scripts/paste_back_picture.py [--output docs/images/paste-back.png]

It renders with the tiny pack (``inference.py --tiny``'s RANDOM models, built on first use, offline), so the
animated region shows noise, not a face: the picture shows where the video goes and how its edge blends, not
what MEMO's real models draw. The photo is the bundled example portrait widened to 16:9 by mirroring its sides.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import av
import cv2
import numpy as np
import soundfile
from PIL import Image, ImageDraw

from memo.apps.cli import EXAMPLE_AUDIO, EXAMPLE_IMAGE, model_settings, setup_logging
from memo.generator import MemoGenerator
from memo.settings.inference import load_config
from memo.tiny.pack import cached_tiny_pack

REPO = Path(__file__).resolve().parents[1]
PANEL_HEIGHT = 360
SIZE = 128


def first_frame(path: Path) -> Image.Image:
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_image()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "images" / "paste-back.png")
    args = parser.parse_args()
    setup_logging()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        portrait = np.asarray(Image.open(EXAMPLE_IMAGE).convert("RGB"))
        side = (portrait.shape[0] * 16 // 9 - portrait.shape[1]) // 2
        photo = folder / "wide.png"
        Image.fromarray(cv2.copyMakeBorder(portrait, 0, 0, side, side, cv2.BORDER_REFLECT)).save(photo)
        samples, rate = soundfile.read(EXAMPLE_AUDIO, dtype="float32")
        audio = folder / "speech.wav"
        soundfile.write(audio, samples[: rate // 2], rate)
        overrides = [*model_settings(cached_tiny_pack()), f"resolution={SIZE}", "cfg_scale=1", "device=cpu"]
        overrides += ["vocal_separation=false", "emotion=neutral"]
        generator = MemoGenerator(load_config(None, overrides))
        square = first_frame(generator.generate(photo, audio, folder / "square.mp4"))
        pasted = first_frame(generator.with_settings(paste_back=True).generate(photo, audio, folder / "pasted.mp4"))
        panels = [
            (Image.open(photo).convert("RGB"), "the photo"),
            (square, f"paste_back=false: the {SIZE}x{SIZE} crop video"),
            (pasted, f"paste_back=true: {pasted.width}x{pasted.height}"),
        ]
    resized = [(im.resize((round(im.width * PANEL_HEIGHT / im.height), PANEL_HEIGHT)), text) for im, text in panels]
    gap, top, label = 12, 28, 28
    sheet = Image.new("RGB", (sum(im.width for im, _ in resized) + gap * 4, top + PANEL_HEIGHT + label), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 8), "tiny RANDOM pack (not a real model): the animated region shows noise", fill="gray")
    x = gap
    for im, text in resized:
        sheet.paste(im, (x, top))
        draw.text((x, top + PANEL_HEIGHT + 8), text, fill="black")
        x += im.width + gap
    args.output.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(256).save(args.output, optimize=True)  # a palette keeps the file under 300 kB
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
