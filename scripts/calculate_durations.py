"""Total duration of the videos under a folder, and how their lengths are spread.

    python scripts/calculate_durations.py data/video [--json durations.json] [--workers 16]

Durations come from each file's container header (PyAV), so nothing is decoded and tens of thousands of
files take seconds; files are read in parallel threads. Prints the total in hours, the count, minimum,
median, mean and maximum, and a histogram; files that cannot be read are listed at the end. ``--json``
writes every file's duration (paths relative to the folder) and the reasons for the unreadable ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
from tqdm.auto import tqdm

from memo.data.store import find_videos

BUCKETS = (0, 2, 5, 10, 30, 60, 300, 1800)
"""Histogram bucket starts in seconds; the last bucket is open-ended."""


def read_duration(path: Path) -> float:
    """Seconds of a video according to its container (or, without that, its longest stream)."""
    with av.open(str(path)) as container:
        if container.duration:
            return container.duration / av.time_base
        durations = [float(stream.duration * stream.time_base) for stream in container.streams if stream.duration]
    if not durations:
        raise ValueError("no duration in the file's metadata")
    return max(durations)


def try_duration(path: Path) -> float | str:
    """The duration, or why it cannot be read."""
    try:
        return read_duration(path)
    except Exception as error:  # any unreadable file is reported, not fatal
        return f"{type(error).__name__}: {error}"


def clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def bucket_label(index: int) -> str:
    def short(seconds: int) -> str:
        return f"{seconds // 60} min" if seconds >= 60 else f"{seconds} s"

    low = BUCKETS[index]
    return f">= {short(low)}" if index == len(BUCKETS) - 1 else f"{short(low)} - {short(BUCKETS[index + 1])}"


def summary(durations: dict[str, float]) -> list[str]:
    """Lines of the report: total, statistics and histogram."""
    values = sorted(durations.values())
    total = sum(values)
    lines = [f"Total: {total / 3600:.2f} hours ({clock(total)}) in {len(values)} videos"]
    if not values:
        return lines
    lines.append(
        f"Duration (s): min {values[0]:.2f}, median {statistics.median(values):.2f}, "
        f"mean {total / len(values):.2f}, max {values[-1]:.2f}"
    )
    counts = [0] * len(BUCKETS)
    for value in values:
        counts[max(i for i, low in enumerate(BUCKETS) if value >= low)] += 1
    widest = max(counts)
    used = [index for index, count in enumerate(counts) if count]
    for index in range(used[0], used[-1] + 1):
        count = counts[index]
        bar = "#" * round(40 * count / widest) if count else ""
        lines.append(f"  {bucket_label(index):>15}  {count:>7}  {bar}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="folder searched recursively for videos")
    parser.add_argument("--json", type=Path, help="write every file's duration here")
    parser.add_argument("--workers", type=int, default=16, help="files read at once (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder.", file=sys.stderr)
        return 2

    files = find_videos(args.folder)
    print(f"Found {len(files)} video files under {args.folder}")
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        results = list(tqdm(pool.map(try_duration, files), total=len(files), desc="reading", unit="file", leave=False))
    relative = [path.relative_to(args.folder).as_posix() for path in files]
    durations = {name: value for name, value in zip(relative, results) if isinstance(value, float)}
    unreadable = {name: value for name, value in zip(relative, results) if isinstance(value, str)}

    print("\n".join(summary(durations)))
    if unreadable:
        print(f"Unreadable ({len(unreadable)}):")
        for name, reason in unreadable.items():
            print(f"  {name}: {reason}")
    if args.json:
        report = {
            "folder": os.path.abspath(args.folder),
            "total_seconds": sum(durations.values()),
            "durations": durations,
            "unreadable": unreadable,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"Wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
