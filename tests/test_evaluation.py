"""memo.evaluation and scripts/evaluate.py on tiny stand-ins of the metric networks (memo/tiny/metric_models.py)
and inputs made here: known answers of FID, FVD, SyncNet and CSIM, the bad-input lines, the feature cache, and
the documented loop make_eval_set -> batch_inference -> evaluate end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_main
from PIL import Image
from scipy.ndimage import gaussian_filter

from memo.evaluation import metrics as m
from memo.evaluation.command import main as evaluation_main
from memo.evaluation.models import INCEPTION, MetricModels
from memo.evaluation.run import score_frames
from memo.io import hub
from memo.io.audio import audio_from_samples
from memo.io.hub import METRIC_MODELS, MissingModelError, default_metric_models_dir, download_metric_models
from memo.io.video_writer import VideoWriter
from memo.tiny.face_models import write_tiny_face_models
from memo.tiny.metric_models import BRIGHT_LEVEL, LOUD_RMS, write_tiny_metric_models

FPS = 25
FRAME = 640  # audio samples per video frame at 16 kHz and 25 fps


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> MetricModels:
    """A model folder with the tiny metric networks and face models, as the tiny pack lays them out."""
    root = tmp_path_factory.mktemp("metric_models")
    write_tiny_metric_models(root / "metrics")
    write_tiny_face_models(root / "misc" / "face_analysis" / "models")
    return MetricModels(root)


@pytest.fixture(scope="module", params=["tiny", "published"])
def any_models(request, models) -> MetricModels:
    """The tiny stand-ins, and the published metric networks where this machine has them (the default folder of
    ``scripts/download_models.py --metrics``; skipped otherwise): known answers hold for both."""
    if request.param == "tiny":
        return models
    root = default_metric_models_dir()
    missing = [model.file for model in METRIC_MODELS.values() if not (root / "metrics" / model.file).is_file()]
    if missing:
        pytest.skip(f"the published metric networks are not in {root / 'metrics'} ({', '.join(missing)})")
    return MetricModels(root)


def textures(count: int, size: int, seed: int) -> np.ndarray:
    """(count, size, size, 3) uint8 smooth random images (blurred noise, so blur and noise change them)."""
    rng = np.random.default_rng(seed)
    noise = gaussian_filter(rng.normal(0, 1, (count, size, size, 3)), sigma=(0, 2, 2, 0))
    return np.clip(128 + noise / noise.std() * 50, 0, 255).astype(np.uint8)


def noisy(images: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)


def blurred(images: np.ndarray, sigma: float) -> np.ndarray:
    axes = (0,) * (images.ndim - 3) + (sigma, sigma, 0)
    return gaussian_filter(images.astype(np.float32), sigma=axes).round().astype(np.uint8)


@pytest.mark.slow
def test_fid_is_zero_for_a_set_against_itself_and_grows_with_noise_and_blur(any_models):
    images = textures(6, 64, seed=0)
    net = any_models.inception()
    reference = m.inception_features(net, images)
    itself = m.fid(reference, reference)  # float error of eigenvalues of a rank-5 2048x2048 product
    assert abs(itself) < 1e-5 * np.trace(np.cov(reference, rowvar=False))
    by_noise = [m.fid(m.inception_features(net, noisy(images, s)), reference) for s in (10, 60)]
    by_blur = [m.fid(m.inception_features(net, blurred(images, s)), reference) for s in (1, 4)]
    assert 100 * abs(itself) < by_noise[0] < by_noise[1], by_noise
    assert 0 < by_blur[0] < by_blur[1], by_blur


@pytest.mark.slow
def test_fid_equals_torch_fidelity_called_directly(models, tmp_path):
    import torch_fidelity

    sets = {"a": textures(5, 48, seed=3), "b": noisy(textures(5, 48, seed=4), 20)}
    for name, images in sets.items():
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / name / f"{i}.png")
    theirs = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "a"),
        input2=str(tmp_path / "b"),
        fid=True,
        cuda=False,
        cache=False,
        verbose=False,
        feature_extractor_weights_path=str(models.root / "metrics" / INCEPTION.file),
    )["frechet_inception_distance"]
    net = models.inception()
    ours = m.fid(m.inception_features(net, sets["a"]), m.inception_features(net, sets["b"]))
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert ours > 0


def test_fvd_is_zero_for_a_set_against_itself_and_grows_with_noise_and_blur(any_models):
    clips = textures(2 * m.FVD_CLIP_FRAMES, 32, seed=5).reshape(2, m.FVD_CLIP_FRAMES, 32, 32, 3)
    net = any_models.i3d()
    reference = m.i3d_features(net, clips)
    assert reference.shape == (2, 400)
    itself = m.fvd(reference, reference)
    assert abs(itself) < 1e-5 * float(np.square(reference).sum())
    by_noise = [m.fvd(m.i3d_features(net, noisy(clips, s)), reference) for s in (10, 60)]
    assert 100 * abs(itself) < by_noise[0] < by_noise[1], by_noise
    by_blur = [m.fvd(m.i3d_features(net, blurred(clips, s)), reference) for s in (1, 4)]
    assert 100 * abs(itself) < by_blur[0] < by_blur[1], by_blur


def talking_clip(loud: np.ndarray, seed: int, size: int = 64) -> np.ndarray:
    """Frames whose brightness follows ``loud`` (True: above the SyncNet stand-in's BRIGHT_LEVEL), textured
    all over so the tiny face detector finds its face."""
    rng = np.random.default_rng(seed)
    level = np.where(loud, BRIGHT_LEVEL + 100, BRIGHT_LEVEL - 55)
    texture = rng.integers(-30, 31, (len(loud), size, size, 3))  # survives H.264 as texture
    return np.clip(level[:, None, None, None] + texture, 0, 255).astype(np.uint8)


def voice(loud: np.ndarray, seed: int, lead: int = 0) -> np.ndarray:
    """16 kHz noise, loud (1.5 x LOUD_RMS) in the frames where ``loud`` is True ``lead`` frames later, else quiet
    (LOUD_RMS / 2, so that the 5 ms of a loud frame an MFCC window reaches into does not make it loud): the
    sound comes ``lead`` frames before the picture."""
    rng = np.random.default_rng(seed)
    shifted = np.roll(loud, -lead)
    rms = np.repeat(np.where(shifted, 1.5 * LOUD_RMS, LOUD_RMS / 2), FRAME)
    return (rng.standard_normal(len(shifted) * FRAME) * rms).astype(np.float32)


def runs(count: int, seed: int) -> np.ndarray:
    """A random loud/quiet pattern over ``count`` frames."""
    return np.random.default_rng(seed).integers(0, 2, count).astype(bool)


def test_syncnet_offset_is_the_audio_shift_and_confidence_drops_for_another_voice(models):
    loud = runs(50, seed=6)
    frames = talking_clip(loud, seed=7)
    _, boxes = m.face_embeddings(models.faces(), frames)
    assert not np.isnan(boxes).any()
    net = models.syncnet()
    lip = m.lip_embeddings(net, m.face_crops(frames, boxes))
    results = {}
    for lead in (0, 3, -2, 6):
        audio = m.audio_embeddings(net, m.mfcc(voice(loud, seed=8, lead=lead)), len(lip))
        results[lead] = m.sync_scores(lip, audio)
        assert results[lead].offset == lead, (lead, results[lead])
    other = m.sync_scores(lip, m.audio_embeddings(net, m.mfcc(voice(runs(50, seed=9), seed=10)), len(lip)))
    assert other.confidence < results[0].confidence / 2, (other, results[0])
    assert other.distance > results[0].distance


def test_csim_is_one_for_the_same_face_and_lower_for_another(models):
    face, other = textures(1, 64, seed=11), textures(1, 64, seed=12)
    analyzer = models.faces()
    (same,), _ = m.face_embeddings(analyzer, face)
    frames_same, _ = m.face_embeddings(analyzer, np.repeat(face, 3, axis=0))
    frames_other, _ = m.face_embeddings(analyzer, np.repeat(other, 3, axis=0))
    assert m.csim(same, frames_same) == pytest.approx(1.0, abs=1e-6)
    assert m.csim(same, frames_other) < 0.99


@pytest.mark.slow
def test_score_frames_gives_measure_fidelity_the_paper_figures_with_sync_on_the_sound(models):
    """scripts/measure_fidelity.py's figures: in sync with the sound shifted by 4 frames, offset 4; the frames
    against themselves FID 0; a frozen face: CSIM 1, motion 0 (within float error)."""
    loud = runs(40, seed=16)
    frames = talking_clip(loud, seed=17)
    ours = score_frames(frames, frames, models, FPS, voice(loud, seed=18, lead=4))
    assert set(ours) == {"fid", "fvd", "csim", "motion", "sync_c", "sync_d", "sync_offset"}
    assert ours["sync_offset"] == 4 and ours["sync_c"] > 0.2
    assert abs(ours["fid"]) < 1e-3 and abs(ours["fvd"]) < 1e-3
    assert ours["motion"] > 0
    frozen = score_frames(np.repeat(frames[:1], len(frames), axis=0), frames, models, FPS)
    assert frozen["motion"] < 1e-5 * ours["motion"] and frozen["csim"] == pytest.approx(1.0, abs=1e-6)
    assert frozen["fid"] > 100 * abs(ours["fid"]) and "sync_c" not in frozen  # no sound given


def test_download_metric_models_fetches_the_missing_files_and_says_one_line_offline(tmp_path, monkeypatch):
    """The registry's metric rows through the real download code, from file:// addresses standing in for theirs."""
    published = tmp_path / "published"
    published.mkdir()
    rows = {}
    for name, model in METRIC_MODELS.items():
        (published / model.file).write_bytes(name.encode() * 1000)
        rows[name] = dataclasses.replace(model, url=(published / model.file).as_uri())
    monkeypatch.setattr(hub, "METRIC_MODELS", rows)
    target = tmp_path / "models"
    monkeypatch.setattr(hub, "hub_offline", lambda: True)
    with pytest.raises(MissingModelError, match="HF_HUB_OFFLINE is set"):
        download_metric_models(target)
    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    (target / "metrics").mkdir(parents=True)
    (target / "metrics" / rows["i3d"].file).write_bytes(b"kept")  # already there: not fetched again
    paths = download_metric_models(target)
    assert [p.name for p in paths] == [model.file for model in rows.values()]
    assert (target / "metrics" / rows["syncnet"].file).read_bytes() == b"syncnet" * 1000
    assert (target / "metrics" / rows["i3d"].file).read_bytes() == b"kept"
    assert sorted(p.name for p in (target / "metrics").iterdir()) == sorted(m.file for m in rows.values())
    monkeypatch.setattr(hub, "METRIC_MODELS", {"gone": dataclasses.replace(rows["i3d"], file="x", url="file:///nope")})
    with pytest.raises(MissingModelError, match="the download from file:///nope failed"):
        download_metric_models(target)
    assert not [p for p in (target / "metrics").iterdir() if p.name.endswith(".partial")]


def write_video(path: Path, frames: np.ndarray, fps: float, audio: np.ndarray | None) -> None:
    track = None if audio is None else audio_from_samples(audio, 16000, name=path.name)
    height, width = frames.shape[1:3]
    with VideoWriter(path, fps, width, height, audio=track) as writer:
        writer.write(frames)


def evaluate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """scripts/evaluate.py's command line (its ``main``), in this process; the e2e test starts the script."""
    return run_main(evaluation_main, list(args), cwd=cwd)


def test_bad_inputs_are_one_line_each_the_rest_is_scored_and_a_rerun_reuses_features(models, tmp_path, monkeypatch):
    """... and the features are kept in the project's cache (``$XDG_CACHE_HOME/memo/features``), not beside
    the report."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gen, ref = tmp_path / "generated", tmp_path / "reference"
    gen.mkdir()
    ref.mkdir()
    loud = runs(40, seed=13)
    frames = talking_clip(loud, seed=14)
    write_video(ref / "good.mp4", frames, FPS, voice(loud, seed=15))
    write_video(gen / "good.mp4", frames, FPS, voice(loud, seed=15, lead=3))
    write_video(gen / "unpaired.mp4", frames, FPS, voice(loud, seed=15))
    write_video(ref / "rate.mp4", frames, FPS, voice(loud, seed=15))
    write_video(gen / "rate.mp4", frames, 30, voice(loud, seed=15))
    write_video(ref / "short.mp4", frames, FPS, voice(loud, seed=15))
    write_video(gen / "short.mp4", frames[:30], FPS, voice(loud[:30], seed=15))
    write_video(ref / "mute.mp4", frames, FPS, None)
    write_video(gen / "mute.mp4", frames, FPS, None)
    write_video(ref / "broken.mp4", frames, FPS, voice(loud, seed=15))
    (gen / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    args = ["--generated", str(gen), "--reference", str(ref), "--metrics", "sync", "csim", "motion"]
    args += ["--models", str(models.root), "--out", str(tmp_path / "report.json")]
    run = evaluate(*args, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 4, run.stderr
    for name, words in (("unpaired", "no reference"), ("rate", "30 fps"), ("mute", "no sound"), ("broken", "cannot")):
        assert any(line.startswith(f"error: {name}.mp4:") and words in line for line in errors), (name, errors)
    report = json.loads((tmp_path / "report.json").read_text())
    good = report["videos"]["good"]
    assert good["sync_offset"] == 3 and good["sync_c"] > 0.2
    assert 0.5 < good["csim"] < 1  # the frames' brightness and texture change; the portrait is frame 0
    assert good["motion"] > 0
    assert report["videos"]["mute"]["csim"] == pytest.approx(good["csim"], abs=1e-3)  # scored, but for Sync
    (warning,) = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    assert warning.startswith("warning: short.mp4: 30 frames, the reference 40")
    assert report["videos"]["short"]["sync_offset"] == 0 and report["videos"]["short"]["frames"] == 30
    assert set(report["set"]) >= {"sync_c", "sync_d", "sync_offset", "csim", "motion"}
    assert "| good |" in (tmp_path / "report.md").read_text()
    # good, short: 2 shapes, faces, portrait, lip, audio, motion; mute: 2 shapes, faces, portrait, motion; rate: 2
    assert "features: 21 computed, 0 from the cache" in run.stderr, run.stderr
    assert len(list((tmp_path / "cache" / "memo" / "features").glob("*.npz"))) == 21
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "cache",
        "generated",
        "reference",
        "report.json",
        "report.md",
    ]

    (gen / "unpaired.mp4").unlink()
    (gen / "broken.mp4").unlink()
    (gen / "rate.mp4").unlink()
    write_video(gen / "rate.mp4", frames, FPS, voice(loud, seed=15))
    rerun = evaluate(*args, "--overwrite", cwd=tmp_path)
    assert "error: mute.mp4:" in rerun.stderr and rerun.returncode == 2
    # only the new rate.mp4's own features are computed; its reference's shape and the others' come from the cache
    assert "features: 6 computed, 20 from the cache" in rerun.stderr, rerun.stderr


def test_a_missing_metric_model_is_one_line_with_the_download_command(tmp_path):
    (tmp_path / "gen").mkdir()
    (tmp_path / "ref").mkdir()
    write_video(tmp_path / "gen" / "a.mp4", textures(8, 32, seed=0), FPS, None)
    run = evaluate("--generated", "gen", "--reference", "ref", "--metrics", "fid", "--models", "empty", cwd=tmp_path)
    assert run.returncode == 2
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("error: ") and "scripts/download_models.py --metrics empty" in line
    assert "curl -L -o" in line and INCEPTION.url in line and INCEPTION.licence in line
    assert not (tmp_path / "report.json").exists()


@pytest.mark.e2e
def test_make_eval_set_batch_inference_evaluate_loop(pack, tmp_path):
    """The loop of docs/evaluation.md on the tiny pack, on two talking-head mp4s made here."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        loud = runs(40, seed=20 + i)
        write_video(videos / f"speaker{i}.mp4", talking_clip(loud, seed=30 + i, size=96), FPS, voice(loud, seed=40 + i))
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true", "XDG_CACHE_HOME": str(tmp_path)}

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(REPO / "scripts" / script), *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1800)

    made = run("make_eval_set.py", str(videos), "set", "--size", "64")
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in (tmp_path / "set" / "reference").iterdir()) == [
        "speaker0.mp4",
        "speaker0.png",
        "speaker1.mp4",
        "speaker1.png",
    ]
    rendered = run(
        "batch_inference.py",
        "--manifest",
        "set/manifest.csv",
        "--output_dir",
        "generated",
        "--config",
        str(pack / "inference.yaml"),
        "inference_steps=1",
    )
    assert rendered.returncode == 0, rendered.stderr
    scored = run(
        "evaluate.py",
        "--generated",
        "generated",
        "--reference",
        "set/reference",
        "--audio",
        "set/audio",
        "--metrics",
        "fid",
        "fvd",
        "sync",
        "csim",
        "motion",
        "--models",
        str(pack),
        "--out",
        "report.json",
    )
    assert scored.returncode == 0, scored.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert sorted(report["videos"]) == ["speaker0", "speaker1"]
    for figures in (*report["videos"].values(), report["set"]):
        assert set(figures) >= {"fid", "fvd", "sync_c", "sync_d", "sync_offset", "csim", "motion"}
        assert all(figures[key] is not None and np.isfinite(figures[key]) for key in ("fid", "fvd", "csim"))
    assert "| **set** (2) |" in scored.stdout


def test_missing_face_models_name_every_metric_that_needs_them_and_the_download(tmp_path, monkeypatch):
    """``--metrics motion`` alone needs the face models too: the message says which metrics use them and how to
    get them (evaluate.py takes --models, not key=value)."""
    import memo.evaluation.models as metric_models
    from memo.io.hub import DOWNLOAD_COMMAND, MissingModelError

    def not_cached(*_args, **_kwargs):
        raise MissingModelError("not in the cache (model_name_or_path=DIR as key=value)")

    monkeypatch.setattr(metric_models, "resolve_model_dir", not_cached)
    with pytest.raises(MissingModelError) as caught:
        metric_models.MetricModels(tmp_path).face_dir()
    message = str(caught.value)
    assert "motion" in message and "CSIM" in message and DOWNLOAD_COMMAND in message and "--models" in message
    assert "key=value" not in message and str(tmp_path) in message
