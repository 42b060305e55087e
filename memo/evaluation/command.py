"""The ``scripts/evaluate.py`` command: arguments, one line per problem, the table, the report files."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

import torch

from memo.environment import memo_cache_dir
from memo.errors import Interrupted, UserError, as_path, as_user_error, stop_on_signals
from memo.evaluation.models import MetricModels, default_models_dir
from memo.evaluation.run import DEFAULT_METRICS, METRICS, FeatureCache, evaluate, markdown, pair_videos, write_report
from memo.io.video import check_output_path

logger = logging.getLogger("memo")


FEATURES_FOLDER = "features"
"""The folder of the project's cache (:func:`memo.environment.memo_cache_dir`) holding evaluation features."""


def default_cache_dir() -> Path:
    """Where features are kept by default: ``$XDG_CACHE_HOME/memo/features`` (``~/.cache/memo/features``), a
    cache meant to stay, so that a stopped or repeated evaluation reuses what it computed; nothing is written
    beside the report but the report."""
    return memo_cache_dir() / FEATURES_FOLDER


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Score generated talking videos against references: FID, FVD, Sync-C/Sync-D/offset, CSIM.",
        epilog="Protocol, published figures of MEMO and its peers, model downloads: docs/evaluation.md.",
    )
    parser.add_argument("--generated", required=True, help="folder of generated videos (NAME.mp4)")
    parser.add_argument("--reference", required=True, help="folder of reference videos NAME.mp4 (+ NAME.png portraits)")
    parser.add_argument("--audio", help="folder of NAME.wav for the Sync metrics (default: each video's own sound)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(DEFAULT_METRICS), help="what to compute")
    parser.add_argument(
        "--models", help=f"folder holding metrics/ and misc/face_analysis/models (default {default_models_dir()})"
    )
    parser.add_argument("--out", default="report.json", help="JSON report to write (a Markdown table goes beside it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--cache", help=f"feature cache folder (default: {default_cache_dir()})")
    parser.add_argument("--no_cache", action="store_true", help="compute every feature, store none")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; 0 when every video was scored, 2 when any problem left a figure out or nothing ran,
    130/143/129 when stopped by SIGINT/SIGTERM/SIGHUP (one line; no report, no partial file left)."""
    args = parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s", level=logging.WARNING, force=True)
    logger.setLevel(logging.INFO)
    try:
        with stop_on_signals():
            return _run(args)
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP: the feature being written was discarded
        what, status = (str(stop), stop.status) if isinstance(stop, Interrupted) else ("interrupted (Ctrl-C)", 130)
        cache = None if args.no_cache else (args.cache or default_cache_dir())
        kept = f"; the features computed so far are kept in {cache} and reused by the same command" if cache else ""
        with contextlib.suppress(OSError):  # a closed terminal's stderr is gone
            print(f"{what}; no report was written{kept}.", file=sys.stderr)
        return status


def _run(args: argparse.Namespace) -> int:
    try:
        out = check_output_path(as_path(args.out, "--out"), args.overwrite)
        generated = as_path(args.generated, "--generated")
        reference = as_path(args.reference, "--reference")
        audio = as_path(args.audio, "--audio") if args.audio else None
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        models = MetricModels(as_path(args.models, "--models") if args.models else default_models_dir(), device)
        cache_dir = None if args.no_cache else (as_path(args.cache, "--cache") if args.cache else default_cache_dir())
        pairs, problems = pair_videos(generated, reference, audio)
        evaluation = evaluate(pairs, tuple(args.metrics), models, FeatureCache(cache_dir))
    except (UserError, OSError) as caught:
        if (error := as_user_error(caught)) is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    evaluation.problems[:0] = problems
    for line in evaluation.problems:
        print(line, file=sys.stderr)
    print(markdown(evaluation))
    try:
        write_report(evaluation, out)
    except OSError as caught:
        if (error := as_user_error(caught)) is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {out} and {out.with_suffix('.md')}")
    return 2 if any(line.startswith("error:") for line in evaluation.problems) else 0
