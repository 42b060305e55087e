"""wav2vec2 features: exact chunked convolutions, bounded-context transformer chunks, per-clip windows."""

from __future__ import annotations

import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from memo.conditions.audio_features import Wav2VecAudioEncoder, frame_windows, video_frame_count


@pytest.fixture(scope="module", params=["group", "layer"])
def encoder(request):
    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm=request.param,
    )
    return Wav2VecAudioEncoder(Wav2Vec2Model(config), Wav2Vec2FeatureExtractor())


@pytest.mark.parametrize("samples", [16000, 16123, 144077])
def test_chunked_convolutions_equal_the_whole_sequence(encoder, samples):
    waveform = torch.randn(samples)
    with torch.no_grad():
        whole = encoder.model.feature_extractor(waveform[None]).transpose(1, 2)[0]
    chunked = encoder.conv_features(waveform, chunk_frames=37)
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


def test_long_audio_is_encoded_in_chunks_with_context(encoder):
    waveform = torch.randn(16000 * 12)
    encoder.chunk_seconds, encoder.context_seconds = 1e9, 2.0
    whole = encoder(waveform, fps=25, frames_per_clip=16)
    encoder.chunk_seconds = 3.0
    chunked = encoder(waveform, fps=25, frames_per_clip=16)
    encoder.chunk_seconds = 60.0
    assert chunked.hidden.shape == whole.hidden.shape == (304, 2, 32)
    assert float((chunked.hidden - whole.hidden).norm() / whole.hidden.norm()) < 5e-3


def test_frames_windows_and_padding(encoder):
    features = encoder(torch.randn(13866), fps=30, frames_per_clip=16)
    assert features.num_frames == video_frame_count(13866, 30) == 26
    assert len(features) == 32
    windows = features[16:32]
    assert windows.shape == (16, 5, 2, 32)
    torch.testing.assert_close(windows, features.windows[16:32])
    torch.testing.assert_close(windows[-1, 3], features.hidden[31])  # clamped at the end
    torch.testing.assert_close(frame_windows(features.hidden)[0, 0], features.hidden[0])
