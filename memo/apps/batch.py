"""Batch inference: a manifest of image/audio jobs, each process loading the models once and rendering its share.

A manifest is a CSV file with a header or a JSONL file, one job a row: ``image``, ``audio``, optionally ``output``
(a name under the output folder; default ``<image stem>_<audio stem>.mp4``) and any per-call setting as a column
(``emotion``, ``seed``, ``inference_steps``...; an empty cell keeps the config's value). Relative paths are read
from the manifest's folder. The whole manifest is checked before any work: unknown columns, invalid settings and
two rows writing the same output make it a bad manifest. Under ``accelerate launch`` or ``torchrun`` each process
takes every N-th job on its own device; finished outputs are skipped, a failing job is reported and the rest go
on, and the first process writes the summary of all of them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env

from memo.apps.cli import (
    add_settings_arguments,
    inference_setting_names,
    output_name,
    parse_with_settings,
    report_error,
    report_stop,
    setup_logging,
)
from memo.errors import UserError, as_path, as_user_error, check_runtimes, failure_message, stop_on_signals
from memo.generator import LOAD_SETTINGS, MemoGenerator
from memo.io.inputs import URL, input_problem
from memo.io.partial import write_atomically
from memo.io.video import check_output_folder
from memo.progress import log_above_bars, work_bar
from memo.settings.inference import ConfigError, InferenceConfig, load_config
from memo.settings.schema import closest, flat_values, setting_names

logger = logging.getLogger("memo")

FILE_COLUMNS = ("image", "audio", "output")
SUMMARY_NAME = "batch_summary.json"
GATHER_TIMEOUT = timedelta(days=2)
"""How long a process that finished its share waits for the others before the summary is gathered."""


class ManifestError(UserError, ValueError):
    """The manifest cannot be run as it is: nothing has been rendered."""


@dataclass
class Job:
    """One row of the manifest: where it is, its files, and the settings it changes."""

    line: int
    image: Path
    audio: Path
    output: Path
    settings: dict[str, Any] = field(default_factory=dict)


def manifest_text(manifest: Path) -> str:
    """The manifest's text, as spreadsheet programs save it: UTF-8 (with or without a byte-order mark), UTF-16
    with its mark (Excel's "Unicode text"), else Windows-1252 (Excel's "CSV" on Windows), said in a warning."""
    data = manifest.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as error:
            raise ManifestError(f"Manifest {str(manifest)!r} is not valid UTF-16 text ({error.reason}).") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError:
            raise ManifestError(
                f"Manifest {str(manifest)!r} is not UTF-8 text ({error.reason} at byte {error.start}); save it as "
                "UTF-8."
            ) from None
        logger.warning("%s is not UTF-8; read as Windows-1252 (save it as UTF-8 to be sure of its names)", manifest)
        return text


def csv_delimiter(header: str) -> str:
    """The CSV's separator: a comma, or a semicolon or tab when the header has no comma but those (as spreadsheet
    programs write CSV where the comma is the decimal mark)."""
    if "," not in header:
        for candidate in (";", "\t"):
            if candidate in header:
                return candidate
    return ","


def read_rows(manifest: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line, cells)`` of each job row of a CSV (comma, semicolon or tab separated) or JSONL manifest in UTF-8,
    UTF-16 or Windows-1252 (:func:`manifest_text`); empty cells and nulls are left out."""
    problem = input_problem(manifest, "manifest file")
    if problem is not None:
        raise ManifestError(f"Manifest {str(manifest)!r} {problem}.")
    suffix = manifest.suffix.lower()
    rows: list[tuple[int, dict[str, Any]]] = []
    text = manifest_text(manifest)
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise ManifestError(
            f"{manifest}, line {line}: holds a NUL character ('\\x00'), as UTF-16 or UTF-32 text without a "
            "byte-order mark does; save it as UTF-8."
        )
    with io.StringIO(text, newline="") as file:
        if suffix == ".csv":
            delimiter = csv_delimiter(file.readline())
            file.seek(0)
            reader = csv.DictReader(file, skipinitialspace=True, delimiter=delimiter, strict=True)
            try:
                names = [name.strip() for name in reader.fieldnames or []]
                twice = sorted({name for name in names if names.count(name) > 1})
                if twice:
                    raise ManifestError(f"{manifest}, line 1: column {twice[0]!r} is named twice in the header.")
                for cells in reader:
                    if None in cells:
                        raise ManifestError(
                            f"{manifest}, line {reader.line_num}: more cells than the header has columns."
                        )
                    rows.append(
                        (reader.line_num, {key.strip(): value.strip() for key, value in cells.items() if value})
                    )
            except csv.Error as error:
                why = "a quote is not closed" if "end of data" in str(error) else str(error)
                raise ManifestError(f"{manifest}, line {reader.line_num + 1}: {why}.") from None
        elif suffix == ".jsonl":
            for line, text in enumerate(file, 1):
                if not text.strip():
                    continue
                try:
                    cells = json.loads(text)
                except json.JSONDecodeError as error:
                    raise ManifestError(f"{manifest}, line {line}: not valid JSON ({error}).") from None
                except RecursionError:
                    raise ManifestError(f"{manifest}, line {line}: JSON nested too deeply to be a job.") from None
                if not isinstance(cells, dict):
                    raise ManifestError(f"{manifest}, line {line}: a job must be a JSON object.")
                rows.append((line, {key: value for key, value in cells.items() if value not in (None, "")}))
        else:
            raise ManifestError(f"Manifest {str(manifest)!r} must be a .csv (with a header) or .jsonl file.")
    rows = [(line, cells) for line, cells in rows if cells]
    if not rows:
        raise ManifestError(f"Manifest {str(manifest)!r} holds no jobs.")
    return rows


def as_override(key: str, value: Any) -> str:
    """A manifest cell as a ``key=value`` override, the way the command line gives settings."""
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{key} must be a single value, got {json.dumps(value)}")
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def load_jobs(
    manifest: Path, output_dir: Path, config_path: Path | None, overrides: list[str]
) -> tuple[InferenceConfig, list[Job]]:
    """The base settings and every job of the manifest, all checked; a ManifestError lists every problem."""
    base = load_config(config_path, overrides)
    settings_names = set(setting_names(InferenceConfig)) - LOAD_SETTINGS
    problems: list[str] = []
    jobs: list[Job] = []
    for line, cells in read_rows(manifest):
        where = f"line {line}"
        unknown = sorted(set(cells) - set(FILE_COLUMNS) - settings_names)
        for key in unknown:
            why = (
                "chooses the models; set it in the config"
                if key in LOAD_SETTINGS
                else "is neither a file column nor a setting" + closest(key, [*FILE_COLUMNS, *sorted(settings_names)])
            )
            problems.append(f"{where}: column {key!r} {why}")
        wrong = [key for key in FILE_COLUMNS if key in cells and not isinstance(cells[key], str)]
        for key in wrong:
            problems.append(f"{where}: {key} must be a path (text), got {json.dumps(cells[key])}")
        missing = [key for key in ("image", "audio") if key not in cells]
        if missing:
            problems.append(f"{where}: no {' or '.join(missing)} path")
        if wrong:
            continue
        if unknown or missing:
            continue
        try:
            config = load_config(
                config_path,
                [*overrides, *(as_override(k, v) for k, v in cells.items() if k in settings_names)],
                source="the overrides and this row",
            )
        except ConfigError as error:
            problems.append(f"{where}: {error}")
            continue
        image, audio = (manifest.parent / Path(cells[key]).expanduser() for key in ("image", "audio"))
        for what, path, raw in (("image", image, cells["image"]), ("audio", audio, cells["audio"])):
            # checked here, before any model loads (a URL is told by the cell as written)
            shown = raw if URL.match(raw) else path
            problem = input_problem(shown, f"{what} file")
            if problem is not None:
                problems.append(f"{where}: the {what} {shown} {problem}")
        name = Path(str(cells.get("output") or output_name(image, audio)))
        name = name if name.suffix.lower() == ".mp4" else name.with_name(name.name + ".mp4")
        if name.is_absolute() or ".." in name.parts or name.drive:
            problems.append(
                f"{where}: output {str(name)!r} must be a name under the output folder (no absolute path, no '..')"
            )
            continue
        values, base_values = flat_values(config), flat_values(base)
        changed = {name: value for name, value in values.items() if value != base_values[name]}
        jobs.append(Job(line, image, audio, (output_dir / name).resolve(), changed))
    writers: dict[Path, list[int]] = {}
    for job in jobs:
        writers.setdefault(job.output, []).append(job.line)
    problems += [
        f"lines {', '.join(map(str, lines))} write the same output {output}"
        for output, lines in writers.items()
        if len(lines) > 1
    ]
    if problems:
        raise ManifestError(f"Manifest {str(manifest)!r} cannot be run:\n  - " + "\n  - ".join(problems))
    return base, jobs


def run_jobs(generator: MemoGenerator | None, jobs: list[Job], process: int, bar: bool = True) -> list[dict[str, Any]]:
    """Render each job, skipping finished outputs; a failure is recorded with its reason and the next job goes on.
    ``generator`` may be None when every job's output exists (nothing is rendered then).
    With ``bar``, a bar over the jobs (those finished before this run count as done, not in the speed) above each
    video's own (:mod:`memo.progress`)."""
    results = []
    finished = sum(job.output.exists() for job in jobs)
    with (
        log_above_bars(),
        work_bar(total=len(jobs), initial=finished, unit="job", desc="batch", disable=not bar) as done,
    ):
        for number, job in enumerate(jobs, 1):
            record = {"line": job.line, "image": str(job.image), "audio": str(job.audio), "output": str(job.output)}
            record["process"] = process
            if job.output.exists():
                logger.info("job %d/%d (line %d): %s exists, skipped", number, len(jobs), job.line, job.output)
                results.append({**record, "status": "skipped"})
                continue
            logger.info("job %d/%d (line %d): %s", number, len(jobs), job.line, job.output)
            start = time.perf_counter()
            try:
                generator.with_settings(**job.settings).generate(job.image, job.audio, job.output)
            except Exception as error:
                if as_user_error(error) is None:
                    logger.exception("job (line %d) failed", job.line)
                reason = failure_message(error)
            else:
                results.append({**record, "status": "done", "seconds": round(time.perf_counter() - start, 1)})
                done.update()
                continue
            logger.error("job %d/%d (line %d) failed: %s", number, len(jobs), job.line, reason)
            results.append({**record, "status": "failed", "reason": reason})
            done.update()
    return results


def summarize(results: list[dict[str, Any]], manifest: Path, output_dir: Path, processes: int) -> dict[str, Any]:
    """Every job's outcome, grouped as done, skipped and failed, in manifest order."""
    results = sorted(results, key=lambda result: result["line"])
    summary: dict[str, Any] = {"manifest": str(manifest), "output_dir": str(output_dir), "processes": processes}
    for status in ("done", "skipped", "failed"):
        summary[status] = [{k: v for k, v in r.items() if k != "status"} for r in results if r["status"] == status]
    return summary


def report(summary: dict[str, Any], path: Path) -> str:
    """A few lines for the terminal: the counts, where the summary is, and why each failed job failed."""
    counts = ", ".join(f"{len(summary[status])} {status}" for status in ("done", "skipped", "failed"))
    processes = summary["processes"]
    lines = [f"batch: {counts} ({processes} process{'es' if processes > 1 else ''}); summary in {path}"]
    lines += [f"  failed: line {job['line']} ({job['output']}): {job['reason']}" for job in summary["failed"]]
    return "\n".join(lines)


def wants_cpu(config: InferenceConfig) -> bool:
    """Run on the CPU when asked to (``device=cpu``, ``accelerate launch --cpu``) or when there is no GPU."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return (
        config.device == "cpu"
        or parse_flag_from_env("ACCELERATE_USE_CPU")
        or (several and not torch.cuda.is_available())
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Render a manifest of MEMO jobs; data-parallel under `accelerate launch` or `torchrun`.",
        epilog="Settings for every job can be overridden as key=value; a manifest column overrides them per job.",
    )
    parser.add_argument("--manifest", required=True, help="jobs as .csv (with a header) or .jsonl")
    parser.add_argument("--output_dir", required=True, help=f"where the videos and {SUMMARY_NAME} go")
    add_settings_arguments(parser, overrides_help="setting overrides for every job")
    return parse_with_settings(parser, argv, inference_setting_names())


def main(argv: list[str] | None = None) -> int:
    """0 when no job failed, 1 when some did, 2 for a bad manifest, bad settings or missing models, 130/143/129
    when stopped by SIGINT/SIGTERM/SIGHUP (finished videos are kept, and the progress of the job being rendered,
    which a rerun resumes)."""
    start = time.perf_counter()
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        with stop_on_signals():
            return _run(args, start)
    except KeyboardInterrupt as stop:
        return report_stop(
            stop,
            "finished videos are kept, and the progress of the one being rendered (.NAME.mp4.resume beside it): "
            "run the same command again to go on from there.",
        )


def _run(args: argparse.Namespace, start: float) -> int:
    first = int(os.environ.get("RANK", "0")) == 0
    try:
        args.manifest, args.output_dir = as_path(args.manifest, "--manifest"), as_path(args.output_dir, "--output_dir")
        base, jobs = load_jobs(args.manifest, args.output_dir, args.config, args.overrides)
        if base.parallel != "none":
            raise UserError(
                f"parallel={base.parallel} splits one video over two processes; the batch runner gives each "
                "process its own videos instead. Remove parallel=guidance (run the batch under `accelerate "
                "launch` for one video per GPU at a time), or render videos one by one with inference.py."
            )
        check_runtimes(base.vocal_separation)
        check_output_folder(args.output_dir)
    except (UserError, OSError) as caught:
        if (error := as_user_error(caught)) is None:
            raise
        return report_error(error) if first else 2

    state = PartialState(cpu=wants_cpu(base), timeout=GATHER_TIMEOUT)
    several = state.num_processes > 1
    if several:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(f"[process {state.process_index}] %(name)s: %(message)s"))
    mine = jobs[state.process_index :: state.num_processes]
    generator = None  # no model loads when every output of this process's jobs exists already
    try:
        if not all(job.output.exists() for job in mine):
            config = base.updated(device="cpu") if state.device.type == "cpu" else base
            generator = MemoGenerator(config)  # "auto"/"cuda" is this process's GPU: PartialState made it current
    except (UserError, OSError) as caught:
        if (error := as_user_error(caught)) is None:
            raise
        return report_error(error)
    if several:
        generator.progress_bar = False  # several processes would draw over each other's bars
    results = run_jobs(generator, mine, state.process_index, bar=not several)
    results = gather_object(results) if several else results
    summary = summarize(results, args.manifest, args.output_dir, state.num_processes)
    if state.is_main_process:
        path = args.output_dir / SUMMARY_NAME
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps(summary, indent=2) + "\n")
        except OSError as caught:
            if (error := as_user_error(caught)) is None:
                raise
            print(report(summary, path) + f"\n  (not written: {error})")
            return report_error(error)
        print(report(summary, path) + f"\n  in {time.perf_counter() - start:.1f} s")
    if several:
        state.destroy_process_group()
    return 1 if summary["failed"] else 0
