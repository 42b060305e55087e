"""Prepare training data: the audio features, face embedding, emotion labels and vocals of every video.

    python scripts/prepare_data.py --input_dir data/video --output_dir data/embedding --misc_model_dir MISC
    CUDA_VISIBLE_DEVICES=$i python scripts/prepare_data.py --input_dir ... --output_dir ... --shard $i --num_shards 4
    python scripts/prepare_data.py --merge --output_dir data/embedding

Models and settings come from the inference config (``--config``, then ``key=value`` overrides such as
``vocal_separation=false`` or ``fps=25``); the videos must run at its ``fps``. The output directory's layout
is described in ``memo/data/store.py``. A rerun skips the videos already finished and retries the others;
a video that cannot be used is logged and listed in ``failures.jsonl`` with the reason. Shards write their
own metadata files, merged into ``metadata.jsonl`` by the last shard to finish or by ``--merge``.
"""

import os
import sys

from memo.apps.prepare import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
