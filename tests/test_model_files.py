"""Damaged model files (issue 29, kind 2): every file is checked before any model loads, and each damaged or
missing one is one line naming the file, what is wrong and the command that fixes it, exit status 2.

The damaged packs are links to the shared tiny pack with the damaged files written in their place. Past the
files' structure, each model's config is checked against its class and its weights against the network the
config builds (memo/io/model_load.py), and any load that still fails is the same one line.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
from conftest import PUBLISHED, load_program, run_main
from test_field_inputs import EXAMPLE_AUDIO, EXAMPLE_IMAGE, FAST, assert_stopped_early, run, run_program

from memo.io.model_files import file_problem

LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 3438167536\n"


def linked_pack(pack: Path, root: Path) -> Path:
    """A copy of the pack made of links to its files (its inference.yaml rewritten for the new place)."""
    for path in pack.rglob("*"):
        if path.is_file():
            target = root / path.relative_to(pack)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.name == "inference.yaml":
                target.write_text(path.read_text().replace(str(pack), str(root)))
            else:
                os.symlink(path, target)
    return root


def damage(root: Path, relative: str, how: str) -> Path:
    """Write a damaged ``relative`` in place of its link: ``truncated`` (the first 1000 bytes), ``empty``,
    ``junk`` (random bytes of the same length), ``lfs`` (a git-lfs pointer), ``invalid_json``, or ``missing``
    (its whole folder removed)."""
    path = root / relative
    data = path.read_bytes()
    path.unlink()
    if how == "missing":
        for child in sorted(path.parent.rglob("*"), reverse=True):
            child.unlink() if not child.is_dir() else child.rmdir()
        path.parent.rmdir()
    else:
        path.write_bytes(
            {
                "truncated": data[:1000],
                "empty": b"",
                "junk": os.urandom(len(data)),
                "lfs": LFS,
                "invalid_json": data[: len(data) // 2],
            }[how]
        )
    return path


CASES = [
    ("diffusion_net/diffusion_pytorch_model.safetensors", "truncated", "is cut short (1,000 bytes", "networks --force"),
    ("vae/diffusion_pytorch_model.safetensors", "empty", "is empty (0 bytes)", "--only vae --force"),
    ("reference_net/diffusion_pytorch_model.safetensors", "junk", "is not a safetensors file", "networks --force"),
    ("wav2vec2/model.safetensors", "lfs", "is a git-lfs pointer", "--only wav2vec --force"),
    ("image_proj/config.json", "invalid_json", "is not valid JSON", "networks --force"),
    ("misc/audio_emotion_classifier/config.json", "missing", "is missing", "networks --force"),
    ("misc/face_analysis/models/glintr100.onnx", "truncated", "is cut short", "face_analysis --force"),
    ("emotion2vec/model.pt", "truncated", "is cut short or damaged", "--only emotion2vec --force"),
    ("emotion2vec/config.yaml", "empty", "is empty", "--only emotion2vec --force"),
]


@pytest.mark.parametrize(("relative", "how", "problem", "fix"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_inference_names_the_damaged_file_before_loading(pack, tmp_path, relative, how, problem, fix):
    root = linked_pack(pack, tmp_path / "pack")
    path = damage(root, relative, how)
    out = tmp_path / "out"
    # emotion=auto: emotion2vec is checked with the others, not after everything else has loaded
    args = [a for a in FAST if not a.startswith("emotion=")]
    result = run(
        root, "--input_image", str(EXAMPLE_IMAGE), "--input_audio", str(EXAMPLE_AUDIO), "--output_dir", str(out), *args
    )
    named = f"the folder {path.parent}" if how == "missing" else str(path)  # one line for a missing folder
    line = assert_stopped_early(result, named, problem, fix)
    assert "models: loaded" not in result.stderr and not out.exists(), line


def test_finetune_names_a_damaged_checkpoint_before_training(pack, tmp_path):
    root = linked_pack(pack, tmp_path / "pack")
    path = damage(root, "audio_proj/diffusion_pytorch_model.safetensors", "lfs")
    config = tmp_path / "finetune.yaml"
    config.write_text(
        f"model_name_or_path: {root}\nvae: {root / 'vae'}\nreport_to: none\noutput_dir: {tmp_path / 'runs'}\n"
        f"data:\n  data_dirs: [{tmp_path / 'nodata'}]\n"
    )
    result = run_main(load_program("finetune.py").main, ["--config", str(config), "--exp_name", "x"])
    assert result.returncode == 2, result.stderr
    assert f"{path} is a git-lfs pointer" in result.stderr and "--only networks --force" in result.stderr


def test_whole_files_pass_and_each_format_is_read(pack, tmp_path):
    for path in pack.rglob("*"):
        if path.is_file():
            assert file_problem(path) is None, path
    model = tmp_path / "model.pt"
    with zipfile.ZipFile(model, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00." * 1000)
    assert file_problem(model) is None
    model.write_bytes(model.read_bytes()[:-30])
    assert "is cut short or damaged" in file_problem(model)
    (tmp_path / "config.yaml").write_text("model:\n\tlayers: 2\n")
    assert "is not valid YAML" in file_problem(tmp_path / "config.yaml")
    (tmp_path / "config.json").write_text("[1, 2]")
    assert "not an object" in file_problem(tmp_path / "config.json")
    assert file_problem(tmp_path / "absent.safetensors") == "is missing"


def edit_header(path: Path, change) -> None:
    """Rewrite the JSON header of the safetensors file ``path`` with ``change(header)`` (data kept)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    change(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.unlink()
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + length :])


def first_tensor(header: dict, rank: int | None = None) -> dict:
    return next(
        entry
        for key, entry in header.items()
        if key != "__metadata__" and (rank is None or len(entry["shape"]) == rank and len(set(entry["shape"])) > 1)
    )


def rewrite(path: Path, data: bytes | str) -> None:
    path.unlink()
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


def edit_config(path: Path, change) -> None:
    config = json.loads(path.read_text())
    change(config)
    rewrite(path, json.dumps(config))


def swap_weights(root: Path) -> None:
    target = root / "image_proj" / "diffusion_pytorch_model.safetensors"
    target.unlink()
    shutil.copyfile(root / "audio_proj" / "diffusion_pytorch_model.safetensors", target)


def junk_pickle(root: Path) -> None:
    rewrite(root / "emotion2vec" / "model.pt", b"\x80" + os.urandom(4000))  # passes for a pickle by its first byte


def foreign_zip(root: Path) -> None:
    path = root / "emotion2vec" / "model.pt"
    path.unlink()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes/readme.txt", "not a checkpoint")


def yaml_without(root: Path) -> None:
    path = root / "emotion2vec" / "config.yaml"
    rewrite(path, path.read_text().replace("  embed_dim: 32\n", ""))


def torch_without_model(root: Path) -> None:
    import torch

    path = root / "emotion2vec" / "model.pt"
    path.unlink()
    torch.save({"cfg": {"embed_dim": 32}}, path)


DEEP_CASES = {
    # case: (damage, the file named, what is said of it, the fix)
    "swapped_network": (
        swap_weights,
        "image_proj/diffusion_pytorch_model.safetensors",
        "holds other weights",
        "networks",
    ),
    "dtype_name": (
        lambda root: edit_header(
            root / "vae/diffusion_pytorch_model.safetensors", lambda h: first_tensor(h).update(dtype="F33")
        ),
        "vae/diffusion_pytorch_model.safetensors",
        "has a tensor of an unknown dtype",
        "vae",
    ),
    "wrong_shape": (
        lambda root: edit_header(
            root / "diffusion_net/diffusion_pytorch_model.safetensors",
            lambda h: first_tensor(h, rank=2).update(shape=first_tensor(h, rank=2)["shape"][::-1]),
        ),
        "diffusion_net/diffusion_pytorch_model.safetensors",
        "does not fit config.json",
        "networks",
    ),
    "empty_config": (
        lambda root: rewrite(root / "reference_net/config.json", "{}"),
        "reference_net/config.json",
        "holds none of ReferenceNet's settings",
        "networks",
    ),
    "string_for_int": (
        lambda root: edit_config(root / "audio_proj/config.json", lambda c: c.update(blocks=str(c["blocks"]))),
        "audio_proj/config.json",
        'has blocks="',
        "networks",
    ),
    "wav2vec_string_for_int": (
        lambda root: edit_config(root / "wav2vec2/config.json", lambda c: c.update(hidden_size="large")),
        "wav2vec2/config.json",
        "does not describe a network that can be built",
        "wav2vec",
    ),
    "negative_latent_channels": (
        lambda root: edit_config(root / "vae/config.json", lambda c: c.update(latent_channels=-4)),
        "vae/config.json",
        "does not describe a network that can be built",
        "vae",
    ),
    "emotion2vec_junk": (junk_pickle, "emotion2vec/model.pt", "no PyTorch checkpoint", "emotion2vec"),
    "emotion2vec_foreign_zip": (foreign_zip, "emotion2vec/model.pt", "cannot be read", "emotion2vec"),
    "emotion2vec_no_state": (torch_without_model, "emotion2vec/model.pt", "no emotion2vec checkpoint", "emotion2vec"),
    "emotion2vec_yaml_keys": (yaml_without, "emotion2vec/config.yaml", "Missing key embed_dim", "emotion2vec"),
}


@pytest.mark.parametrize("case", DEEP_CASES)
def test_a_file_whose_structure_passes_but_does_not_load_is_one_line(pack, tmp_path, case):
    """issue 29: damaged files that pass the structure check (another network's weights, a bad dtype or shape
    in the header, wrong or wrong-typed config values, a pickle or zip that is no checkpoint, a config missing
    keys) are named before any model loads (emotion2vec too, checked with the others), exit 2."""
    damage_it, relative, problem, component = DEEP_CASES[case]
    root = linked_pack(pack, tmp_path / "pack")
    damage_it(root)
    out = tmp_path / "out"
    args = [a for a in FAST if not a.startswith("emotion=")]  # emotion=auto: emotion2vec is needed
    result = run(
        root, "--input_image", str(EXAMPLE_IMAGE), "--input_audio", str(EXAMPLE_AUDIO), "--output_dir", str(out), *args
    )
    line = assert_stopped_early(result, f"{root / relative} ", problem, f"--only {component} --force")
    assert "models: loaded" not in result.stderr and not out.exists(), line


@pytest.mark.parametrize(
    "name", ["reference_net", "diffusion_net", "image_proj", "audio_proj", "audio_emotion_classifier"]
)
def test_the_published_configs_and_weights_pass_the_checks(name):
    """The checks refuse nothing of the published checkpoint: its configs (the small networks' hold only their
    class name) fit the classes, and its tensors' names and shapes (recorded from the release) fit the networks
    those configs build."""
    import torch

    from memo.io.model_load import _weights_problem, config_type_problem
    from memo.models.emotion_classifier import AudioEmotionClassifierModel
    from memo.pipeline import NETWORKS

    cls = {**NETWORKS, "audio_emotion_classifier": AudioEmotionClassifierModel}[name]
    config = json.loads((PUBLISHED / f"{name}.config.json").read_text())
    assert config_type_problem(config, cls.__init__) is None
    with torch.device("meta"):
        network = cls.from_config(config)
    expected = {key: tensor.shape for key, tensor in network.state_dict().items()}
    published = json.loads((PUBLISHED / f"{name}.keys.json").read_text())["keys"]
    found = {key: ("F32", tuple(shape)) for key, shape in published.items()}
    assert _weights_problem(expected, found, "config.json", strict=False) is None
    assert _weights_problem(expected, found, "config.json", strict=True) is None


def test_the_load_boundary_names_a_failure_the_checks_cannot_see(pack, tmp_path):
    """A loader failing past every check (here: weights whose tensors all fit but one is missing, which
    diffusers would leave on the meta device) is still one DamagedModelError line naming the file."""
    from memo.io.model_files import DamagedModelError, ModelFolder
    from memo.io.model_load import load_model, pretrained_spec
    from memo.models.projections import AudioProjModel

    root = linked_pack(pack, tmp_path / "pack")
    weights = root / "audio_proj" / "diffusion_pytorch_model.safetensors"
    edit_header(
        weights, lambda h: h.update({f"renamed.{k}": h.pop(k) for k in [k for k in h if k != "__metadata__"][:1]})
    )
    spec = pretrained_spec(AudioProjModel, ModelFolder("model_name_or_path", "mine", root, ()), "audio_proj")
    with pytest.raises(DamagedModelError) as caught:
        load_model(spec)
    line = str(caught.value)
    assert "\n" not in line and f"{weights} cannot be loaded" in line and "lacks 1 of the network's tensors" in line


def test_finetune_resume_from_a_checkpoint_that_is_not_there_writes_nothing(pack, tmp_path):
    """issue 29: resume_from_checkpoint=<a name that is not there> is one line saying which checkpoints the run
    has, exit 2, and the run's folder is left as it was (no config.yaml, no logs/)."""
    runs = tmp_path / "runs"
    (runs / "x" / "checkpoint-2").mkdir(parents=True)
    config = tmp_path / "finetune.yaml"
    config.write_text(
        f"model_name_or_path: {pack}\nvae: {pack / 'vae'}\nreport_to: none\noutput_dir: {runs}\n"
        f"data:\n  data_dirs: [{tmp_path / 'nodata'}]\n"
    )
    program = load_program("finetune.py").main
    result = run_main(program, ["--config", str(config), "--exp_name", "x", "resume_from_checkpoint=checkpoint-7"])
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "resume_from_checkpoint=checkpoint-7: no such checkpoint" in errors[0], result.stderr
    assert "the run's checkpoints: checkpoint-2" in errors[0]
    assert sorted(p.name for p in (runs / "x").iterdir()) == ["checkpoint-2"]


@pytest.mark.e2e
def test_damaged_weights_stop_the_whole_program_in_one_line_e2e(pack, tmp_path):
    """inference.py as a user runs it, on a pack whose image_proj weights are another network's: exit 2, one
    ``error:`` line naming the file and the download command, no model loaded, nothing written."""
    root = linked_pack(pack, tmp_path / "pack")
    swap_weights(root)
    out = tmp_path / "out"
    result = run_program(
        root, "--input_image", str(EXAMPLE_IMAGE), "--input_audio", str(EXAMPLE_AUDIO), "--output_dir", str(out), *FAST
    )
    assert_stopped_early(
        result, str(root / "image_proj" / "diffusion_pytorch_model.safetensors"), "holds other weights", "--force"
    )
    assert not out.exists()
