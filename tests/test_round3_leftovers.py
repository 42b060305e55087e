"""Issue 29's and 30's leftovers, found by a breaker pass after round 3: overrides among the options, the
evaluation's feature cache on a stop, what libraries leave in TMPDIR, the download command's wording, an
offline start that waits, and the tests page's measured figure. Each runs the program (its ``main``) in this
process where it stops before any model loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, run_main
from test_field_inputs import EXAMPLE_AUDIO, EXAMPLE_IMAGE, assert_stopped_early

from memo.apps import batch, cli, prepare, train, web

# -- key=value overrides wherever they stand among the options ------------------------------------------


def test_overrides_between_options_reach_the_settings_of_every_program(pack, tmp_path):
    """``inference.py --input_image a.jpg fps=25 --input_audio b.wav ...``: the overrides before, between and
    after the options are all read as settings (the last bad one is what the error names), never
    "unrecognized arguments"; the same for batch, data preparation, finetuning and the web app."""
    config = ["--config", str(pack / "inference.yaml")]
    inputs = ["--input_image", str(EXAMPLE_IMAGE), "fps=25", "--input_audio", str(EXAMPLE_AUDIO)]
    result = run_main(cli.main, [*config, *inputs, "solver_steps=0", "--output_dir", str(tmp_path / "out")])
    assert_stopped_early(result, "solver_steps")

    manifest = tmp_path / "jobs.csv"
    manifest.write_text(f"image,audio\n{EXAMPLE_IMAGE},{EXAMPLE_AUDIO}\n")
    argv = ["fps=25", "--manifest", str(manifest), "cfg_scale=nan", "--output_dir", str(tmp_path / "batch")]
    result = run_main(batch.main, [*config, *argv])
    assert result.returncode == 2 and "unrecognized" not in result.stderr and "cfg_scale" in result.stderr

    argv = ["--input_dir", str(tmp_path), "fps=25", "--output_dir", str(tmp_path / "prepared"), "cfg_scale=nan"]
    result = run_main(prepare.main, [*config, *argv])
    assert_stopped_early(result, "cfg_scale")

    argv = ["seed=3", "--config", str(REPO / "configs" / "finetune.yaml"), "learning_rate=nan", "--exp_name", "e"]
    result = run_main(train.main, argv, cwd=tmp_path)
    assert result.returncode == 2 and "unrecognized" not in result.stderr and "learning_rate" in result.stderr

    args = web.parse_args(["fps=25", "--port", "7861", "emotion=happy", "--host", "0.0.0.0", "seed=4"])
    assert args.overrides == ["fps=25", "emotion=happy", "seed=4"] and args.port == 7861

    # an option's own value is still its value, and an unknown --SETTING is still answered with SETTING=value
    result = run_main(cli.main, [*config, *inputs, "--fps", "25"])
    assert result.returncode == 2 and "error: --fps is not an option" in result.stderr and "fps=25" in result.stderr
