"""Render many portrait/audio pairs listed in a manifest, loading the models once per process.

    python scripts/batch_inference.py --manifest jobs.csv --output_dir OUT \
        --config configs/inference.yaml [key=value ...]
    accelerate launch --multi_gpu --num_processes 8 scripts/batch_inference.py --manifest jobs.jsonl --output_dir OUT

The manifest format and the summary are described in ``memo/apps/batch.py``.
"""

import os
import sys

from memo.apps.batch import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
