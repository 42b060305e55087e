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

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from memo.apps.cli import add_settings_arguments, report_error, report_stop, setup_logging
from memo.errors import UserError, as_path, stop_on_signals

if TYPE_CHECKING:  # imported where used, so that --help and --merge start without torch
    from memo.data.prepare import PreparedVideo, VideoPreparer

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
    args = parser.parse_args(argv)
    if (args.shard is None) != (args.num_shards is None):
        parser.error("--shard and --num_shards go together")
    if args.num_shards is not None and not 0 <= args.shard < args.num_shards:
        parser.error(f"--shard must be in 0..{args.num_shards - 1}")
    if not args.merge and args.input_dir is None:
        parser.error("--input_dir is required (unless --merge)")
    return args


def attempt(preparer: VideoPreparer, video: Path) -> PreparedVideo | str:
    """The video's :class:`~memo.data.prepare.PreparedVideo`, or the reason it cannot be used."""
    from memo.data.prepare import VideoRejected

    try:
        return preparer(video)
    except (VideoRejected, UserError) as error:
        return str(error)
    except Exception as error:  # any failure of one video is recorded and the run goes on
        return f"{type(error).__name__}: {error}"


def prepare(args: argparse.Namespace) -> int:
    """Prepare this shard's unfinished videos; returns the exit status."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from memo.data import store
    from memo.data.prepare import VideoPreparer, describe
    from memo.errors import check_runtimes
    from memo.io.video import check_output_folder
    from memo.settings.inference import load_config

    config = load_config(args.config, args.overrides)
    if args.misc_model_dir:
        config.misc_model_dir = args.misc_model_dir
    args.input_dir = as_path(args.input_dir, "--input_dir")
    if not args.input_dir.is_dir():
        raise UserError(f"The input folder {args.input_dir} does not exist.")
    check_runtimes(config.vocal_separation)
    check_output_folder(args.output_dir)
    videos = store.find_videos(args.input_dir)
    ids = store.video_ids(videos, args.input_dir)
    if args.num_shards:
        videos = [video for video in videos if store.shard_of(ids[video], args.num_shards) == args.shard]
    output = store.PreparedStore(args.output_dir, store.shard_tag(args.shard, args.num_shards))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    finished = output.open()
    todo = [video for video in videos if ids[video] not in finished]
    if args.limit is not None:
        todo = todo[: args.limit]
    skipped = sum(ids[video] in finished for video in videos)
    where = f"shard {args.shard} of {args.num_shards} of the videos" if args.num_shards else "videos"
    logger.info("%s: %d under %s, %d skipped as already prepared", where, len(videos), args.input_dir, skipped)

    done = failed = 0
    if todo:
        preparer = VideoPreparer(config)
        with logging_redirect_tqdm(), tqdm(todo, desc="preparing", unit="video", dynamic_ncols=True) as bar:
            for video in bar:
                video_id = ids[video]
                result = attempt(preparer, video)
                if isinstance(result, str):
                    output.fail(video_id, video, result)
                    failed += 1
                    logger.warning("failed %s (%s): %s", video_id, video, result)
                else:
                    entry = store.metadata_entry(
                        video_id, video, result.fps, result.num_frames, result.width, result.height
                    )
                    output.save(entry, result.files())
                    done += 1
                    logger.info("prepared %s: %s", video_id, describe(result))
                bar.set_postfix(done=done, skipped=skipped, failed=failed)

    logger.info(
        "done: %d prepared, %d skipped, %d failed%s -> %s",
        done,
        skipped,
        failed,
        f" (reasons in {output.failures_path})" if failed else "",
        output.metadata_path,
    )
    if args.num_shards and store.shard_counts(args.output_dir).get(args.num_shards) == set(range(args.num_shards)):
        entries, failures = store.merge(args.output_dir)
        logger.info("merged the %d shards: %d videos, %d failures", args.num_shards, entries, failures)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done (some videos may have failed), 2 bad input or setup, 130/143/129 stopped by
    SIGINT/SIGTERM/SIGHUP (the video being prepared leaves nothing; finished ones are kept)."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    with stop_on_signals():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        args.output_dir = as_path(args.output_dir, "--output_dir")
        if args.merge:
            from memo.data.store import merge

            if not args.output_dir.is_dir():
                raise UserError(f"The output folder {args.output_dir} does not exist; nothing to merge.")
            entries, failures = merge(args.output_dir)
            logger.info("merged: %d videos, %d failures in %s", entries, failures, args.output_dir)
            return 0
        return prepare(args)
    except UserError as error:
        return report_error(error)
    except KeyboardInterrupt as stop:
        return report_stop(stop, "finished videos are kept, run again to go on.")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
