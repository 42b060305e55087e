"""The command line of ``inference.py``: arguments, logging, and errors printed without tracebacks."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

from memo.errors import Interrupted, UserError, as_path, as_user_error, stop_on_signals

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_IMAGE = REPO / "assets" / "examples" / "portrait.jpg"
EXAMPLE_AUDIO = REPO / "assets" / "examples" / "speech.wav"
DEFAULT_CONFIG = REPO / "configs" / "inference.yaml"

logger = logging.getLogger("memo")


class HelpSettingsAction(argparse.Action):
    """``--help-settings``: print every setting (generated from the settings model) and exit."""

    def __init__(self, option_strings, dest, text, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.text = text

    def __call__(self, parser, namespace, values, option_string=None):
        print(self.text())
        parser.exit()


def setup_logging(verbose: bool = False) -> None:
    """Concise logs: one ``memo:`` line per stage; other libraries only when something is wrong."""
    logging.basicConfig(format="%(name)s: %(message)s", level=logging.WARNING, force=True)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in ("diffusers", "transformers", "huggingface_hub", "audio_separator", "insightface"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)


def add_settings_arguments(
    parser: argparse.ArgumentParser,
    overrides_help: str = "setting overrides",
    config_help: str = "YAML settings (default: %(default)s)",
) -> None:
    """``--config``, ``--verbose`` and ``key=value`` overrides, as every program of the project takes them."""
    from memo.settings.inference import settings_help

    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
    parser.add_argument(
        "--help-settings", action=HelpSettingsAction, text=settings_help, help="list every setting and exit"
    )
    parser.add_argument("--verbose", action="store_true", help="show other libraries' logs and tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)


def parse_with_settings(
    parser: argparse.ArgumentParser, argv: list[str] | None, names: list[str]
) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with ``key=value`` overrides taken wherever they stand among the options
    (argparse's intermixed parsing: ``--input_image a.jpg fps=25 --input_audio b.wav`` is fine), and an unknown
    ``--NAME [VALUE]`` or ``--NAME=VALUE`` where NAME is a setting (of ``names``) answered with the form settings
    take: ``NAME=VALUE`` (exit status 2)."""
    args, unknown = parser.parse_known_intermixed_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    for item in unknown:
        if not item.startswith("--"):
            continue
        name, _, value = item[2:].partition("=")
        key = name.replace("-", "_")
        if key in names:
            after = given[given.index(item) + 1 :] if item in given else []
            if not value and after and not after[0].startswith("-") and "=" not in after[0]:
                value = after[0]
            parser.error(f"{item} is not an option: settings are given as key=value, e.g. {key}={value or '...'}")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def report_error(error: UserError) -> int:
    """Print a user error as one ``error:`` line on stderr; returns its exit status, 2."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def report_stop(stop: KeyboardInterrupt, after: str) -> int:
    """Print what stopped the run (``stopped by SIGTERM``, ``interrupted (Ctrl-C)``) and ``after`` (what was kept)
    as one line on stderr, if it still exists (a closed terminal's is gone); returns the exit status a shell
    gives for that signal, 128 + its number (130 for a plain KeyboardInterrupt)."""
    what, status = (str(stop), stop.status) if isinstance(stop, Interrupted) else ("interrupted (Ctrl-C)", 130)
    with contextlib.suppress(OSError):
        print(f"{what}; {after}", file=sys.stderr)
    return status


def stop_note(output: Path | None) -> str:
    """What a stopped render leaves: its progress, when it saved some, else nothing."""
    from memo.io.job_state import state_folder

    if output is not None and state_folder(output).is_dir():
        return (
            f"no output was written; the progress is kept in {state_folder(output)}: run the same command again "
            "to continue (--restart starts over)."
        )
    return "no output was written."


def output_name(image: Path, audio: Path) -> str:
    """``<image stem>_<audio stem>.mp4``, as the original release names its outputs."""
    return f"{image.stem}_{audio.stem}.mp4"


def model_settings(pack_config: Path) -> list[str]:
    """The tiny pack's settings as ``key=value`` overrides: its models, and the small size and step count they
    are made for."""
    from omegaconf import OmegaConf

    return [f"{key}={value}" for key, value in OmegaConf.to_container(OmegaConf.load(pack_config)).items()]


def inference_setting_names() -> list[str]:
    from memo.settings.inference import InferenceConfig
    from memo.settings.schema import setting_names

    return setting_names(InferenceConfig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Generate a talking video from one portrait and one audio file with MEMO.",
        epilog="Any setting of the config can be overridden as key=value, e.g. inference_steps=30 emotion=happy.",
    )
    add_settings_arguments(parser)
    parser.add_argument("--input_image", help="portrait image (default: the bundled example)")
    parser.add_argument(
        "--input_audio",
        help="speech or song: wav, mp3, m4a, flac, ogg, video files... (decoded by PyAV; default: the example)",
    )
    parser.add_argument("--output_dir", default="outputs", help="where the mp4 goes (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="random seed, the same as seed=N (default: the config's seed)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--restart", action="store_true", help="discard the progress a stopped render of this output saved"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="check the installation offline: render with a tiny pack of RANDOM weights, built on first use "
        "(the video is noise; the name ends in _tiny.mp4); the config's model settings are replaced by the pack's",
    )
    return parse_with_settings(parser, argv, inference_setting_names())


TINY_NOTICE = (
    "--tiny: the weights are RANDOM (a tiny stand-in pack in %s), so the video is noise: this checks the "
    "installation, it is not a MEMO result. Run without --tiny for the published weights."
)


def main(argv: list[str] | None = None) -> int:
    """Run inference; returns the exit status (0 done, 2 bad input or setup, 130/143/129 stopped by
    SIGINT/SIGTERM/SIGHUP, with the partial output removed)."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        with stop_on_signals():
            return _run(args)
    except KeyboardInterrupt as stop:  # a signal as the run was ending (a launcher stopping it): it has said why
        return stop.status if isinstance(stop, Interrupted) else 130


def _run(args: argparse.Namespace) -> int:
    from memo.runtime.parallel import launched_processes, process_rank

    # Under a launcher every process checks the same settings and files; rank 0 alone reports what is wrong.
    quiet_checks = process_rank() != 0
    try:
        from memo.errors import check_runtimes
        from memo.io.audio import decode_audio
        from memo.io.image import load_image
        from memo.io.video import CheckedOutput
        from memo.settings.inference import ConfigError, load_config

        image = EXAMPLE_IMAGE if args.input_image is None else as_path(args.input_image, "--input_image")
        audio = EXAMPLE_AUDIO if args.input_audio is None else as_path(args.input_audio, "--input_audio")
        output_dir = as_path(args.output_dir, "--output_dir")
        name = output_name(image, audio)
        # --seed N is the setting seed=N: one check for both (memo.settings.inference)
        overrides = [*args.overrides, *([f"seed={args.seed}"] if args.seed is not None else [])]
        if args.tiny:
            from memo.tiny.pack import cached_tiny_pack

            pack_config = cached_tiny_pack()
            logger.warning(TINY_NOTICE, pack_config.parent)
            config = load_config(args.config, [*model_settings(pack_config), *overrides])
            name = f"{Path(name).stem}_tiny.mp4"
        else:
            config = load_config(args.config, overrides)
        if launched_processes() > 1 and config.parallel == "none":
            raise ConfigError(
                f"launched as {launched_processes()} processes but parallel=none (each would render the same "
                "video); add parallel=guidance, or run one process"
            )
        check_runtimes(config.vocal_separation)
        # Each input checked once, here, before any model loads; what is found is handed on and trusted.
        output = CheckedOutput.check(output_dir / name, args.overwrite)
        portrait = load_image(image)
        sound = decode_audio(audio)
        # Nothing has been written yet: the output folder is made when the video is (memo.io.video_writer.VideoWriter).

        from memo.generator import MemoGenerator

        quiet_checks = False
        generator = MemoGenerator(config)
        generator.generate(
            image, audio, output, overwrite=args.overwrite, portrait=portrait, sound=sound, resume=not args.restart
        )
        if args.tiny:
            logger.warning("--tiny: %s was made with RANDOM weights: it shows noise, not a person speaking.", output)
        return 0
    except (UserError, OSError) as caught:
        error = as_user_error(caught)
        if error is None:
            raise
        if args.verbose:
            logger.exception("error")
        if quiet_checks or getattr(error, "quiet", False):  # the other process of parallel=guidance says why
            return 2
        return report_error(error)
    except KeyboardInterrupt as stop:
        return report_stop(stop, stop_note(locals().get("output")))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
