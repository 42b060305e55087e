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
from memo.evaluation.models import MetricModels


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory) -> MetricModels:
    """The tiny metric networks and face models, as the tiny pack lays them out."""
    from memo.tiny.face_models import write_tiny_face_models
    from memo.tiny.metric_models import write_tiny_metric_models

    root = tmp_path_factory.mktemp("metric_models")
    write_tiny_metric_models(root / "metrics")
    write_tiny_face_models(root / "misc" / "face_analysis" / "models")
    return MetricModels(root)


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


# -- what the libraries leave in TMPDIR -----------------------------------------------------------------


def test_library_defaults_send_the_compile_cache_to_the_project_cache_and_keep_the_users_values(tmp_path, monkeypatch):
    """torch.compile's cache folder goes under ``$XDG_CACHE_HOME/memo`` and onnxruntime's telemetry (``.ses`` in
    TMPDIR) is off, unless the user chose otherwise; a cache that cannot be made leaves torch's default, so
    importing memo never fails (a read-only home). The whole program: test_tiny_flag_builds_the_random_pack."""
    from memo.environment import apply_library_defaults

    for name in ("TORCHINDUCTOR_CACHE_DIR", "ORT_DISABLE_TELEMETRY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    apply_library_defaults()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "memo" / "torchinductor")
    assert (tmp_path / "cache" / "memo" / "torchinductor").is_dir() and os.environ["ORT_DISABLE_TELEMETRY"] == "1"

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "theirs"))
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "0")
    apply_library_defaults()
    assert (
        os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "theirs") and os.environ["ORT_DISABLE_TELEMETRY"] == "0"
    )

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    apply_library_defaults()
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_onnxruntime_writes_nothing_in_tmpdir_or_home(tmp_path):
    """onnxruntime imported through memo, as face analysis and vocal separation import it, in a fresh process
    with an empty TMPDIR and home: both stay empty (its telemetry wrote ``$TMPDIR/.ses`` and
    ``~/.cache/Microsoft/DeveloperTools/.onnxruntime/``)."""
    tmpdir, home = tmp_path / "tmp", tmp_path / "home"
    tmpdir.mkdir()
    home.mkdir()
    env = {name: value for name, value in os.environ.items() if name not in {"ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME"}}
    env |= {"TMPDIR": str(tmpdir), "HOME": str(home), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    code = "from memo.errors import import_runtime; import_runtime('onnxruntime').get_available_providers()"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO, timeout=120)
    assert os.listdir(tmpdir) == [] and list(home.rglob("*")) == []


# -- the download command, in the README's form ---------------------------------------------------------


def test_the_download_hint_is_the_readmes_command(tmp_path, monkeypatch):
    """The README's model section and every program's "not available" message name the same command, in the
    README's ``uv run`` form."""
    import re

    from memo.io import hub

    readme = (REPO / "README.md").read_text()
    named = re.findall(r"`([^`]*scripts/download_models\.py[^`]*)`", readme)
    assert named == [hub.DOWNLOAD_COMMAND] and hub.DOWNLOAD_COMMAND.startswith("uv run ")
    message = hub.missing_models_message([("vae", hub.VAE_REPO, "not downloaded")])
    assert f"once, with network access: {hub.DOWNLOAD_COMMAND}\n" in message
    assert hub.metric_download_command(tmp_path) == f"{hub.DOWNLOAD_COMMAND} --metrics {tmp_path}"


# -- offline: told in seconds ---------------------------------------------------------------------------


@pytest.fixture
def hub_at(monkeypatch):
    """Point huggingface_hub at ``http://127.0.0.1:PORT`` with a 1 s wait, forgetting earlier probes."""
    from huggingface_hub import constants

    from memo.io import hub

    def point(port: int) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
        monkeypatch.setattr(hub, "_PROBES", {})

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return point


def test_an_unreachable_hub_is_told_in_seconds_and_a_cached_model_still_loads(hub_at, tmp_path):
    """With the network blocked and the cache empty, every model is refused at once: a closed port (refused) or a
    port that takes the connection and never answers (a firewall, a captive portal; huggingface_hub waited on it
    for good). A model already in the cache loads without the network, and the download command says one line."""
    import socket
    import time

    from memo.io import hub

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        for endpoint_port in (port, silent.getsockname()[1]):
            hub_at(endpoint_port)
            start = time.monotonic()
            for repo in (hub.VAE_REPO, hub.WAV2VEC_REPO, hub.EMOTION2VEC_REPO):
                with pytest.raises(hub.MissingModelError) as caught:
                    hub.resolve_model_dir(repo, ["config.json"], cache_dir=tmp_path / "empty", setting="vae")
                assert "not downloaded, and the hub cannot be reached (http://127.0.0.1:" in str(caught.value)
            assert time.monotonic() - start < 5  # one probe of at most 1 s, then the cache alone
            with pytest.raises(hub.MissingModelError, match="the hub cannot be reached"):
                hub.download_all(["vae"], cache_dir=tmp_path / "empty")
            assert not (tmp_path / "empty" / "models--stabilityai--sd-vae-ft-mse" / "snapshots").exists()

        commit = "0" * 40
        cached = tmp_path / "cache" / "models--stabilityai--sd-vae-ft-mse"
        (cached / "refs").mkdir(parents=True)
        (cached / "refs" / "main").write_text(commit)
        (cached / "snapshots" / commit).mkdir(parents=True)
        (cached / "snapshots" / commit / "config.json").write_text("{}")
        found = hub.resolve_model_dir(hub.VAE_REPO, ["config.json"], cache_dir=tmp_path / "cache", setting="vae")
        assert found == cached / "snapshots" / commit
    finally:
        silent.close()


def test_a_hub_that_answers_is_asked_for_the_files(hub_at, tmp_path, monkeypatch):
    """The real download path: when the hub answers (any HTTP status), snapshot_download is asked as before,
    network allowed."""
    import http.server
    import threading

    from memo.io import hub

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    calls = []
    monkeypatch.setattr(hub, "snapshot_download", lambda **kwargs: calls.append(kwargs) or str(tmp_path))
    try:
        hub_at(server.server_address[1])
        assert hub.hub_unreachable() is None
        assert hub.resolve_model_dir(hub.VAE_REPO, ["config.json"], setting="vae") == tmp_path
        assert calls[0]["local_files_only"] is False and calls[0]["repo_id"] == hub.VAE_REPO
    finally:
        server.shutdown()
        server.server_close()


# -- evaluate.py stopped part way -----------------------------------------------------------------------


@pytest.mark.slow  # the tiny Inception on four videos: about 6 min on two busy cores
def test_evaluate_stopped_part_way_leaves_no_report_and_no_partial_and_goes_on_when_run_again(
    metric_models, tmp_path, monkeypatch
):
    """SIGTERM while the second video's features are being written: one line (what stopped it, no report, where
    the features computed so far are kept), exit status 143, no partial file, nothing beside the report's place;
    a partial left by a ``kill -9`` is removed by the next run, never read, and the next run finishes with the
    first video's features from the cache."""
    import signal

    import numpy as np
    from test_evaluation import FPS, textures, write_video

    import memo.evaluation.run
    from memo.evaluation.command import main as evaluation_main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gen, ref = tmp_path / "generated", tmp_path / "reference"
    for folder in (gen, ref):
        folder.mkdir()
        for name in ("a", "b"):
            write_video(folder / f"{name}.mp4", textures(8, 32, seed=ord(name)), FPS, None)
    features = tmp_path / "cache" / "memo" / "features"
    features.mkdir(parents=True)
    killed = features / ".fid-0123.npz.99999-0badc0de.partial.npz"  # a kill -9's half-written feature file
    killed.write_bytes(b"PK\x03\x04 half")

    savez, written = np.savez, []

    def save_then_stop(path, **arrays):
        savez(path, **arrays)
        written.append(path)
        if len(written) == 3:  # a's two files, then the first of b's: stopped while it is a partial
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(memo.evaluation.run.np, "savez", save_then_stop)
    args = ["--generated", str(gen), "--reference", str(ref), "--metrics", "fid", "--models", str(metric_models.root)]
    args += ["--out", str(tmp_path / "out" / "report.json")]
    stopped = run_main(evaluation_main, args, cwd=tmp_path)
    assert stopped.returncode == 143, stopped.stderr
    (line,) = stopped.stderr.strip().splitlines()[-1:]
    kept = f"the features computed so far are kept in {features} and reused by the same command."
    assert line == f"stopped by SIGTERM; no report was written; {kept}"

    assert not (tmp_path / "out").exists() and not killed.exists()
    assert sorted(path.name.startswith(".") for path in features.iterdir()) == [False, False]

    monkeypatch.setattr(memo.evaluation.run.np, "savez", savez)
    rerun = run_main(evaluation_main, args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "features: 6 computed, 2 from the cache" in rerun.stderr, rerun.stderr  # a's two from the cache
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["report.json", "report.md"]


# -- the tests page's figures -------------------------------------------------------------------------


def test_the_tests_page_points_at_cis_tier_lines_and_counts_no_tests():
    """docs/tests.md says where the tiers' counts and times are printed (the headings .ci/run really prints)
    rather than a count of tests that goes stale with the next test added."""
    import re

    page = (REPO / "docs" / "tests.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert 'step() { echo "== $* ($(date -u +%H:%M:%S))"; }' in ci and 'step "default tier, seed 1"' in ci
    assert "`== default tier, seed 1 (HH:MM:SS)`" in page
    for text in (page, (REPO / "README.md").read_text()):
        assert not re.search(r"\b\d+ tests\b", text), re.search(r"\b\d+ tests\b", text)


# -- the second pass's own cases (docs/field-tests.md, round 3, second pass) ------------------------------


def test_a_tiny_pack_build_killed_with_kill_9_is_removed_by_the_next_build(tmp_path):
    """The pack is built in a locked hidden folder: a build killed where no handler runs left
    ``~/.cache/memo/.tiny-pack-XXXX`` for good (tens of MB); the next build removes it."""
    from memo.tiny.pack import cached_tiny_pack

    killed = tmp_path / ".tiny-pack-0123456789ab.99999-0badc0de.partial"
    (killed / "vae").mkdir(parents=True)
    (killed / "vae" / "config.json").write_text("{}")
    config = cached_tiny_pack(tmp_path)
    assert config.is_file() and not killed.exists()
    assert [path.name for path in tmp_path.iterdir()] == [config.parent.name]


def test_a_path_naming_an_unknown_users_home_or_a_dangling_link_says_so(pack, tmp_path):
    """``~nosuchuser/a.jpg`` was a RuntimeError traceback ("Could not determine home directory"); a link whose
    file was moved was said not to exist, though the name is there."""
    config = ["--config", str(pack / "inference.yaml"), "--output_dir", str(tmp_path / "out")]
    result = run_main(cli.main, [*config, "--input_image", "~nosuchuser/a.jpg"])
    assert_stopped_early(result, "--input_image ~nosuchuser/a.jpg", "no user named 'nosuchuser'", "in full")

    (tmp_path / "speech.wav").symlink_to(tmp_path / "moved.wav")
    result = run_main(cli.main, [*config, "--input_audio", str(tmp_path / "speech.wav")])
    assert_stopped_early(result, "is a link to", "moved.wav, which does not exist")
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_inference_with_a_hub_that_never_answers_stops_with_the_missing_models(tmp_path):
    """``inference.py`` as a new user runs it, the cache empty and the hub's address taking connections that are
    never answered (a firewall, a captive portal): the one block of missing models, exit 2, nothing written
    (it waited for good before the probe)."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    env = {name: value for name, value in os.environ.items() if name != "HF_HUB_OFFLINE"}
    env |= {"HF_HOME": str(tmp_path / "empty"), "HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}"}
    try:
        result = subprocess.run(
            [sys.executable, str(REPO / "inference.py"), "--output_dir", str(tmp_path / "out")],
            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
        )  # fmt: skip
    finally:
        silent.close()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    block = result.stderr[result.stderr.index("error: ") :].splitlines()
    assert block[0] == "error: 4 models are not available:"
    assert all("the hub cannot be reached (http://127.0.0.1:" in line for line in block[1:5]), block
    assert not (tmp_path / "out").exists()
