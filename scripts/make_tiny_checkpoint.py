"""Write a complete tiny random model pack in the published layouts, and a config that uses it.

    python scripts/make_tiny_checkpoint.py OUT
    python inference.py --config OUT/inference.yaml --input_image IMAGE --input_audio AUDIO --output_dir outputs

Everything the program loads is there (MEMO networks, VAE, wav2vec2, emotion2vec, face analysis and vocal
separator ONNX files, emotion classifier), small and random: the whole program runs end to end with no
download, on a CPU, in seconds. For tests, and for developing without a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from memo.tiny.pack import write_tiny_pack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="directory to write the pack into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    config = write_tiny_pack(args.output, seed=args.seed)
    print(f"Wrote a tiny model pack to {args.output} and its config {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
