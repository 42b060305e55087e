"""FLOPs of one clip and of its audio features, counted with PyTorch's FLOP counter, for any speed settings.

Every network call a clip makes is run once under ``torch.utils.flop_counter.FlopCounterMode`` (the VAE
encoding the reference image and past frames, the audio projection, the reference net, the diffusion net
in each kind of step: whole with the memory update, whole, outer layers only, each with the batch the step
runs), and the counts are summed over the clip's step plan (``speed.plan_steps``, the plan the pipeline
follows). On the ``meta`` device this costs no memory and no time, so the full-size networks can be counted
at any resolution. The counter counts matrix multiplications, convolutions and attention (2 FLOPs per
multiply-add); norms and element-wise work are not counted (a few percent at most).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from memo.conditions.audio_features import Wav2VecAudioEncoder
from memo.models.conditions import DiffusionConditions
from memo.models.temporal_memory import TemporalMemory
from memo.pipeline import MemoPipeline
from memo.sampling.conditioning import encode_frames
from memo.sampling.deep_cache import apply_deep_cache
from memo.sampling.guidance import ClassifierFreeGuidance, StepPlan, plan_steps
from memo.sampling.speed import SpeedSettings


def _count(fn) -> tuple[int, object]:
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result


@dataclass
class ClipFlops:
    """FLOPs of one clip by part; ``per_frame`` divides the total by the clip's frames.

    ``vae_encode``: the reference image and past frames; ``vae_decode``: the clip's frames; ``projections``:
    the audio projection of the clip's window; ``reference_net``: its pass over both guidance halves;
    ``denoising``: every diffusion-net call of the clip's step plan.
    """

    vae_encode: int
    vae_decode: int
    projections: int
    reference_net: int
    denoising: int
    frames: int

    @property
    def vae_and_projections(self) -> int:
        return self.vae_encode + self.vae_decode + self.projections

    @property
    def total(self) -> int:
        return self.vae_and_projections + self.reference_net + self.denoising

    @property
    def per_frame(self) -> float:
        return self.total / self.frames


@torch.no_grad()
def clip_flops(
    pipe: MemoPipeline,
    speed: SpeedSettings,
    height: int,
    width: int,
    guidance_scale: float = 3.5,
    frames_per_clip: int = 16,
    past_frames: int = 16,
) -> ClipFlops:
    """The FLOPs of one (later) clip of ``pipe`` at ``height`` x ``width`` pixels with ``speed``.

    The pipeline's networks may live on any device, ``meta`` included; inputs are made there.
    """
    device = pipe.diffusion_net.device
    dtype = pipe.diffusion_net.dtype
    plan = plan_steps(speed.steps, guidance_scale > 1.0, speed.guidance_window, speed.deep_cache_interval)
    batch = 2 if any(step.batched for step in plan) else 1
    h, w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    tokens_dim = pipe.diffusion_net.config.cross_attention_dim
    audio_proj = pipe.audio_proj.config

    def make(*shape, dtype=dtype):
        return torch.randn(*shape, device=device, dtype=dtype)

    encode, _ = _count(
        lambda: encode_frames(pipe.vae, make(1 + past_frames, 3, height, width, dtype=pipe.vae.dtype), 64, device)
    )
    decode, _ = _count(lambda: pipe.decode_latents(make(frames_per_clip, 4, h, w, dtype=pipe.vae.dtype), 64))
    audio_window = make(1, frames_per_clip, audio_proj.seq_len, audio_proj.blocks, audio_proj.channels)
    projections, audio_tokens = _count(lambda: pipe.audio_proj(audio_window))
    image_tokens = make(batch, pipe.image_proj.config.clip_extra_context_tokens, tokens_dim)
    latents = make(batch * (1 + past_frames), 4, h, w)
    context = image_tokens.repeat(1 + past_frames, 1, 1)
    reference_flops, reference = _count(lambda: pipe.reference_net(latents, 0.0, context))

    audio = audio_tokens.repeat(batch, 1, 1, 1).to(dtype)
    emotion = torch.zeros(batch, dtype=torch.long, device=device)
    drop = (True, False) if batch == 2 else None
    conditions = DiffusionConditions(reference, image_tokens, audio, emotion, TemporalMemory(), drop)
    guider = ClassifierFreeGuidance(guidance_scale, *speed.guidance_window)
    latents = make(1, 4, frames_per_clip, h, w)
    net = pipe.diffusion_net
    kinds: dict[tuple[bool, bool, bool], int] = {}

    def step(todo: StepPlan, update: bool) -> int:
        """The FLOPs of one step of this kind, counted at its first occurrence (with the guider's own call and
        the deep-cache hook choosing the pass, as in the pipeline)."""
        key = (todo.batched, todo.whole, update)
        if key not in kinds:
            kinds[key], _ = _count(lambda: guider.predict(net, latents, 500.0, conditions.with_update(update), todo))
        return kinds[key]

    hook = apply_deep_cache(net)
    hook.configure([todo.whole for todo in plan], lambda: current)
    try:
        denoising = 0
        for current, todo in enumerate(plan):
            denoising += step(todo, update=current == 0)
    finally:
        hook.configure(None)
    return ClipFlops(encode, decode, projections, reference_flops, denoising, frames_per_clip)


@torch.no_grad()
def audio_features_flops(encoder: Wav2VecAudioEncoder, waveform: torch.Tensor, fps: float, frames_per_clip: int) -> int:
    """The FLOPs of extracting the audio features of ``waveform`` (samples at 16 kHz) for video at ``fps``:
    one real call of ``encoder`` (wav2vec2 and the resampling to frames), on the device it lives on."""
    flops, _ = _count(lambda: encoder(waveform, fps, frames_per_clip))
    return flops
