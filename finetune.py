"""Finetune MEMO on prepared talking videos.

    accelerate launch --config_file configs/accelerate.yaml finetune.py \
        --config configs/finetune.yaml --exp_name NAME [key=value ...]

The run writes to ``<output_dir>/<NAME>``; ``key=value`` arguments override the config (dot-list syntax,
e.g. ``data.width=256 max_train_steps=1000 resume_from_checkpoint=latest``); ``--help-settings`` lists every
setting. See docs/finetuning.md.
"""

import sys

from memo.apps.train import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
