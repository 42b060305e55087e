"""MemoPipeline: from a reference image, a face embedding, audio features and emotion labels to video frames.

The video is generated clip by clip. Each clip conditions on the reference image and the last frames
generated so far (the reference image itself for the first clip): they are VAE-encoded, run once through
the reference net, and denoised against with flow-matching Euler steps and classifier-free guidance (or,
opt-in, with fewer or cheaper steps: ``sampling/speed.py``). The temporal memory of past frames is carried from
clip to clip; finished clips are decoded in batches and can be handed to a callback as they come, so that
a long video never needs to be held whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from memo.conditions.audio_features import AudioFeatures
from memo.constants import NUM_EMOTIONS
from memo.io.hub import CHECKPOINT_VAE_FOLDER, MEMO_REPO, NETWORK_FOLDERS, VAE_FILES, VAE_REPO, resolve_model_dir
from memo.models.diffusion_net import DiffusionNet
from memo.models.projections import AudioProjModel, ImageProjModel
from memo.models.reference_net import ReferenceNet
from memo.models.temporal_memory import TemporalMemory
from memo.runtime.memory import new_memory, vae_frames
from memo.runtime.parallel import GuidanceParallel
from memo.sampling.deep_cache import DeepFeatureCache
from memo.sampling.guidance import ClipConditions, combine_guidance
from memo.sampling.solvers import flow_scheduler
from memo.sampling.speed import SOLVERS, StepPlan, plan_steps

NETWORKS = dict(zip(NETWORK_FOLDERS, (ReferenceNet, DiffusionNet, ImageProjModel, AudioProjModel)))
"""Each network's folder in a checkpoint (memo.io.hub.NETWORK_FOLDERS) and its class."""

ClipCallback = Callable[["MemoPipeline", int, torch.Tensor], None]
StepCallback = Callable[["MemoPipeline", int, int, torch.Tensor, dict], dict | None]


@dataclass
class MemoPipelineOutput(BaseOutput):
    """``frames``: (3, num_frames, H, W) in [0, 1] (a tensor, or an array for ``output_type="np"``), or None
    when the frames were only handed to ``callback_on_clip_end``."""

    frames: torch.Tensor | np.ndarray | None


@dataclass
class ClipState:
    """What one clip carries through its denoising steps.

    Attributes:
        index: the clip's position in the video, from 0.
        latents: (1, C, frames, h, w) the clip's latents, noise at first.
        conditions: the diffusion net's conditions for the clip, both guidance halves when guided; its
            ``memory`` is the temporal memory shared by the clips.
        deep_cache: the deep features of the clip's last whole step, or None without the cache.
    """

    index: int
    latents: torch.Tensor
    conditions: ClipConditions
    deep_cache: DeepFeatureCache | None = None
    _conditional: ClipConditions | None = field(default=None, repr=False)

    def conditions_for(self, batched: bool) -> ClipConditions:
        """The conditions of a step: all items for a batched step (or an unguided clip), else the
        conditional half, made at its first use (after step 0, which is batched, has written the memory)."""
        if batched or self.conditions.batch == 1:
            return self.conditions
        if self._conditional is None:
            self._conditional = self.conditions.conditional_half()
        return self._conditional


def clip_emotion(labels: torch.Tensor) -> int:
    """The emotion of a clip: the most frequent per-frame label, the smallest label on a tie."""
    return int(torch.bincount(labels.reshape(-1).long(), minlength=NUM_EMOTIONS).argmax())


class MemoPipeline(DiffusionPipeline):
    """Generate a talking video with MEMO.

    Components: ``vae`` (AutoencoderKL), ``reference_net``, ``diffusion_net``, ``image_proj``, ``audio_proj``
    and a ``scheduler`` (FlowMatchEulerDiscreteScheduler).
    """

    model_cpu_offload_seq = "image_proj->audio_proj->reference_net->diffusion_net->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        reference_net: ReferenceNet,
        diffusion_net: DiffusionNet,
        image_proj: ImageProjModel,
        audio_proj: AudioProjModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            reference_net=reference_net,
            diffusion_net=diffusion_net,
            image_proj=image_proj,
            audio_proj=audio_proj,
            scheduler=scheduler,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_checkpoint(
        cls,
        model: str | os.PathLike = MEMO_REPO,
        vae: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        **hub_kwargs,
    ) -> MemoPipeline:
        """Load the networks from a MEMO checkpoint in the published layout (a directory or a hub repo id).

        The VAE comes from ``vae``, else from the checkpoint's own ``vae/`` folder when it has one, else
        from the registry's VAE (``memo.io.hub.VAE_REPO``). Only the files needed are fetched; raises
        :class:`memo.io.hub.MissingModelError` when they cannot be had.
        """
        patterns = [f"{name}/*" for name in NETWORKS] + [f"{CHECKPOINT_VAE_FOLDER}/*"]
        root = resolve_model_dir(model, patterns, setting="model", **hub_kwargs)
        if vae is None:
            vae = root / CHECKPOINT_VAE_FOLDER if (root / CHECKPOINT_VAE_FOLDER).is_dir() else VAE_REPO
        vae_dir = resolve_model_dir(vae, list(VAE_FILES), setting="vae", **hub_kwargs)
        networks = {
            name: network.from_pretrained(Path(root) / name, torch_dtype=torch_dtype)
            for name, network in NETWORKS.items()
        }
        return cls(
            vae=AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch_dtype),
            scheduler=FlowMatchEulerDiscreteScheduler(),
            **networks,
        )

    # -- pieces of the clip loop -------------------------------------------------------------------

    def encode_frames(self, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8) scaled latent means, ``batch_size`` frames at a time."""
        vae, device = self.vae, self._execution_device  # with offload hooks the VAE's weights may wait on the CPU
        latents = [vae.encode(chunk.to(device, vae.dtype)).latent_dist.mean for chunk in pixels.split(batch_size)]
        return torch.cat(latents) * vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(N, 4, h, w) scaled latents -> (N, 3, H, W) frames in [0, 1], ``batch_size`` frames at a time."""
        vae, device = self.vae, self._execution_device
        frames = [
            vae.decode(chunk.to(device, vae.dtype) / vae.config.scaling_factor).sample
            for chunk in latents.split(batch_size)
        ]
        return (torch.cat(frames).float() / 2 + 0.5).clamp(0, 1)

    def use_vae_tiles(self, size: int) -> None:
        """Encode and decode frames wider or taller than ``size`` pixels in overlapping tiles of ``size`` x
        ``size`` (diffusers' AutoencoderKL tiling: a quarter of overlap, blended), so that VAE memory stays
        bounded at any resolution; 0 turns tiling off. Frames no larger than ``size`` go through untouched."""
        if size <= 0:
            self.vae.disable_tiling()
            return
        self.vae.enable_tiling()
        # AutoencoderKL takes its tile size from these two attributes (set from config.sample_size at init).
        self.vae.tile_sample_min_size = size
        self.vae.tile_latent_min_size = size // self.vae_scale_factor

    def check_inputs(
        self,
        reference_image: torch.Tensor,
        face_embedding: torch.Tensor,
        audio_features: torch.Tensor | AudioFeatures,
        emotion_labels: torch.Tensor,
        *,
        frames_per_clip: int,
        num_frames: int | None,
        latents: torch.Tensor | Sequence[torch.Tensor] | None,
        output_type: str | None = "pt",
        solver: str = "euler",
        guidance_window: tuple[float, float] = (0.0, 1.0),
        deep_cache_interval: int = 1,
    ) -> None:
        """Raise ``ValueError`` naming the argument for any input :meth:`__call__` cannot take."""
        if reference_image.dim() != 4 or reference_image.shape[:2] != (1, 3):
            raise ValueError(f"reference_image must be (1, 3, H, W) in [-1, 1], got {tuple(reference_image.shape)}.")
        height, width = reference_image.shape[-2:]
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"The image size {width}x{height} must be a multiple of {self.vae_scale_factor}.")
        if face_embedding.dim() != 2 or face_embedding.shape[0] != 1:
            raise ValueError(f"face_embedding must be (1, dim), got {tuple(face_embedding.shape)}.")
        total = len(audio_features)
        if total == 0 or total % frames_per_clip:
            raise ValueError(f"audio_features has {total} frames; it must be a positive multiple of {frames_per_clip}.")
        if emotion_labels.shape[0] < total:
            raise ValueError(
                f"emotion_labels has {emotion_labels.shape[0]} frames, fewer than the {total} of the audio."
            )
        if num_frames is not None and not 0 < num_frames <= total:
            raise ValueError(f"num_frames must be in 1..{total}, got {num_frames}.")
        if latents is not None and len(latents) != total // frames_per_clip:
            raise ValueError(f"latents must hold the noise of {total // frames_per_clip} clips, got {len(latents)}.")
        if output_type not in ("pt", "np", None):
            raise ValueError(f"output_type must be 'pt', 'np' or None, got {output_type!r}.")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}.")
        if not 0.0 <= guidance_window[0] <= guidance_window[1] <= 1.0:
            raise ValueError(
                f"guidance_window must be (start, end) with 0 <= start <= end <= 1, got {guidance_window}."
            )
        if deep_cache_interval < 1:
            raise ValueError(f"deep_cache_interval must be 1 (off) or more, got {deep_cache_interval}.")

    def encode_image_tokens(self, face_embedding: torch.Tensor, guided: bool) -> torch.Tensor:
        """(1, 512) face embedding -> (batch, n, dim) identity tokens in the diffusion net's dtype; with
        ``guided``, the unconditional tokens (of a zero embedding) first."""
        face_embedding = face_embedding.to(self._execution_device, self.image_proj.dtype)
        image_tokens = self.image_proj(face_embedding)
        if guided:
            image_tokens = torch.cat([self.image_proj(torch.zeros_like(face_embedding)), image_tokens])
        return image_tokens.to(self.diffusion_net.dtype)

    def encode_clip_conditions(
        self,
        *,
        reference_image: torch.Tensor,
        past: torch.Tensor,
        image_tokens: torch.Tensor,
        audio: torch.Tensor,
        emotion_labels: torch.Tensor,
        memory: TemporalMemory,
        vae_batch_size: int,
    ) -> ClipConditions:
        """A clip's conditions, for as many items as ``image_tokens`` has (2: unconditional, conditional).

        Args:
            reference_image: (1, 3, H, W) in [-1, 1], in the VAE's dtype and on the execution device.
            past: (P, 3, H, W) in [-1, 1], the frames the clip continues from.
            image_tokens: from :meth:`encode_image_tokens`.
            audio: (frames, 5, layers, dim) the clip's audio features.
            emotion_labels: (frames,) the clip's per-frame emotion labels.
            memory: the temporal memory of the video.
            vae_batch_size: frames per VAE encode call.
        """
        device, dtype = self._execution_device, self.diffusion_net.dtype
        guided = image_tokens.shape[0] == 2
        pixels = torch.cat([reference_image, past.to(reference_image.dtype)])
        reference_latents = self.encode_frames(pixels, vae_batch_size).to(dtype)
        context = image_tokens.repeat(pixels.shape[0], 1, 1)  # latent row r meets token set r mod batch
        reference = self.reference_net(reference_latents.repeat(image_tokens.shape[0], 1, 1, 1), 0.0, context)
        audio_tokens = self.audio_proj(audio[None].to(device, self.audio_proj.dtype)).to(dtype)
        emotion = torch.tensor([clip_emotion(emotion_labels)], device=device)
        if guided:
            audio_tokens = torch.cat([torch.zeros_like(audio_tokens), audio_tokens])
            emotion = torch.cat([torch.full_like(emotion, NUM_EMOTIONS), emotion])
        return ClipConditions(
            reference=reference,
            image_tokens=image_tokens,
            audio_tokens=audio_tokens,
            emotion=emotion,
            memory=memory,
            drop_reference=(True, False) if guided else None,  # the unconditional half does not see the reference
        )

    def prepare_latents(
        self,
        *,
        shape: tuple[int, ...],
        latents: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """The clip's initial noise of ``shape`` (1, C, frames, h, w): ``latents`` reshaped, else drawn."""
        device, dtype = self._execution_device, self.diffusion_net.dtype
        if latents is not None:
            return latents.reshape(shape).to(device, dtype)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def predict_noise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        conditions: ClipConditions,
        *,
        update_memory: bool,
        whole: bool = True,
        deep_cache: DeepFeatureCache | None = None,
    ) -> torch.Tensor:
        """One diffusion-net call on (1, C, frames, h, w) ``latents``, repeated for each item of ``conditions``:
        the whole net (keeping its deep features in ``deep_cache`` when there is one), or with ``whole=False``
        only its outer layers on the features kept. Returns (batch, C, frames, h, w)."""
        batch = conditions.batch
        sample = latents if batch == 1 else latents.repeat(batch, 1, 1, 1, 1)
        inputs = dict(sample=sample, timestep=timestep, **conditions.as_kwargs())
        if not whole:
            if deep_cache is None:
                raise ValueError("A step of the outer layers only needs a deep_cache.")
            return self.diffusion_net(**inputs, update_memory=False, deep_features=deep_cache.load(batch))
        if deep_cache is None:
            return self.diffusion_net(**inputs, update_memory=update_memory)
        noise_pred, deep = self.diffusion_net(
            **inputs, update_memory=update_memory, keep_deep_features=deep_cache.outer_layers
        )
        deep_cache.store(deep, batch)
        return noise_pred

    def denoise(
        self,
        state: ClipState,
        *,
        scheduler: SchedulerMixin,
        plan: list[StepPlan],
        guidance_scale: float,
        callback_on_step_end: StepCallback | None,
        progress: tqdm,
        parallel: GuidanceParallel | None = None,
    ) -> torch.Tensor:
        """Run the clip's solver steps as ``plan`` says; returns the denoised (1, C, frames, h, w) latents."""
        latents = state.latents
        for step, t in enumerate(scheduler.timesteps):
            todo = plan[step]
            if parallel is not None:  # this process runs one guidance half (runtime/parallel.py)
                noise_pred = parallel.predict_noise(
                    self.predict_noise,
                    self.diffusion_net,
                    latents,
                    t,
                    state.conditions,
                    todo,
                    update_memory=step == 0,
                    deep_cache=state.deep_cache,
                )
            else:
                noise_pred = self.predict_noise(
                    latents,
                    t,
                    state.conditions_for(todo.batched),
                    update_memory=step == 0,
                    whole=todo.whole,
                    deep_cache=state.deep_cache,
                )
            velocity = combine_guidance(
                noise_pred, guided=todo.guided, batched=todo.batched, guidance_scale=guidance_scale
            )
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                tensors = {"latents": latents, "noise_pred": noise_pred}
                replaced = callback_on_step_end(self, state.index, step, t, tensors) or {}
                latents = replaced.get("latents", latents)
            state.latents = latents
            progress.update()
        return latents

    @torch.no_grad()
    def __call__(
        self,
        reference_image: torch.Tensor,
        face_embedding: torch.Tensor,
        audio_features: torch.Tensor | AudioFeatures,
        emotion_labels: torch.Tensor,
        *,
        num_frames: int | None = None,
        frames_per_clip: int = 16,
        past_frames: int = 16,
        initial_past_frames: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.5,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        latents: torch.Tensor | Sequence[torch.Tensor] | None = None,
        memory: TemporalMemory | None = None,
        vae_batch_size: int = 8,
        vae_tile_size: int | None = None,
        output_type: str | None = "pt",
        callback_on_clip_end: ClipCallback | None = None,
        callback_on_step_end: StepCallback | None = None,
        solver: str = "euler",
        guidance_window: tuple[float, float] = (0.0, 1.0),
        deep_cache_interval: int = 1,
        parallel: GuidanceParallel | None = None,
    ) -> MemoPipelineOutput:
        """Generate the video.

        Args:
            reference_image: (1, 3, H, W) in [-1, 1], already at the output size.
            face_embedding: (1, 512) face-recognition embedding of the reference face.
            audio_features: (frames, 5, layers, dim) windowed wav2vec2 features, or an AudioFeatures whose
                slices give them; a whole number of clips.
            emotion_labels: (frames,) per-frame emotion labels 0-8; each clip takes its most frequent one.
            num_frames: length of the video (the audio's own length); defaults to all frames.
            frames_per_clip: frames generated per clip.
            past_frames: generated frames each clip conditions on.
            initial_past_frames: copies of the reference image the first clip conditions on as its past
                (default ``past_frames``).
            num_inference_steps: solver steps per clip.
            guidance_scale: classifier-free guidance; 1 or less runs without guidance.
            generator / seed: randomness of the initial noise (a seed makes a CPU generator).
            latents: the initial noise of each clip, (clips, 4, frames_per_clip, H/8, W/8).
            memory: the temporal memory to use; cleared first. Pass one to inspect it afterwards.
            vae_batch_size: frames per VAE encode/decode call.
            vae_tile_size: frames with a side above this many pixels go through the VAE in tiles (see
                :meth:`use_vae_tiles`); 0 never; None keeps the VAE's tiling as it is.
            output_type: "pt" (tensor), "np" (array), or None to keep no frames (use callback_on_clip_end).
            callback_on_clip_end: called as ``f(pipeline, clip_index, frames)`` with the clip's frames
                (3, n, H, W) in [0, 1], cut to ``num_frames``.
            callback_on_step_end: called as ``f(pipeline, clip_index, step, timestep, tensors)`` with
                ``tensors = {"latents": ..., "noise_pred": ...}`` (noise_pred before guidance); it may return
                ``{"latents": ...}`` to replace the latents.
            solver: "euler" (as published) or "unipc" (second-order multistep flow solver; ``sampling/solvers.py``).
            guidance_window: (start, end) fractions of the steps that are guided; the conditional pass alone
                runs on the others (``speed.plan_steps``, ``guidance.py``).
            deep_cache_interval: the whole diffusion net every this many steps, only its outer layers on the
                cached deep features in between (``sampling/deep_cache.py``); 1 turns the cache off.
            parallel: run one guidance half in this process and exchange with the other process
                (``runtime/parallel.py``); both processes call the pipeline with the same arguments and get
                the same frames. Needs guidance (``guidance_scale`` above 1).

        The defaults are the exact, published computation; see ``memo/sampling/speed.py`` for the speed settings.
        """
        # 1. Check inputs.
        self.check_inputs(
            reference_image,
            face_embedding,
            audio_features,
            emotion_labels,
            frames_per_clip=frames_per_clip,
            num_frames=num_frames,
            latents=latents,
            output_type=output_type,
            solver=solver,
            guidance_window=guidance_window,
            deep_cache_interval=deep_cache_interval,
        )
        if vae_tile_size is not None:
            self.use_vae_tiles(vae_tile_size)
        device = self._execution_device
        num_clips = len(audio_features) // frames_per_clip
        num_frames = num_frames or len(audio_features)
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        plan = plan_steps(num_inference_steps, guidance_scale > 1.0, guidance_window, deep_cache_interval)
        scheduler = flow_scheduler(solver, self.scheduler)

        # 2. Encode the conditions that hold for the whole video.
        guided = any(step.batched for step in plan)  # the conditions hold both halves
        image_tokens = self.encode_image_tokens(face_embedding, guided=guided)
        reference_image = reference_image.to(device, self.vae.dtype)
        memory = memory if memory is not None else new_memory(self)
        memory.reset()
        vae_batch_size = vae_frames(self, vae_batch_size)

        height, width = reference_image.shape[-2:]
        latent_shape = (1, self.diffusion_net.config.in_channels, frames_per_clip)
        latent_shape += (height // self.vae_scale_factor, width // self.vae_scale_factor)
        kept: list[torch.Tensor] = []
        history = reference_image.repeat(initial_past_frames or past_frames, 1, 1, 1)
        progress_config = dict(getattr(self, "_progress_bar_config", {}))
        if parallel is not None and not parallel.is_main:
            progress_config["disable"] = True  # one progress bar, on rank 0
        progress = tqdm(total=num_clips * num_inference_steps, unit="step", **progress_config)
        for clip in range(num_clips):
            progress.set_description(f"clip {clip + 1}/{num_clips}")
            window = slice(clip * frames_per_clip, (clip + 1) * frames_per_clip)
            # 2, per clip: the reference features (image + past frames), audio tokens and emotion.
            conditions = self.encode_clip_conditions(
                reference_image=reference_image,
                past=history[-past_frames:],
                image_tokens=image_tokens,
                audio=audio_features[window],
                emotion_labels=emotion_labels[window],
                memory=memory,
                vae_batch_size=vae_batch_size,
            )

            # 3. Prepare the clip's latents.
            state = ClipState(
                index=clip,
                latents=self.prepare_latents(
                    shape=latent_shape,
                    latents=None if latents is None else latents[clip],
                    generator=generator,
                ),
                conditions=conditions,
                deep_cache=DeepFeatureCache() if deep_cache_interval > 1 else None,
            )
            scheduler.set_timesteps(num_inference_steps, device=device)
            scheduler.set_begin_index(0)  # else its first step finds its index with a host synchronisation

            # 4. Denoise the clip.
            clip_latents = self.denoise(
                state,
                scheduler=scheduler,
                plan=plan,
                guidance_scale=guidance_scale,
                callback_on_step_end=callback_on_step_end,
                progress=progress,
                parallel=parallel,
            )

            # 5. Decode, hand out, and keep the last frames as the next clip's past.
            frames = self.decode_latents(clip_latents[0].transpose(0, 1), vae_batch_size)  # (F, 3, H, W)
            history = frames * 2 - 1
            visible = frames[: max(0, min(frames_per_clip, num_frames - clip * frames_per_clip))]
            clip_video = visible.transpose(0, 1).cpu()
            if callback_on_clip_end is not None:
                callback_on_clip_end(self, clip, clip_video)
            if output_type is not None:
                kept.append(clip_video)
        progress.close()
        self.maybe_free_model_hooks()

        if output_type is None:
            return MemoPipelineOutput(frames=None)
        video = torch.cat(kept, dim=1)
        return MemoPipelineOutput(frames=video.numpy() if output_type == "np" else video)
