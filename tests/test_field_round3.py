"""What real users hit next, round 3 (issue 29): kinds 3 to 7, one test per instance, through the programs.

Kind 1 (checkpoints killed mid-save) is tests/test_checkpoint_saves.py, kind 2 (damaged model files)
tests/test_model_files.py. Each check here stops before any model loads, so the programs run in this process;
the whole programs (disk full mid-render, vocal separation killed) are the ``e2e`` cases at the end.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import av.error
import numpy as np
import pytest
from conftest import REPO, load_program, run_main
from test_field_inputs import EXAMPLE_AUDIO, EXAMPLE_IMAGE, FAST, assert_stopped_early, run

from memo.apps import batch, cli
from memo.errors import failure_message
from memo.evaluation.run import Evaluation, markdown, pair_videos, write_report
from memo.io import partial
from memo.io.partial import work_folder
from memo.settings.inference import load_config

INPUTS = ["--input_image", str(EXAMPLE_IMAGE), "--input_audio", str(EXAMPLE_AUDIO)]


# -- kind 3: library errors as tracebacks -----------------------------------------------------------


def test_disk_full_from_a_library_is_one_line(pack, tmp_path, monkeypatch):
    """PyAV's ``av.error.OSError: [Errno 28]`` as the video is written: one line naming the file, exit 2 (the
    real disk, filled mid-render: test_disk_full_mid_render_e2e)."""
    from memo.generator import MemoGenerator

    def full(self, image, audio, output, **kwargs):
        raise av.error.OSError(errno.ENOSPC, "No space left on device", str(output))

    monkeypatch.setattr(MemoGenerator, "__init__", lambda self, config: None)
    monkeypatch.setattr(MemoGenerator, "generate", full)
    result = run(pack, *INPUTS, "--output_dir", str(tmp_path / "out"), *FAST)
    assert_stopped_early(result, "the disk is full while writing", "portrait_speech.mp4", "free some space")
    assert "disk is full" in failure_message(av.error.OSError(errno.ENOSPC, "No space left on device", "x.mp4"))


@pytest.mark.parametrize(
    ("override", "fragment"),
    [('emotion="happy', "unbalanced quote"), ("cfg_scale='3", "unbalanced quote"), ("a=[1", "cannot be read")],
)
def test_a_malformed_override_names_itself(pack, tmp_path, override, fragment):
    result = run(pack, *INPUTS, "--output_dir", str(tmp_path), override)
    assert_stopped_early(result, repr(override), fragment)


@pytest.mark.parametrize("form", [["--seed"], ["seed="]])
@pytest.mark.parametrize(("seed", "fragment"), [(2**64, "at most 18446744073709551615"), (-1, "at least 0")])
def test_seed_out_of_range_is_refused_before_the_models_load_in_either_form(pack, tmp_path, form, seed, fragment):
    """kind 3 (beyond 64 bits) and kind 5 (--seed -1 accepted while seed=-1 was refused): one check."""
    args = [*form, str(seed)] if form == ["--seed"] else [f"seed={seed}"]
    result = run(pack, *INPUTS, "--output_dir", str(tmp_path), *args)
    assert_stopped_early(result, f"seed must be {fragment}")


def test_tiny_with_an_unwritable_cache_says_where_to_point_it(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked / "cache"))  # honoured: the message names it
    result = run_main(cli.main, ["--tiny", "--output_dir", str(tmp_path / "out")], cwd=tmp_path)
    assert_stopped_early(result, f"{blocked / 'cache' / 'memo'}", "XDG_CACHE_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(blocked))
    result = run_main(cli.main, ["--tiny", "--output_dir", str(tmp_path / "out")], cwd=tmp_path)
    assert_stopped_early(result, f"{blocked / '.cache' / 'memo'}", "point XDG_CACHE_HOME at a writable folder")


@pytest.mark.parametrize(
    ("encoding", "separator"), [("utf-16", ","), ("cp1252", ","), ("utf-8", ";"), ("utf-8-sig", "\t")]
)
def test_manifests_as_spreadsheets_save_them_are_read(tmp_path, encoding, separator):
    """UTF-16 (Excel's Unicode text) and Windows-1252 (Excel's CSV), and CSVs separated by ; or tabs (kind 4)."""
    image = tmp_path / "café.jpg"
    shutil.copy(EXAMPLE_IMAGE, image)
    shutil.copy(EXAMPLE_AUDIO, tmp_path / "speech.wav")
    manifest = tmp_path / "jobs.csv"
    text = f"image{separator}audio{separator}cfg_scale\r\ncafé.jpg{separator}speech.wav{separator}2.5\r\n"
    manifest.write_bytes(text.encode(encoding))
    _, [job] = batch.load_jobs(manifest, tmp_path / "out", None, [])
    assert job.image == image and job.settings == {"cfg_scale": 2.5}


# -- kind 4: messages that misname the problem -------------------------------------------------------


def test_an_url_as_input_is_said_to_be_one(pack, tmp_path):
    result = run(pack, "--input_image", "https://example.com/a.jpg", "--output_dir", str(tmp_path))
    assert_stopped_early(result, "is a URL; URLs are not fetched")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("which", ["--input_image", "--input_audio"])
def test_a_pipe_as_input_is_said_to_be_one(pack, tmp_path, which):
    """What a shell's <(...) gives: a pipe, read once (it used to be 'does not exist' or 'is empty (0 bytes)')."""
    pipe = tmp_path / "63"
    os.mkfifo(pipe)
    args = {"--input_image": str(EXAMPLE_IMAGE), "--input_audio": str(EXAMPLE_AUDIO), which: str(pipe)}
    result = run(pack, *[x for pair in args.items() for x in pair], "--output_dir", str(tmp_path / "out"))
    assert_stopped_early(result, str(pipe), "is a pipe", "save it to a file")


def test_a_config_folder_and_a_tab_in_yaml_are_said_as_such(tmp_path):
    result = run_main(cli.main, ["--config", str(tmp_path)])
    assert_stopped_early(result, "is a folder; give the YAML file")
    config = tmp_path / "settings.yaml"
    config.write_text("resolution: 64\n\tinference_steps: 2\n")
    result = run_main(cli.main, ["--config", str(config)])
    assert_stopped_early(result, "line 2 is indented with a tab", "found a tab character", "line 2, column 1")


@pytest.mark.parametrize("argv", [["--emotion", "happy"], ["--emotion=happy"]])
def test_a_setting_given_as_an_option_is_answered_with_its_form(argv):
    result = run_main(cli.main, argv)
    assert result.returncode == 2 and "settings are given as key=value, e.g. emotion=happy" in result.stderr
    result = run_main(load_program("scripts/batch_inference.py").main, ["--manifest", "m", "--output_dir", "o", *argv])
    assert result.returncode == 2 and "emotion=happy" in result.stderr


# -- kind 5: one check, every path -------------------------------------------------------------------


def test_manifest_paths_are_checked_before_any_model_loads(tmp_path):
    """Windows paths, a URL and a missing file: exit 2 with every row named, nothing loaded or written."""
    shutil.copy(EXAMPLE_AUDIO, tmp_path / "speech.wav")
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(
        "image,audio\n"
        f"{EXAMPLE_IMAGE},speech.wav\n"
        "C:\\Users\\me\\portrait.jpg,speech.wav\n"
        f"{EXAMPLE_IMAGE},https://example.com/speech.wav\n"
        f"{EXAMPLE_IMAGE},gone.wav\n"
    )
    out = tmp_path / "out"
    result = run_main(batch.main, ["--manifest", str(manifest), "--output_dir", str(out)])
    assert result.returncode == 2, result.stderr
    assert "line 3: the image" in result.stderr and "it is a Windows path" in result.stderr
    assert "line 4: the audio https://example.com/speech.wav is a URL" in result.stderr
    assert "line 5: the audio" in result.stderr and "gone.wav does not exist" in result.stderr
    assert "line 2" not in result.stderr and "models: loaded" not in result.stderr and not out.exists()


# -- kind 6: temporary work files --------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_vocal_separation_killed_leaves_its_copy_only_until_the_next_run(pack, tmp_path):
    """The separator's float32 copy of the user's audio is in a locked work folder: after a kill -9 the next
    separation (or any other work folder made there) removes it."""
    import torch

    from memo.conditions.vocals import VocalSeparator

    separator = VocalSeparator.from_dir(pack / "misc" / "vocal_separator", work_dir=tmp_path)
    pid = os.fork()
    if pid == 0:
        try:

            def killed(*args, **kwargs):
                os.kill(os.getpid(), signal.SIGKILL)

            separator._separator.separate = killed
            separator(torch.zeros(16000))
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    [left] = list(tmp_path.iterdir())
    assert left.name.startswith(".memo-vocals.") and (left / "speech.wav").is_file()
    partial._CLEANED.discard(str(tmp_path))  # the next run is a new process: it has not looked here yet
    with work_folder("memo-vocals", tmp_path) as folder:  # what the next separation makes first
        assert list(tmp_path.iterdir()) == [folder]
    assert list(tmp_path.iterdir()) == []


def test_a_work_folder_is_removed_on_leaving(tmp_path):
    with work_folder("memo-vocals", tmp_path) as folder:
        (folder / "speech.wav").write_bytes(b"x")
        assert folder.parent == tmp_path
    assert list(tmp_path.iterdir()) == []


# -- kind 7: evaluate.py -----------------------------------------------------------------------------


def write_clip(path: Path, size: int) -> None:
    from memo.io.video_writer import VideoWriter

    frames = np.random.default_rng(0).integers(0, 255, (4, size, size, 3), dtype=np.uint8)
    with VideoWriter(path, 5, size, size) as writer:
        writer.write(frames)


def test_evaluate_skips_hidden_files_and_warns_of_other_sizes(tmp_path):
    generated, reference = tmp_path / "generated", tmp_path / "reference"
    generated.mkdir(), reference.mkdir()
    write_clip(generated / "a.mp4", 64)
    write_clip(reference / "a.mp4", 64)
    write_clip(generated / "b.mp4", 64)
    write_clip(reference / "b.mp4", 128)
    (generated / "._a.mp4").write_bytes(b"\x00\x05\x16\x07" * 8)  # macOS metadata beside a.mp4
    shutil.copy(generated / "a.mp4", generated / ".c.4242-0123abcd.partial.mp4")  # a killed batch's partial
    pairs, problems = pair_videos(generated, reference)
    assert [pair.name for pair in pairs] == ["a", "b"]
    assert problems == [
        "warning: b.mp4 is 64x64 but its reference b.mp4 is 128x128: scored as they are, so FID, FVD and CSIM "
        "compare different detail; render at the reference's size to compare like with like."
    ]


def test_reports_take_the_users_umask_and_the_table_survives_missing_figures(tmp_path):
    evaluation = Evaluation(videos={"a": {"fid": 1.5}, "b|c": {}}, set={"videos": 2})
    old = os.umask(0o022)
    try:
        write_report(evaluation, tmp_path / "report.json")
    finally:
        os.umask(old)
    for name in ("report.json", "report.md"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    for table in (
        markdown(evaluation),
        markdown(Evaluation(videos={"a": {}}, set={})),
        (tmp_path / "report.md").read_text(),
    ):
        rows = [line for line in table.strip().splitlines()]
        widths = {line.replace("\\|", "").count("|") for line in rows}
        assert len(widths) == 1, table


@pytest.mark.parametrize("value", ["2", "-1"])
def test_a_number_is_not_taken_as_true(value):
    with pytest.raises(Exception, match=f"vocal_separation={value} .* takes true or false"):
        load_config(None, [f"vocal_separation={value}"])
    assert load_config(None, ["vocal_separation=0"]).vocal_separation is False


# -- the whole programs ------------------------------------------------------------------------------


def unshare_available() -> bool:
    probe = (
        subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True, check=False)
        if shutil.which("unshare")
        else None
    )
    return probe is not None and probe.returncode == 0


@pytest.mark.e2e
@pytest.mark.skipif(sys.platform != "linux" or not unshare_available(), reason="needs unshare (a private tmpfs)")
def test_disk_full_mid_render_e2e(pack, tmp_path):
    """inference.py writing onto a 70 MB tmpfs that another program fills once the video is being written:
    one error line naming the file, exit 2, no partial video left behind (the filler and the progress stay)."""
    out = tmp_path / "out"
    out.mkdir()
    command = " ".join(
        [sys.executable, str(REPO / "inference.py"), "--config", str(pack / "inference.yaml"), *INPUTS,
         "--output_dir", str(out), *FAST, "fps=30"]
    )  # fmt: skip
    script = (
        f"mount -t tmpfs -o size=70m tmpfs {out} && ({command} 2>{tmp_path}/err; echo $? > {tmp_path}/rc) & "
        f"while ! ls -A {out}/.*.resume | grep -q clip; do sleep 0.05; [ -f {tmp_path}/rc ] && break; done; "
        f"dd if=/dev/zero of={out}/filler bs=1M 2>/dev/null; wait; ls -A {out} > {tmp_path}/left"
    )
    subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], timeout=600, check=False)
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2", err
    # the progress bar's last line ends in \r, so the error line follows it on the same terminal line
    assert err.count("error: ") == 1 and "error: the disk is full while writing" in err, err
    assert "Traceback" not in err
    # the render's progress stays, to be taken up once there is room (memo.io.job_state); no half file in it
    assert sorted((tmp_path / "left").read_text().split()) == [".portrait_speech.mp4.resume", "filler"]
