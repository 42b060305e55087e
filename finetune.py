"""Finetune MEMO on prepared talking videos.

    accelerate launch --config_file configs/accelerate.yaml finetune.py \
        --config configs/finetune.yaml --exp_name NAME [key=value ...]

The run writes to ``<output_dir>/<NAME>``; ``key=value`` arguments override the config (dot-list syntax,
e.g. ``data.width=256 max_train_steps=1000 resume_from_checkpoint=latest``). See docs/finetuning.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

from memo.apps.cli import report_stop
from memo.errors import stop_on_signals
from memo.settings.training import load_config
from memo.training.loop import train


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="finetuning config (YAML), e.g. configs/finetune.yaml")
    parser.add_argument("--exp_name", required=True, help="run name: outputs go to <output_dir>/<exp_name>")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    config = load_config(args.config, args.overrides, exp_name=args.exp_name)
    with stop_on_signals():
        return train(config)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as stop:
        sys.exit(report_stop(stop, "the checkpoints saved so far are kept (resume_from_checkpoint=latest goes on)."))
