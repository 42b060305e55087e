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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.hooks import HookRegistry
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from memo.conditions.audio_features import AudioFeatures
from memo.io.hub import CHECKPOINT_VAE_FOLDER, MEMO_REPO, NETWORK_FOLDERS, VAE_FILES, VAE_REPO, resolve_model_dir
from memo.io.model_files import ModelFolder
from memo.io.model_load import ModelSpec, load_model, pretrained_spec, verify_models
from memo.models.diffusion_net import DiffusionNet
from memo.models.projections import AudioProjModel, ImageProjModel
from memo.models.reference_net import ReferenceNet
from memo.models.temporal_memory import TemporalMemory
from memo.sampling.conditioning import encode_clip_conditions, encode_image_tokens
from memo.sampling.deep_cache import apply_deep_cache
from memo.sampling.guidance import ClassifierFreeGuidance
from memo.sampling.solvers import SOLVERS, flow_scheduler

NETWORKS = dict(zip(NETWORK_FOLDERS, (ReferenceNet, DiffusionNet, ImageProjModel, AudioProjModel)))
"""Each network's folder in a checkpoint (memo.io.hub.NETWORK_FOLDERS) and its class."""


def checkpoint_specs(
    root: ModelFolder,
    vae: ModelFolder,
    torch_dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype | None = None,
) -> dict[str, ModelSpec]:
    """How each network of a checkpoint in the published layout (``root.folder``) and the VAE (``vae.folder``)
    is checked and loaded (:mod:`memo.io.model_load`), by name: the four of :data:`NETWORKS` in ``torch_dtype``,
    then ``vae`` in ``vae_dtype`` (default ``torch_dtype``; None: as stored)."""
    specs = {name: pretrained_spec(network, root, name, torch_dtype=torch_dtype) for name, network in NETWORKS.items()}
    specs["vae"] = pretrained_spec(AutoencoderKL, vae, torch_dtype=vae_dtype or torch_dtype)
    return specs


ClipCallback = Callable[["MemoPipeline", int, torch.Tensor], None]
StepCallback = Callable[["MemoPipeline", int, int, torch.Tensor, dict], dict | None]


@dataclass
class ResumeState:
    """Where to take a video up again (``MemoPipeline.__call__(resume_from=...)``): the clips before ``clip`` are
    done, and this is what the exact continuation needs of them.

    Attributes:
        clip: the first clip to render (0-based).
        latents: clip index -> that clip's denoised latents (1, C, frames_per_clip, H/8, W/8), for the clips
            of :meth:`needed_latents`: the past frames of the clips the memory lacks are decoded from them,
            and those of ``clip``.
        memory: the temporal memory's states (:attr:`TemporalMemory.states`, any device) holding the past
            frames of clips 0 .. ``memory_clip``; None with ``memory_clip`` -1 (an empty memory).
        memory_clip: the last clip whose past frames the memory holds; from there to ``clip - 1`` each clip's
            update is replayed (its reference pass and the first step's memory update, nothing else). It may be
            ``clip`` itself (a snapshot taken after that clip's first step): then that clip skips its update.
        noise_state: the noise generator's state (``torch.Generator.get_state()``) after clip ``clip - 1`` drew
            its noise; None for a generator as the seed makes it.
    """

    clip: int
    latents: dict[int, torch.Tensor]
    memory: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    memory_clip: int = -1
    noise_state: torch.Tensor | None = None

    def needed_latents(self) -> range:
        """The clips whose latents the take-up decodes: from the snapshot's clip (or the one before the clip
        to render, when the snapshot is of that clip) to the one before the clip to render."""
        return range(max(min(self.memory_clip, self.clip - 1), 0), self.clip)


@dataclass
class MemoPipelineOutput(BaseOutput):
    """``frames``: (3, num_frames, H, W) in [0, 1] (a tensor, or an array for ``output_type="np"``), or None
    when the frames were only handed to ``callback_on_clip_end``."""

    frames: torch.Tensor | np.ndarray | None


class MemoPipeline(DiffusionPipeline):
    """Generate a talking video with MEMO (arXiv 2412.04448): the clip loop, and nothing else.

    Components: ``vae`` (AutoencoderKL), ``reference_net``, ``diffusion_net``, ``image_proj``, ``audio_proj``
    and a ``scheduler`` (FlowMatchEulerDiscreteScheduler as published; the solver is a scheduler swap,
    ``memo.sampling.solvers.flow_scheduler``).

    What changes *where* or *how often* the computation runs attaches from outside, as diffusers does it:
    hooks on the networks (the memory modes' hooks: the networks taking turns on the device, the
    reference features and the temporal memory waiting on the host; ``memo/sampling/deep_cache.py``:
    DeepCache-style reuse), the guider (``guider=``; guidance-parallel's guider runs its halves on two
    processes), ``memory_factory`` (where a new temporal memory lives) and ``execution_device`` (where the
    networks compute when their weights wait elsewhere). See docs/architecture.md.
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
        self.memory_factory: Callable[[], TemporalMemory] = TemporalMemory
        self.execution_device: torch.device | None = None
        self._current_step = 0
        self.temporal_memory: TemporalMemory | None = None
        self.memory_clip: int | None = -1
        self.clip_latents: torch.Tensor | None = None
        self.noise_generator: torch.Generator | None = None

    @property
    def _execution_device(self) -> torch.device:
        """Where the networks compute: ``execution_device`` when a placement set it (its hooks bring the
        weights there for each call), else diffusers' own answer."""
        return self.execution_device if self.execution_device is not None else super()._execution_device

    @property
    def current_step(self) -> int:
        """The denoising step of the current clip (0-based), for hooks that act per step."""
        return self._current_step

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
        :class:`memo.io.hub.MissingModelError` when they cannot be had, and
        :class:`memo.io.model_files.DamagedModelError` (one line per file) when one is damaged or does not fit
        its network, checked before any weights load.
        """
        patterns = [f"{name}/*" for name in NETWORKS] + [f"{CHECKPOINT_VAE_FOLDER}/*"]
        root = resolve_model_dir(model, patterns, setting="model", **hub_kwargs)
        if vae is None:
            vae = root / CHECKPOINT_VAE_FOLDER if (root / CHECKPOINT_VAE_FOLDER).is_dir() else VAE_REPO
        vae_dir = resolve_model_dir(vae, list(VAE_FILES), setting="vae", **hub_kwargs)
        specs = checkpoint_specs(
            ModelFolder("model_name_or_path", str(model), Path(root), ()),
            ModelFolder("vae", str(vae), Path(vae_dir), (), component="vae"),
            torch_dtype,
        )
        verify_models(specs.values())
        return cls(scheduler=FlowMatchEulerDiscreteScheduler(), **{name: load_model(s) for name, s in specs.items()})

    # -- pieces of the clip loop -------------------------------------------------------------------

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
        output_type: str | None,
        deep_cache_interval: int,
        resume_from: ResumeState | None = None,
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
        if resume_from is not None and not (
            -1 <= resume_from.memory_clip <= resume_from.clip < total // frames_per_clip
            and all(c in resume_from.latents for c in resume_from.needed_latents())
            and (resume_from.memory is None) == (resume_from.memory_clip == -1)
        ):
            raise ValueError(
                f"resume_from (clip {resume_from.clip}, memory through clip {resume_from.memory_clip}, latents of "
                f"clips {sorted(resume_from.latents)}) is no resumable point of {total // frames_per_clip} clips."
            )
        if latents is not None and len(latents) != total // frames_per_clip:
            raise ValueError(f"latents must hold the noise of {total // frames_per_clip} clips, got {len(latents)}.")
        if output_type not in ("pt", "np", None):
            raise ValueError(f"output_type must be 'pt', 'np' or None, got {output_type!r}.")
        if deep_cache_interval < 1:
            raise ValueError(f"deep_cache_interval must be 1 (off) or more, got {deep_cache_interval}.")

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
        guider: ClassifierFreeGuidance | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        latents: torch.Tensor | Sequence[torch.Tensor] | None = None,
        memory: TemporalMemory | None = None,
        vae_batch_size: int = 8,
        vae_tile_size: int | None = None,
        output_type: str | None = "pt",
        callback_on_clip_end: ClipCallback | None = None,
        callback_on_step_end: StepCallback | None = None,
        deep_cache_interval: int = 1,
        resume_from: ResumeState | None = None,
        **deprecated,
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
            num_inference_steps: solver steps per clip (of ``self.scheduler``).
            guidance_scale: classifier-free guidance; 1 or less runs without guidance. Ignored with ``guider``.
            guider: the guidance of each step (default ``ClassifierFreeGuidance(guidance_scale)``, every
                step guided); ``ClassifierFreeGuidance(scale, start=, stop=)`` guides only that fraction of
                the steps (``memo/sampling/guidance.py``).
            generator / seed: randomness of the initial noise (a seed makes a CPU generator).
            latents: the initial noise of each clip, (clips, 4, frames_per_clip, H/8, W/8).
            memory: the temporal memory to use; cleared first. Pass one to inspect it afterwards.
            vae_batch_size: frames per VAE encode/decode call.
            vae_tile_size: frames with a side above this many pixels go through the VAE in tiles (see
                :meth:`use_vae_tiles`); 0 never; None keeps the VAE's tiling as it is.
            output_type: "pt" (tensor), "np" (array), or None to keep no frames (use callback_on_clip_end).
            callback_on_clip_end: called as ``f(pipeline, clip_index, frames)`` with the clip's frames
                (3, n, H, W) in [0, 1], cut to ``num_frames``. The state a resume needs is on the pipeline then:
                ``clip_latents`` (the clip's denoised latents, on the CPU), ``noise_generator`` (its state is
                the next clip's noise), ``temporal_memory`` and ``memory_clip`` (the last clip whose past
                frames it holds; None while an update is under way, when the memory is not a usable snapshot),
                all dropped when the call returns.
            callback_on_step_end: called as ``f(pipeline, clip_index, step, timestep, tensors)`` with
                ``tensors = {"latents": ..., "noise_pred": ...}`` (noise_pred before guidance); it may return
                ``{"latents": ...}`` to replace the latents.
            deep_cache_interval: the whole diffusion net every this many steps, only its outer layers on the
                cached deep features in between (``sampling/deep_cache.py``); 1 turns the cache off.
            resume_from: take the video up at ``resume_from.clip`` (:class:`ResumeState`); the frames handed
                out and returned are those of the clips from there on, equal to an uninterrupted call's.

        Older call forms still work and warn: ``solver=`` (set ``pipe.scheduler`` instead),
        ``guidance_window=(start, stop)`` and ``parallel=`` (pass a ``guider``).

        The defaults are the exact, published computation; see ``memo/sampling/speed.py`` for the speed settings.
        """
        # 0. Older call forms.
        scheduler, guider = self._deprecated_call_forms(deprecated, guidance_scale, guider)

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
            deep_cache_interval=deep_cache_interval,
            resume_from=resume_from,
        )
        if vae_tile_size is not None:
            self.use_vae_tiles(vae_tile_size)
        device = self._execution_device
        num_clips = len(audio_features) // frames_per_clip
        num_frames = num_frames or len(audio_features)
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        plan = guider.plan(num_inference_steps, deep_cache_interval)
        if deep_cache_interval > 1:
            apply_deep_cache(self.diffusion_net).configure([todo.whole for todo in plan], lambda: self._current_step)

        try:
            # 2. Encode the conditions that hold for the whole video: identity tokens, the reference image.
            image_tokens = encode_image_tokens(self, face_embedding, any(todo.batched for todo in plan), device)
            reference_image = reference_image.to(device, self.vae.dtype)
            memory = memory if memory is not None else self.memory_factory()
            memory.reset()
            self.temporal_memory, self.memory_clip, self.noise_generator = memory, -1, generator
            height, width = reference_image.shape[-2:]
            latent_shape = (1, self.diffusion_net.config.in_channels, frames_per_clip)
            latent_shape += (height // self.vae_scale_factor, width // self.vae_scale_factor)
            kept: list[torch.Tensor] = []
            history = reference_image.repeat(initial_past_frames or past_frames, 1, 1, 1)
            first, holds = 0, -1  # the first clip to render; the last clip whose past frames the memory holds
            if resume_from is not None:
                first, holds = resume_from.clip, resume_from.memory_clip
                history = self._take_up(
                    resume_from,
                    memory,
                    history,
                    reference_image=reference_image,
                    image_tokens=image_tokens,
                    audio_features=audio_features,
                    emotion_labels=emotion_labels,
                    frames_per_clip=frames_per_clip,
                    past_frames=past_frames,
                    guider=guider,
                    plan=plan,
                    scheduler=scheduler,
                    num_inference_steps=num_inference_steps,
                    latent_shape=latent_shape,
                    vae_batch_size=vae_batch_size,
                    device=device,
                )
                if generator is not None and resume_from.noise_state is not None:
                    generator.set_state(resume_from.noise_state)
            with tqdm(
                total=num_clips * num_inference_steps,
                initial=first * num_inference_steps,
                unit="step",
                **getattr(self, "_progress_bar_config", {}),
            ) as progress:
                for clip in range(first, num_clips):
                    progress.set_description(f"clip {clip + 1}/{num_clips}")
                    window = slice(clip * frames_per_clip, (clip + 1) * frames_per_clip)

                    # 3. Encode the clip's conditions: reference features (image + past frames), audio, emotion.
                    conditions = encode_clip_conditions(
                        self,
                        reference_image=reference_image,
                        past=history[-past_frames:],
                        image_tokens=image_tokens,
                        audio=audio_features[window],
                        emotion_labels=emotion_labels[window],
                        memory=memory,
                        vae_batch_size=vae_batch_size,
                        device=device,
                    )

                    # 4. Prepare the clip's initial noise.
                    clip_latents = self.prepare_latents(
                        shape=latent_shape, latents=None if latents is None else latents[clip], generator=generator
                    )

                    # 5. Denoise: the first step also folds the past frames into the temporal memory.
                    scheduler.set_timesteps(num_inference_steps, device=device)
                    scheduler.set_begin_index(0)  # else its first step finds its index with a host synchronisation
                    for step, t in enumerate(scheduler.timesteps):
                        self._current_step = step
                        todo = plan[step]
                        update = step == 0 and holds < clip
                        if update:
                            self.memory_clip = None  # half updated until the step returns
                        noise_pred = guider.predict(
                            self.diffusion_net, clip_latents, t, conditions.with_update(update), todo
                        )
                        if update:
                            self.memory_clip = holds = clip
                        velocity = guider.combine(noise_pred, todo)
                        clip_latents = scheduler.step(velocity, t, clip_latents, return_dict=False)[0]
                        if callback_on_step_end is not None:
                            tensors = {"latents": clip_latents, "noise_pred": noise_pred}
                            replaced = callback_on_step_end(self, clip, step, t, tensors) or {}
                            clip_latents = replaced.get("latents", clip_latents)
                        progress.update()
                    del conditions  # the reference features, before the decoder's memory is needed
                    self._reset_stateful_hooks()

                    # 6. Decode, hand the clip out, and keep its last frames as the next clip's past.
                    frames = self.decode_latents(clip_latents[0].transpose(0, 1), vae_batch_size)  # (F, 3, H, W)
                    history = frames * 2 - 1
                    self.clip_latents = clip_latents.cpu()
                    visible = frames[: max(0, min(frames_per_clip, num_frames - clip * frames_per_clip))]
                    clip_video = visible.transpose(0, 1).cpu()
                    if callback_on_clip_end is not None:
                        callback_on_clip_end(self, clip, clip_video)
                    if output_type is not None:
                        kept.append(clip_video)
        finally:
            if deep_cache_interval > 1:
                apply_deep_cache(self.diffusion_net).configure(None)
            # the call's state goes with the call, so the memory and the networks leave the device
            self.temporal_memory, self.clip_latents, self.noise_generator = None, None, None
            self.maybe_free_model_hooks()

        if output_type is None:
            return MemoPipelineOutput(frames=None)
        video = torch.cat(kept, dim=1)
        return MemoPipelineOutput(frames=video.numpy() if output_type == "np" else video)

    def _take_up(
        self,
        state: ResumeState,
        memory: TemporalMemory,
        history: torch.Tensor,
        *,
        reference_image: torch.Tensor,
        image_tokens: torch.Tensor,
        audio_features: torch.Tensor | AudioFeatures,
        emotion_labels: torch.Tensor,
        frames_per_clip: int,
        past_frames: int,
        guider: ClassifierFreeGuidance,
        plan: list,
        scheduler,
        num_inference_steps: int,
        latent_shape: tuple[int, ...],
        vae_batch_size: int,
        device: torch.device,
    ) -> torch.Tensor:
        """Put ``memory`` where it stood before clip ``state.clip`` (its snapshot, then each later done clip's
        update replayed: the clip's reference pass and first step, whose memory update depends on its past
        frames only, not on the noise); returns the past frames of clip ``state.clip``."""
        if state.memory is not None:
            memory.restore(state.memory, device)
        self.memory_clip = state.memory_clip

        def past_of(clip: int) -> torch.Tensor:
            if clip == 0:
                return history
            latents = state.latents[clip - 1][0].transpose(0, 1)
            return self.decode_latents(latents, vae_batch_size) * 2 - 1

        scheduler.set_timesteps(num_inference_steps, device=device)
        scheduler.set_begin_index(0)
        replays = range(state.memory_clip + 1, state.clip)
        for clip in tqdm(replays, desc="replaying memory", unit="clip", disable=len(replays) < 2):
            window = slice(clip * frames_per_clip, (clip + 1) * frames_per_clip)
            conditions = encode_clip_conditions(
                self,
                reference_image=reference_image,
                past=past_of(clip)[-past_frames:],
                image_tokens=image_tokens,
                audio=audio_features[window],
                emotion_labels=emotion_labels[window],
                memory=memory,
                vae_batch_size=vae_batch_size,
                device=device,
            )
            self._current_step = 0
            noise = torch.zeros(latent_shape, device=device, dtype=self.diffusion_net.dtype)
            self.memory_clip = None
            guider.predict(self.diffusion_net, noise, scheduler.timesteps[0], conditions.with_update(True), plan[0])
            self.memory_clip = clip
            del conditions
            self._reset_stateful_hooks()
        return past_of(state.clip)

    def maybe_free_model_hooks(self) -> None:
        """diffusers' end of a call, with every network's stateful hooks reset (those a memory plan installed
        send the networks back to the host, so each video gives its device memory back)."""
        for component in self.components.values():
            if isinstance(component, torch.nn.Module):
                HookRegistry.check_if_exists_or_initialize(component).reset_stateful_hooks()
        super().maybe_free_model_hooks()

    def _reset_stateful_hooks(self) -> None:
        """Let the diffusion net's stateful hooks (the deep-feature cache) drop what they hold for the clip."""
        registry = getattr(self.diffusion_net, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry):
            registry.reset_stateful_hooks()

    def _deprecated_call_forms(
        self, deprecated: dict, guidance_scale: float, guider: ClassifierFreeGuidance | None
    ) -> tuple:
        """The scheduler and guider of a call, from its arguments and the older forms ``solver=``,
        ``guidance_window=`` and ``parallel=`` (each warns once per call)."""
        unknown = sorted(set(deprecated) - {"solver", "guidance_window", "parallel"})
        if unknown:
            raise TypeError(f"MemoPipeline.__call__() got unexpected keyword arguments: {', '.join(unknown)}")
        scheduler = self.scheduler
        if "solver" in deprecated:
            solver = deprecated["solver"]
            warnings.warn(
                "MemoPipeline(solver=...) is deprecated: set pipe.scheduler = flow_scheduler(solver, pipe.scheduler) "
                "(memo.sampling.solvers).",
                FutureWarning,
                stacklevel=3,
            )
            if solver not in SOLVERS:
                raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}.")
            scheduler = flow_scheduler(solver, self.scheduler)
        if guider is None:
            start, stop = deprecated.get("guidance_window", (0.0, 1.0))
            if "guidance_window" in deprecated:
                warnings.warn(
                    "MemoPipeline(guidance_window=...) is deprecated: pass guider=ClassifierFreeGuidance(scale, "
                    "start=, stop=) (memo.sampling.guidance).",
                    FutureWarning,
                    stacklevel=3,
                )
            guider = ClassifierFreeGuidance(guidance_scale, start, stop)
        parallel = deprecated.get("parallel")
        if parallel is not None:
            warnings.warn(
                "MemoPipeline(parallel=...) is deprecated: pass guider=parallel.guider(...) (GuidanceParallel.guider).",
                FutureWarning,
                stacklevel=3,
            )
            guider = parallel.guider(guider)
        return scheduler, guider
