"""Download every published model MEMO uses into the Hugging Face cache, once, so that later runs work offline.

    uv run scripts/download_models.py [--only vae,wav2vec] [--cache_dir DIR] [--force] [--list]
    uv run scripts/download_models.py --metrics [DIR]      # the evaluation's metric networks instead

The models, their files, licences and sizes are the registry in ``memo/io/hub.py``. Files already in the cache
are not fetched again (``--force`` fetches them anew, replacing damaged ones), and an interrupted download
resumes. With ``--cache_dir`` the files go there; give the
same folder to the programs as ``model_cache_dir=DIR``. ``--metrics`` fetches the files scripts/evaluate.py
scores with (FID's Inception, FVD's I3D, SyncNet; published outside the hub) into ``DIR/metrics`` (default
``$MEMO_EVAL_MODELS`` or ``~/.cache/memo/evaluation``, where evaluate.py looks).
"""

from __future__ import annotations

import argparse
import sys

from memo.errors import UserError
from memo.io.hub import (
    METRIC_MODELS,
    REGISTRY,
    default_metric_models_dir,
    download_all,
    download_metric_models,
    size_text,
)


def table(components: list[str]) -> str:
    """Registry rows as aligned lines: component, hub repo, size, licence."""
    rows = [(m.component, m.repo_id, m.size, m.licence) for m in (REGISTRY[name] for name in components)]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"  {c:<{widths[0]}}  {r:<{widths[1]}}  {s:>{widths[2]}}  {lic}" for c, r, s, lic in rows)


def download_metrics(folder: str, list_only: bool) -> int:
    """The ``--metrics`` branch: list the metric files with their licences, then fetch those missing."""
    print("The evaluation's metric networks (scripts/evaluate.py):")
    for model in METRIC_MODELS.values():
        print(f"  {model.name:<10}  {model.file}  {model.url}  licence: {model.licence}")
    if list_only:
        return 0
    try:
        paths = download_metric_models(folder)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"  {path}")
    print(f"Done: scripts/evaluate.py --models {folder} finds them (the default folder needs no --models).")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated components (default: all): {', '.join(REGISTRY)}")
    parser.add_argument("--cache_dir", help="download into this folder instead of the Hugging Face cache")
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    parser.add_argument("--force", action="store_true", help="download files already cached again (damaged ones)")
    parser.add_argument(
        "--metrics",
        nargs="?",
        const=str(default_metric_models_dir()),
        metavar="DIR",
        help="download the metric networks of scripts/evaluate.py into DIR/metrics instead "
        f"(default {default_metric_models_dir()})",
    )
    args = parser.parse_args(argv)
    if args.metrics is not None:
        return download_metrics(args.metrics, args.list)
    components = [name.strip() for name in args.only.split(",")] if args.only else list(REGISTRY)
    unknown = [name for name in components if name not in REGISTRY]
    if unknown:
        print(
            f"error: --only: unknown component {', '.join(unknown)}; choose from {', '.join(REGISTRY)}.",
            file=sys.stderr,
        )
        return 2
    total = size_text(sum(REGISTRY[name].megabytes for name in components))
    print(f"MEMO's models ({total} in all):\n{table(components)}")
    if args.list:
        return 0
    try:
        folders = download_all(components, cache_dir=args.cache_dir, force=args.force)
    except KeyboardInterrupt:
        print("interrupted; run the command again to resume.", file=sys.stderr)
        return 130
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - one line for any hub or network failure
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(
            f"error: the download failed ({type(error).__name__}: {reason}); check the network and run the "
            "command again (it resumes).",
            file=sys.stderr,
        )
        return 2
    for repo, folder in folders.items():
        print(f"  {repo}: {folder}")
    print("Done: inference.py, app.py and finetune.py now find the models without the network.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
