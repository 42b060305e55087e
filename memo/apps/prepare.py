"""The program behind ``scripts/prepare_data.py``: prepare training data, the audio features, face embedding,
emotion labels and vocals of every video (the loop is :func:`memo.data.prepare.prepare_videos`).

    python scripts/prepare_data.py --input_dir data/video --output_dir data/embedding --misc_model_dir MISC
    CUDA_VISIBLE_DEVICES=$i python scripts/prepare_data.py --input_dir ... --output_dir ... --shard $i --num_shards 4
    python scripts/prepare_data.py --merge --output_dir data/embedding

Models and settings come from the inference config (``--config``, then ``key=value`` overrides such as
``vocal_separation=false`` or ``fps=25``); the videos must run at its ``fps``. The output directory's layout
is described in ``memo/data/store.py``. A rerun skips the videos already finished and retries the others;
a video that cannot be used is logged and listed in ``failures.jsonl`` with the reason. Shards write their
own metadata files, merged into ``metadata.jsonl`` by the last shard to finish or by ``--merge``.
"""

from __future__ import annotations

import argparse
import logging

from memo.apps.cli import (
    add_settings_arguments,
    inference_setting_names,
    parse_with_settings,
    report_error,
    report_stop,
    setup_logging,
)
from memo.errors import UserError, as_path, as_user_error, stop_on_signals

logger = logging.getLogger("memo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", help="folder of videos (searched recursively)")
    parser.add_argument("--output_dir", required=True, help="where the prepared data goes")
    parser.add_argument("--misc_model_dir", help="folder holding misc/face_analysis and misc/vocal_separator")
    parser.add_argument("--shard", type=int, help="this process's shard, 0 .. num_shards-1")
    parser.add_argument("--num_shards", type=int, help="how many shards the videos are split into")
    parser.add_argument("--limit", type=int, help="stop after preparing or failing this many videos")
    parser.add_argument("--merge", action="store_true", help="only merge the shards' metadata into metadata.jsonl")
    add_settings_arguments(
        parser, overrides_help="inference setting overrides", config_help="inference settings (default: %(default)s)"
    )
    args = parse_with_settings(parser, argv, inference_setting_names())
    if (args.shard is None) != (args.num_shards is None):
        parser.error("--shard and --num_shards go together")
    if args.num_shards is not None and not 0 <= args.shard < args.num_shards:
        parser.error(f"--shard must be in 0..{args.num_shards - 1}")
    if not args.merge and args.input_dir is None:
        parser.error("--input_dir is required (unless --merge)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done (some videos may have failed), 2 bad input or setup, 130/143/129 stopped by
    SIGINT/SIGTERM/SIGHUP (the video being prepared leaves nothing; finished ones are kept)."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    with stop_on_signals():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        output_dir = as_path(args.output_dir, "--output_dir")
        if args.merge:
            from memo.data.store import merge

            if not output_dir.is_dir():
                raise UserError(f"The output folder {output_dir} does not exist; nothing to merge.")
            entries, failures = merge(output_dir)
            logger.info("merged: %d videos, %d failures in %s", entries, failures, output_dir)
            return 0
        from memo.data.prepare import prepare_videos  # here, so that --help and --merge start without torch
        from memo.settings.inference import load_config

        config = load_config(args.config, args.overrides)
        if args.misc_model_dir:
            config = config.updated(misc_model_dir=args.misc_model_dir)
        prepare_videos(config, args.input_dir, output_dir, args.shard, args.num_shards, args.limit)
        return 0
    except (UserError, OSError) as caught:
        if (error := as_user_error(caught)) is None:
            raise
        return report_error(error)
    except KeyboardInterrupt as stop:
        return report_stop(stop, "finished videos are kept, run again to go on.")
