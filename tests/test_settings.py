"""The typed settings model (memo/settings), the model registry (memo/io/hub.py) and the first-run checks.

In-process tests of the settings model and the registry first; then a few whole-program tests (marked e2e):
bad keys in every entry point, ``--help-settings``, and first runs offline and without a wandb login.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from omegaconf import DictConfig

from memo.io import hub
from memo.settings import inference, schema, training

# -- the settings model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [inference.InferenceConfig, training.TrainingConfig])
def test_every_setting_has_a_type_a_default_and_one_line_of_help(cls):
    rows = list(schema.describe(cls))
    names = [name for name, *_ in rows]
    assert names == schema.setting_names(cls) and len(set(names)) == len(names)
    for name, kind, default, text in rows:
        assert kind and default and text and "\n" not in text, name
    listing = (inference.settings_help if cls is inference.InferenceConfig else training.settings_help)()
    assert all(f"  {name} " in listing for name in names)


def test_inference_bad_keys_name_the_key_and_the_closest_valid_ones(tmp_path):
    with pytest.raises(
        schema.ConfigError,
        match="Unknown setting 'inferance_steps' in the command line; did you mean 'inference_steps'",
    ):
        inference.load_config(None, ["inferance_steps=3"])
    with pytest.raises(schema.ConfigError, match=r"Invalid setting seed=abc in the command line: .*\(it takes int"):
        inference.load_config(None, ["seed=abc"])
    with pytest.raises(schema.ConfigError, match="crf must be at most 51, got 99"):
        inference.load_config(None, ["crf=99"])
    yaml = tmp_path / "mine.yaml"
    yaml.write_text("inference_steps: 10\nframming: crop\n")
    with pytest.raises(schema.ConfigError, match=f"Unknown setting 'framming' in {yaml}; did you mean 'framing'"):
        inference.load_config(yaml)
    with pytest.raises(schema.ConfigError, match="did you mean 'cfg_scale'"):
        inference.check_names({"cfg_scal": 2.0}, "with_settings()")


def test_training_bad_keys_name_the_key_and_the_closest_valid_ones():
    config = REPO / "configs" / "finetune.yaml"
    with pytest.raises(
        schema.ConfigError, match="Unknown setting 'data.no_such_key' in the command line; did you mean 'data."
    ):
        training.load_config(config, ["data.no_such_key=1"])
    with pytest.raises(schema.ConfigError, match="Unknown setting 'validation.stepz'.*'validation.steps'"):
        training.load_config(config, ["validation.stepz=1"])
    with pytest.raises(schema.ConfigError, match="Invalid setting learning_rate=fast in the command line"):
        training.load_config(config, ["learning_rate=fast"])
    with pytest.raises(schema.ConfigError, match="data.past_zero_ratio must be at most 1, got 2.0"):
        training.load_config(config, ["data.past_zero_ratio=2"])
    with pytest.raises(schema.ConfigError, match="mixed_precision must be one of no, fp16, bf16, got 'fp8'"):
        training.load_config(config, ["mixed_precision=fp8"])
    loaded = training.load_config(config, ["data.width=256"])
    with pytest.raises(dataclasses.FrozenInstanceError):  # checked once, at loading: nothing changes it later
        loaded.data.width = "wide"


def test_training_settings_load_as_typed_sections_under_the_names_users_write(tmp_path):
    """Flat names (as in the original release) land in their section; the result holds no DictConfig."""
    loaded = training.load_config(
        REPO / "configs" / "finetune.yaml",
        ["learning_rate=2e-5", "max_train_steps=7", "uncond_img_mode=drop_reference", "report_to=none"],
        exp_name="run",
    )
    assert isinstance(loaded, training.TrainingConfig)
    assert isinstance(loaded.optimizer, training.OptimizerSettings) and loaded.optimizer.learning_rate == 2e-5
    assert isinstance(loaded.schedule.max_train_steps, int) and loaded.schedule.max_train_steps == 7
    assert loaded.dropout.uncond_img_mode == "drop_reference" and loaded.tracking.report_to == "none"
    assert loaded.models.trained() == {
        "reference_net": False,
        "diffusion_net": True,
        "image_proj": False,
        "audio_proj": False,
    }
    assert loaded.output_dir == os.path.join("outputs", "run")

    def no_dictconfig(value):
        assert not isinstance(value, DictConfig), value
        if dataclasses.is_dataclass(value):
            for field in dataclasses.fields(value):
                no_dictconfig(getattr(value, field.name))

    no_dictconfig(loaded)
    # A run saves its settings under the names users write (config.yaml), which load back to the same settings.
    saved = tmp_path / "config.yaml"
    saved.write_text(loaded.to_yaml())
    assert "\nlearning_rate: 2.0e-05\n" in saved.read_text() and "optimizer" not in saved.read_text()
    again = training.load_config(saved)
    assert dataclasses.replace(again, output_dir=loaded.output_dir) == loaded


def test_inference_settings_load_as_typed_sections_under_the_names_users_write(tmp_path):
    """Flat names land in their section (frozen objects, no DictConfig); each also reads under its own name."""
    yaml = tmp_path / "mine.yaml"
    yaml.write_text("fps: 25\nvocal_separation: false\noffload: model\n")
    loaded = inference.load_config(yaml, ["vae_batch_size=4", "emotion=Happy", "speed=fast", "paste_back=true"])
    assert isinstance(loaded.models, inference.ModelSettings) and loaded.models.vocal_separation is False
    assert isinstance(loaded.video, inference.VideoSettings) and (loaded.video.fps, loaded.fps) == (25, 25)
    assert loaded.video.paste_back is True and loaded.video.size == loaded.size == (512, 512)
    assert loaded.runtime.offload == "model" and loaded.memory.vae_batch_size == 4
    assert loaded.conditions.emotion == "happy"  # checked and normalised once, at loading
    assert loaded.sampling.speed_settings == loaded.speed_settings and loaded.speed_settings.solver == "unipc"
    assert inference.LOAD_SETTINGS == set(schema.setting_names(inference.ModelSettings)) | set(
        schema.setting_names(inference.RuntimeSettings)
    )
    for field in dataclasses.fields(loaded):
        assert not isinstance(getattr(loaded, field.name), DictConfig), field.name
    with pytest.raises(dataclasses.FrozenInstanceError):  # nothing changes it after the check
        loaded.video.fps = 1000
    with pytest.raises(AttributeError):
        loaded.no_such_setting  # noqa: B018
    changed = loaded.updated(fps=24, seed=7)
    assert (changed.video.fps, changed.sampling.seed, loaded.video.fps) == (24, 7, 25)
    with pytest.raises(schema.ConfigError, match="did you mean 'fps'"):
        loaded.updated(fsp=24)


def test_help_settings_lists_the_inference_settings_under_their_sections():
    listing = inference.settings_help().splitlines()
    for section in dataclasses.fields(inference.InferenceConfig):
        heading = listing.index(f"{section.name}: {section.metadata['help']}")
        names = schema.setting_names(schema.hints(inference.InferenceConfig)[section.name])
        following = listing[heading + 1 : heading + 1 + 2 * len(names) : 2]
        assert [line.split()[0] for line in following] == names, section.name


@pytest.mark.parametrize(
    ("name", "largest"),
    [
        ("fps", inference.MAX_FPS),
        ("vae_batch_size", inference.MAX_VAE_BATCH_SIZE),
        ("audio_chunk_seconds", inference.MAX_AUDIO_CHUNK_SECONDS),
    ],
)
def test_settings_without_a_natural_limit_have_a_largest_value_with_its_reason(name, largest):
    """Issue 29: a huge fps, VAE batch or audio chunk was taken, and failed or hung later."""
    assert inference.load_config(None, [f"{name}={largest}"]).__getattr__(name) == largest
    for value in (largest + 1, 10**30):
        with pytest.raises(schema.ConfigError, match=f"{name} must be at most {largest}, got "):
            inference.load_config(None, [f"{name}={value}"])
    with pytest.raises(schema.ConfigError, match=f"{name} must be at most"):  # with_settings' path: the same check
        inference.validate(inference.InferenceConfig().updated(**{name: largest * 2}))
    assert f"at most {largest}: " in inference.setting_help(name)  # the help says why


def test_old_training_names_still_work_with_a_visible_deprecation_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="memo"):
        config = training.load_config(
            REPO / "configs" / "finetune.yaml",
            ["data.n_sample_frames=8", "validation.num_inference_steps=3", "validation.guidance_scale=2.5"],
        )
    assert config.data.num_generated_frames_per_clip == 8
    assert config.validation.inference_steps == 3 and config.validation.cfg_scale == 2.5
    warned = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    for old, new in training.RENAMED.items():
        assert any(old in message and "deprecated" in message and new in message for message in warned), warned


def test_shipped_configs_and_the_tiny_packs_config_load_without_warnings(pack, caplog):
    with caplog.at_level(logging.WARNING, logger="memo"):
        inference.load_config(REPO / "configs" / "inference.yaml")
        inference.load_config(pack / "inference.yaml")
        training.load_config(REPO / "configs" / "finetune.yaml")
    assert not caplog.records, [record.getMessage() for record in caplog.records]


def test_same_settings_share_defaults_between_inference_and_training():
    """A setting inference and training both have holds the same default under the same name."""
    run, train = inference.InferenceConfig(), training.TrainingConfig()
    assert (run.model_name_or_path, run.vae) == (train.models.model_name_or_path, train.models.vae)
    assert run.num_generated_frames_per_clip == train.data.num_generated_frames_per_clip
    assert run.num_past_frames == train.data.num_past_frames
    assert (run.inference_steps, run.cfg_scale) == (train.validation.inference_steps, train.validation.cfg_scale)


def test_dataloader_workers_default_to_the_cores_this_process_has(caplog):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert training.dataloader_workers(None) == min(cores, training.MAX_DEFAULT_WORKERS)
    assert training.dataloader_workers(0) == 0
    with caplog.at_level(logging.WARNING, logger="memo"):
        assert training.dataloader_workers(cores + 6) == cores
    assert f"data.num_workers={cores + 6} but this process has {cores} CPU core" in caplog.text


# -- the model registry --------------------------------------------------------------------------------------


def _string_constants(path: Path) -> list[str]:
    """The string literals of a Python file, docstrings left out (prose may name a model)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    docstrings |= {  # attribute docstrings: a string statement after an assignment
        id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_each_model_fact_is_defined_once_in_the_code():
    """Hub ids and model file names appear as a literal only in memo/io/hub.py, across the package, the entry
    points, the scripts and the ComfyUI pack."""
    facts = {model.repo_id for model in hub.REGISTRY.values()}
    facts |= {hub.FACE_DETECTOR_FILE, hub.FACE_RECOGNIZER_FILE, hub.VOCAL_SEPARATOR_FILE}
    sources = [*REPO.glob("*.py"), *(REPO / "memo").rglob("*.py"), *(REPO / "scripts").glob("*.py")]
    sources += list((REPO / "comfyui_memo").glob("*.py"))
    found: dict[str, list[str]] = {fact: [] for fact in facts}
    for path in sources:
        for text in _string_constants(path):
            for fact in facts:
                if fact in text:
                    found[fact].append(str(path.relative_to(REPO)))
    assert found == {fact: ["memo/io/hub.py"] for fact in facts}


def test_readme_model_table_is_the_registry():
    """The README's model table lists exactly the registry's rows: setting, repo, licence and size."""
    readme = (REPO / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ") and line.count("|") == 7]
    table = {}
    for line in rows:
        cells = [cell.strip().strip("`") for cell in line.strip("|").split("|")]
        if cells[0] in hub.REGISTRY:
            table[cells[0]] = (cells[1], cells[2], cells[4], cells[5])
    assert table == {m.component: (m.setting, m.repo_id, m.licence, m.size) for m in hub.REGISTRY.values()}
    for model in hub.REGISTRY.values():  # each file named in its row
        row = next(line for line in rows if line.startswith(f"| {model.component} |"))
        assert all(Path(pattern.rstrip("/*")).name in row for pattern in model.files), row


def test_missing_models_message_is_one_short_block():
    message = hub.missing_models_message(
        [("vae", hub.VAE_REPO, "not downloaded"), ("wav2vec", "/data/w2v", "no such folder")]
    )
    lines = message.splitlines()
    assert lines[0] == "2 models are not available:"
    assert lines[1] == f"  - vae={hub.VAE_REPO} ({hub.REGISTRY['vae'].size}): not downloaded"
    assert lines[2] == "  - wav2vec=/data/w2v: no such folder"
    assert hub.DOWNLOAD_COMMAND in lines[3] and "vae=DIR wav2vec=DIR" in lines[4] and len(lines) == 5


# -- first-run checks of finetune.py -------------------------------------------------------------------------


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_without_a_login_logs_offline_with_a_warning(tmp_path, monkeypatch, caplog):
    # check_trackers finds wandb without importing it; importing it here would fail in a worker where an
    # earlier test loaded librosa, whose lazy `samplerate` stub needs a libsamplerate few machines have.
    from memo.apps.train import check_trackers

    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: never logged in
    with caplog.at_level(logging.WARNING, logger="memo"):
        check_trackers("wandb")
    assert os.environ["WANDB_MODE"] == "offline"
    assert "wandb login" in caplog.text and "wandb sync" in caplog.text and "report_to=none" in caplog.text
    caplog.clear()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    monkeypatch.delenv("WANDB_MODE")
    check_trackers("wandb")  # logged in: left alone
    assert "WANDB_MODE" not in os.environ and not caplog.records


@pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(name) for name in ("tensorboard", "tensorboardX")),
    reason="tensorboard is installed",
)
def test_a_tracker_that_is_not_installed_is_one_line():
    from memo.apps.train import TrackerError, check_trackers

    with pytest.raises(TrackerError, match="report_to=tensorboard but tensorboard is not installed: pip install"):
        check_trackers("tensorboard")


# -- whole programs ------------------------------------------------------------------------------------------


def _run(*args: str, env: dict | None = None, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env or dict(os.environ), cwd=cwd
    )


def _assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "models: loaded" not in result.stderr  # stopped before any model loaded
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.mark.e2e
def test_bad_keys_in_every_entry_point_are_one_line_before_any_model_loads(pack, tmp_path):
    config = str(pack / "inference.yaml")
    image = REPO / "assets" / "examples" / "portrait.jpg"
    audio = REPO / "assets" / "examples" / "speech.wav"
    _assert_one_error_line(
        _run(str(REPO / "inference.py"), "--config", config, "--output_dir", str(tmp_path / "a"), "inferance_steps=2"),
        "Unknown setting 'inferance_steps'", "did you mean 'inference_steps'",
    )  # fmt: skip
    _assert_one_error_line(
        _run(str(REPO / "finetune.py"), "--config", "configs/finetune.yaml", "--exp_name", "x", "data.no_such_key=1"),
        "Unknown setting 'data.no_such_key'", "did you mean 'data.",
    )  # fmt: skip
    _assert_one_error_line(
        _run(str(REPO / "finetune.py"), "--config", "configs/finetune.yaml", "--exp_name", "x", "seed=abc"),
        "Invalid setting seed=abc",
    )  # fmt: skip
    _assert_one_error_line(
        _run(str(REPO / "app.py"), "--config", config, "--output_dir", str(tmp_path / "w"), "crf=99"),
        "crf must be at most 51, got 99",
    )  # fmt: skip
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(f"image,audio,cfg_scal\n{image},{audio},2\n")
    batch = str(REPO / "scripts" / "batch_inference.py")
    result = _run(batch, "--manifest", str(manifest), "--output_dir", str(tmp_path / "b"), "--config", config)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "line 2: column 'cfg_scal' is neither a file column nor a setting; did you mean 'cfg_scale'" in result.stderr
    manifest.write_text(f"image,audio\n{image},{audio}\n")
    result = _run(batch, "--manifest", str(manifest), "--output_dir", str(tmp_path / "b"), "--config", config, "fps=x")
    _assert_one_error_line(result, "Invalid setting fps=x")
    assert not any(tmp_path.glob("*/*.mp4"))


@pytest.mark.e2e
def test_a_huge_fps_stops_inference_with_one_line_before_any_model_loads(tmp_path):
    result = _run(str(REPO / "inference.py"), "--tiny", "--output_dir", str(tmp_path / "out"), "fps=100000")
    _assert_one_error_line(result, f"fps must be at most {inference.MAX_FPS}, got 100000")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.e2e
def test_help_settings_lists_every_setting_from_the_model():
    for program, cls in (("inference.py", inference.InferenceConfig), ("finetune.py", training.TrainingConfig)):
        result = _run(str(REPO / program), "--help-settings")
        assert result.returncode == 0, result.stderr
        for name, kind, default, text in schema.describe(cls):
            assert (
                f"  {name} " in result.stdout
                and text in result.stdout
                and f"[{kind}; default {default}]" in result.stdout
            )


@pytest.mark.e2e
def test_finetune_first_run_offline_without_the_vae_or_a_wandb_login(pack, tmp_path):
    """finetune.py with the README's config (report_to: wandb), no wandb login, offline with an empty cache, and
    a checkpoint without its own VAE: the wandb warning and the short missing-model block, before accelerate."""
    pytest.importorskip("wandb")
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(pack, checkpoint, ignore=shutil.ignore_patterns("vae"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_cache"), "HOME": str(tmp_path)}
    result = _run(
        str(REPO / "finetune.py"), "--config", str(REPO / "configs" / "finetune.yaml"), "--exp_name", "first",
        f"model_name_or_path={checkpoint}", f"output_dir={tmp_path / 'runs'}", env=env,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    block = result.stderr[result.stderr.index("error: ") :].splitlines()
    assert block[0] == "error: 1 model is not available:"
    assert block[1].startswith(f"  - vae={hub.VAE_REPO} (") and "HF_HUB_OFFLINE" in block[1]
    assert hub.DOWNLOAD_COMMAND in block[2] and "vae=DIR" in block[3] and len(block) == 4
    assert "wandb has no login here: logging offline" in result.stderr
    assert "Distributed environment" not in result.stderr  # the accelerator never started
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("override", "section", "name", "expected"),
    [
        ("mixed_precision=no", "tracking", "mixed_precision", "no"),  # YAML reads no as false
        ("compile=true", "runtime", "compile", "true"),
        ("compile=off", "runtime", "compile", "false"),
    ],
)
def test_a_choice_written_as_a_yaml_boolean_word_is_the_choice(override, section, name, expected):
    """``key=no`` and ``key: true`` reach YAML as booleans: a choice setting that has the word takes it."""
    module = training if section == "tracking" else inference
    path = REPO / "configs" / ("finetune.yaml" if module is training else "inference.yaml")
    config = module.load_config(path, [override])
    assert getattr(getattr(config, section), name) == expected


def test_a_boolean_for_a_choice_without_that_word_is_refused_in_one_line():
    with pytest.raises(schema.ConfigError, match="mixed_precision must be one of no, fp16, bf16, got True"):
        training.load_config(REPO / "configs" / "finetune.yaml", ["mixed_precision=yes"])
