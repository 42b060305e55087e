"""The command line of ``finetune.py``: settings, the checks a first run needs, and errors without tracebacks.

Before anything loads (and before accelerate starts), the settings are read and checked, the checkpoint and
the VAE are found or fetched (one short block lists what is missing and the command that downloads it), and
the trackers of ``report_to`` are checked: without a wandb login, wandb logs offline (with a warning saying
how to upload the run later) rather than failing after the models and data have loaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import netrc
import os
import sys
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from memo.apps.cli import HelpSettingsAction, parse_with_settings, report_stop
from memo.errors import UserError, as_user_error, stop_on_signals

if TYPE_CHECKING:
    from memo.settings.training import TrainingConfig
    from memo.training.run import RunInputs

logger = logging.getLogger("memo")

WANDB_HOST = "api.wandb.ai"


class TrackerError(UserError, RuntimeError):
    """A tracker of ``report_to`` cannot be used here."""


class DataError(UserError, FileNotFoundError):
    """``data.data_dirs`` names no prepared data."""


def wandb_logged_in() -> bool:
    """Whether wandb has an API key here without asking: ``WANDB_API_KEY``, or the netrc entry ``wandb login``
    writes for its host (``WANDB_BASE_URL``, default api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", f"https://{WANDB_HOST}")).hostname or WANDB_HOST
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_trackers(report_to: str) -> None:
    """Check the trackers of ``report_to`` before anything loads.

    wandb without a login (no ``WANDB_API_KEY``, no ``wandb login``, ``WANDB_MODE`` unset) logs offline, with a
    warning: the run goes on and ``wandb sync`` uploads it later. A tracker that is not installed is a
    :class:`TrackerError` saying what to install or which ``report_to`` to use instead."""
    wanted = {"wandb", "tensorboard"} if report_to == "all" else {report_to} - {"none"}
    if "wandb" in wanted:
        if importlib.util.find_spec("wandb") is None:
            raise TrackerError(
                "report_to=wandb but wandb is not installed: pip install wandb, or set report_to=tensorboard "
                "or report_to=none."
            )
        mode = os.environ.get("WANDB_MODE", "").lower()
        if mode not in ("offline", "disabled", "dryrun") and not wandb_logged_in():
            os.environ["WANDB_MODE"] = "offline"
            logger.warning(
                "report_to=wandb but wandb has no login here: logging offline into <output_dir>/wandb (upload "
                "later with `wandb sync`). To log online run `wandb login` first; report_to=tensorboard or "
                "report_to=none avoid wandb."
            )
    if "tensorboard" in wanted and not any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):
        raise TrackerError(
            "report_to=tensorboard but tensorboard is not installed: pip install tensorboard, or set report_to=none."
        )


def preflight(config: TrainingConfig) -> RunInputs:
    """Everything a run needs that can be checked before the accelerator starts and the models load: the
    trackers, the checkpoint and VAE files (fetched once into the hub cache), the prepared data's metadata, and
    the run's checkpoint to resume from (a name that is not there, or a damaged one, stops here with nothing
    written); returns what was found, for the run to use as it is."""
    from memo.data.dataset import load_metadata
    from memo.training.checkpointing import resolve_resume
    from memo.training.networks import locate_training_models
    from memo.training.run import RunInputs

    check_trackers(config.tracking.report_to)
    folders = locate_training_models(config.models.model_name_or_path, config.models.vae)
    resume = resolve_resume(config.output_dir, config.checkpointing.resume_from_checkpoint)
    try:
        entries = load_metadata(list(config.data.data_dirs))
    except FileNotFoundError as error:
        raise DataError(f"data.data_dirs: {error} Prepare videos with scripts/prepare_data.py first.") from None
    return RunInputs(folders, entries, resume)


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    from memo.settings.training import settings_help

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="finetuning config (YAML), e.g. configs/finetune.yaml")
    parser.add_argument("--exp_name", required=True, help="run name: outputs go to <output_dir>/<exp_name>")
    parser.add_argument(
        "--help-settings", action=HelpSettingsAction, text=settings_help, help="list every setting and exit"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    from memo.settings.schema import setting_names
    from memo.settings.training import TrainingConfig

    return parse_with_settings(parser, argv, setting_names(TrainingConfig))


def main(argv: list[str] | None = None, description: str = "Finetune MEMO on prepared talking videos.") -> int:
    """Check, then train; returns the exit status (0 done, 2 bad settings or setup, 130 interrupted)."""
    args = parse_args(argv, description)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    try:
        from memo.settings.training import load_config

        config = load_config(args.config, args.overrides, exp_name=args.exp_name)
        inputs = preflight(config)
        from memo.training.loop import train

        with stop_on_signals():
            train(config, inputs)
    except (UserError, OSError) as caught:
        if (error := as_user_error(caught)) is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        return report_stop(stop, "the checkpoints saved so far are kept (resume_from_checkpoint=latest goes on).")
    return 0
