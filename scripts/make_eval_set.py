"""Make an evaluation set from talking-head videos: first-frame portraits, audio, reference clips, a manifest.

    python scripts/make_eval_set.py VIDEOS_DIR OUT_DIR [--fps 30] [--size 512] [--seconds 10]
    python scripts/batch_inference.py --manifest OUT_DIR/manifest.csv --output_dir GENERATED --config CONFIG
    python scripts/evaluate.py --generated GENERATED --reference OUT_DIR/reference --audio OUT_DIR/audio

docs/evaluation.md describes the protocol.
"""

import sys

from memo.evaluation.eval_set import main

if __name__ == "__main__":
    sys.exit(main())
