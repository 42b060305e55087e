"""Prepare training data: the audio features, face embedding, emotion labels and vocals of every video.

    python scripts/prepare_data.py --input_dir data/video --output_dir data/embedding --misc_model_dir MISC

Sharding, merging, reruns and the output layout are described in ``memo/apps/prepare.py``.
"""

import os
import sys

from memo.apps.prepare import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
