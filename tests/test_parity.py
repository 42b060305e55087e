"""Parity with the original implementation (the contract of ../shared/reference/README.md).

Every case directory under MEMO_REFERENCE_CASES (default ../shared/reference/cases) is run in float32 on
CPU with the checkpoint at MEMO_REFERENCE_CHECKPOINT (default ../shared/reference/checkpoint).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REFERENCE_CASES
from safetensors.torch import load_file

from memo.conditions.audio_features import Wav2VecAudioEncoder
from memo.models.emotion_classifier import AudioEmotionClassifierModel

CASES = sorted(p for p in REFERENCE_CASES.iterdir() if (p / "case.json").is_file()) if REFERENCE_CASES.is_dir() else []


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours.double() - expected.double()).norm() / expected.double().norm())


@pytest.fixture(scope="module")
def audio_encoder(tiny_checkpoint):
    return Wav2VecAudioEncoder.from_pretrained(tiny_checkpoint / "wav2vec2")


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint):
    return AudioEmotionClassifierModel.from_pretrained(tiny_checkpoint / "misc/audio_emotion_classifier")


@pytest.mark.skipif(not CASES, reason=f"no reference cases under {REFERENCE_CASES}")
@pytest.mark.parametrize("case_dir", CASES, ids=[p.name for p in CASES])
def test_matches_original(case_dir, tiny_pipeline, audio_encoder, classifier):
    case = json.loads((case_dir / "case.json").read_text())
    inputs = load_file(case_dir / "inputs.safetensors")
    expected = load_file(case_dir / "expected.safetensors")
    pipe = tiny_pipeline
    fpc = case["frames_per_clip"]

    pipe.scheduler.set_timesteps(case["inference_steps"])
    torch.testing.assert_close(pipe.scheduler.timesteps, torch.tensor(case["scheduler_timesteps"]))
    torch.testing.assert_close(pipe.scheduler.sigmas, torch.tensor(case["scheduler_sigmas"]))

    features = audio_encoder(inputs["waveform_16k"], case["fps"], fpc)
    assert features.num_frames == case["audio_frames"]
    assert features.windows.shape[0] == case["clips"] * fpc
    assert relative_error(features.windows, expected["audio_emb"]) <= 1e-4

    with torch.no_grad():
        image_tokens = pipe.image_proj(inputs["face_emb"])
        audio_tokens = pipe.audio_proj(expected["audio_emb"][:fpc][None])
        probs = classifier(inputs["emotion_features"])
    assert relative_error(image_tokens, expected["image_proj"]) <= 1e-4
    assert relative_error(audio_tokens, expected["audio_proj_clip0"]) <= 1e-4
    assert relative_error(probs, expected["emotion_probs"]) <= 1e-4

    first = {}

    def keep_first_prediction(pipeline, clip, step, timestep, tensors):
        if clip == 0 and step == 0:
            first["noise_pred"] = tensors["noise_pred"].clone()

    assert inputs["ref_image"].shape[-2:] == (case["height"], case["width"])
    video = pipe(
        inputs["ref_image"],
        inputs["face_emb"],
        features.windows,
        inputs["emotion_labels"],
        num_frames=features.num_frames,
        frames_per_clip=fpc,
        past_frames=case["past_frames"],
        num_inference_steps=case["inference_steps"],
        guidance_scale=case["cfg_scale"],
        latents=inputs["noise"],
        callback_on_step_end=keep_first_prediction,
    ).frames
    assert relative_error(first["noise_pred"], expected["first_noise_pred"]) <= 1e-4
    assert video.shape == expected["video"].shape
    assert video.shape[1] == case["audio_frames"]
    assert relative_error(video, expected["video"]) <= 1e-3
