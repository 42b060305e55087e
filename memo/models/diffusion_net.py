"""Diffusion net: the 3D UNet that denoises a clip's latents.

Sinusoidal timestep embedding, an input convolution, down blocks, a mid block, up blocks with skip
connections, and an output norm and convolution, all applied frame by frame; the layers' spatial, audio and
temporal modules (see ``blocks.py``) are where frames meet the reference image, the audio, the emotion and
each other. Published as ``diffusion_net/`` with class name UNet3DConditionModel.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from memo.models.blocks import BlockSpec, DownBlock3D, FrameContext, MidBlock3D, NetSpec, UpBlock3D
from memo.models.published_config import DIFFUSION_NET_FIXED_SETTINGS, strip_fixed_settings
from memo.models.reference_net import ReferenceFeatures
from memo.models.temporal_memory import MemoryLinearAttention, TemporalMemory

_DEFAULT_MOTION_KWARGS = {
    "num_attention_heads": 8,
    "num_transformer_block": 1,
    "attention_block_types": ["Temporal_Self", "Temporal_Self"],
    "temporal_position_encoding": True,
    "temporal_position_encoding_max_len": 32,
    "temporal_attention_dim_div": 1,
}


class DeepFeatures(NamedTuple):
    """What a whole pass hands to the outer layers of its last up block: ``hidden`` (batch*frames, C, H, W),
    the hidden state entering them, and ``audio`` (batch*frames, tokens, dim), the audio tokens at that
    point (they flow through every audio module of the net); ``outer_layers`` of the last up block follow."""

    hidden: torch.Tensor
    audio: torch.Tensor
    outer_layers: int


class DiffusionNet(ModelMixin, ConfigMixin):
    """MEMO's diffusion net: predicts the flow-matching velocity of a clip's latents.

    One method per path, all reached through :meth:`forward`: :meth:`whole_pass`, the whole net;
    :meth:`whole_pass_keeping_deep_features`, the same pass handing back its deep features;
    :meth:`outer_layers_pass`, only the outermost layers on deep features kept from an earlier pass (the
    sampler's deep-feature cache, ``memo/sampling/deep_cache.py``).
    """

    _supports_gradient_checkpointing = True  # per layer, see ``blocks.LayerStack``

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """Check and drop the published settings this class does not take (see ``published_config``)."""
        config_dict = strip_fixed_settings(
            cls.__name__, config_dict, DIFFUSION_NET_FIXED_SETTINGS, ("addition_embed_type_num_heads",)
        )
        return super().extract_init_dict(config_dict, **kwargs)

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "DownBlock3D",
        ),
        up_block_types: tuple[str, ...] = (
            "UpBlock3D",
            "CrossAttnUpBlock3D",
            "CrossAttnUpBlock3D",
            "CrossAttnUpBlock3D",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        attention_head_dim: int = 8,
        audio_attention_dim: int = 768,
        motion_module_resolutions: tuple[int, ...] = (1, 2, 4, 8),
        motion_module_kwargs: dict | None = None,
        emo_drop_rate: float = 0.05,
        sample_size: int | None = None,
    ):
        super().__init__()
        motion_kwargs = {**_DEFAULT_MOTION_KWARGS, **(motion_module_kwargs or {})}
        motion_kwargs["attention_block_types"] = tuple(motion_kwargs["attention_block_types"])
        time_dim = block_out_channels[0] * 4
        net = NetSpec(
            temb_channels=time_dim,
            heads=attention_head_dim,  # diffusers' historical naming: this number is the head count
            cross_attention_dim=cross_attention_dim,
            audio_dim=audio_attention_dim,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            emo_drop_rate=emo_drop_rate,
            motion_kwargs=motion_kwargs,
            downsample_padding=downsample_padding,
        )
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_dim)

        levels = len(block_out_channels)
        self.down_blocks = nn.ModuleList()
        out_ch = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            spec = BlockSpec(
                in_channels=in_ch,
                out_channels=out_ch,
                num_layers=layers_per_block,
                with_attention=block_type.startswith("CrossAttn"),
                with_motion=2**i in motion_module_resolutions,
                resample=i < levels - 1,
            )
            self.down_blocks.append(DownBlock3D(net, spec))

        self.mid_block = MidBlock3D(replace(net, output_scale_factor=mid_block_scale_factor), block_out_channels[-1])

        reversed_channels = list(reversed(block_out_channels))
        self.up_blocks = nn.ModuleList()
        out_ch = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            prev_ch, out_ch = out_ch, reversed_channels[i]
            spec = BlockSpec(
                in_channels=reversed_channels[min(i + 1, levels - 1)],
                out_channels=out_ch,
                num_layers=layers_per_block + 1,
                with_attention=block_type.startswith("CrossAttn"),
                with_motion=2 ** (levels - 1 - i) in motion_module_resolutions,
                resample=i < levels - 1,
                prev_channels=prev_ch,
                is_final=i == levels - 1,
            )
            self.up_blocks.append(UpBlock3D(net, spec))

        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

        for name, module in self.named_modules():
            if isinstance(module, MemoryLinearAttention):
                module.memory_name = name

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        reference: ReferenceFeatures,
        image_tokens: torch.Tensor,
        audio_tokens: torch.Tensor,
        emotion: torch.Tensor,
        memory: TemporalMemory,
        update_memory: bool,
        drop_reference: tuple[bool, ...] | None = None,
        *,
        keep_deep_features: int | None = None,
        deep_features: DeepFeatures | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, DeepFeatures]:
        """Predict the velocity of a clip: :meth:`whole_pass` by default, :meth:`whole_pass_keeping_deep_features`
        with ``keep_deep_features``, :meth:`outer_layers_pass` with ``deep_features``. (One entry point, so
        that ``torch.compile`` and offload hooks, which wrap ``forward``, see every path.)

        Args:
            sample: (batch, C, frames, h, w) noisy latents; the batch holds the guidance halves.
            timestep: the flow-matching timestep (0..1000): one for the whole batch, or one per batch item.
            reference: the reference net's features of (reference image + past frames) for each batch item.
                As published, the reference frame's features are tiled over the frame rows (row i meets batch
                item i mod batch), which is what guidance needs; to denoise unrelated items, call once per item.
            image_tokens: (batch, n, cross_attention_dim) face-identity tokens.
            audio_tokens: (batch, frames, m, audio_attention_dim) audio tokens of each frame.
            emotion: (batch,) emotion labels (9 is the dropped, unconditional label).
            memory: the temporal memory; read by every temporal layer.
            update_memory: fold the reference's past frames into ``memory`` first (once per clip).
            drop_reference: one bool per batch item; True for items whose frames do not attend to the
                reference image.
            keep_deep_features: also return the deep features entering the last this many layers of the last
                up block (1..its layers).
            deep_features: run only the outer layers, on these features of an earlier whole pass.

        Returns:
            (batch, out_channels, frames, h, w) velocity; with ``keep_deep_features``, (velocity, DeepFeatures).

        Raises:
            ValueError: a timestep count that is neither 1 nor the batch; both path options; ``update_memory``
                with ``deep_features``; ``keep_deep_features`` out of range.
        """
        conditions = (sample, timestep, reference, image_tokens, audio_tokens, emotion, memory)
        if deep_features is not None:
            if update_memory or keep_deep_features is not None:
                raise ValueError("An outer-layers pass neither updates the memory nor keeps deep features.")
            return self.outer_layers_pass(*conditions, drop_reference, deep_features=deep_features)
        if keep_deep_features is not None:
            return self.whole_pass_keeping_deep_features(
                *conditions, update_memory, drop_reference, outer_layers=keep_deep_features
            )
        return self.whole_pass(*conditions, update_memory, drop_reference)

    def whole_pass(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        reference: ReferenceFeatures,
        image_tokens: torch.Tensor,
        audio_tokens: torch.Tensor,
        emotion: torch.Tensor,
        memory: TemporalMemory,
        update_memory: bool,
        drop_reference: tuple[bool, ...] | None = None,
    ) -> torch.Tensor:
        """The whole net (arguments and result as in :meth:`forward`)."""
        ctx = self._frame_context(
            sample, timestep, reference, image_tokens, audio_tokens, emotion, memory, update_memory, drop_reference
        )
        x, skips = self._down_and_mid(sample, reference, ctx)
        x = self._up(x, skips, reference, ctx)
        return self._output(x, sample)

    def whole_pass_keeping_deep_features(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        reference: ReferenceFeatures,
        image_tokens: torch.Tensor,
        audio_tokens: torch.Tensor,
        emotion: torch.Tensor,
        memory: TemporalMemory,
        update_memory: bool,
        drop_reference: tuple[bool, ...] | None = None,
        *,
        outer_layers: int = 2,
    ) -> tuple[torch.Tensor, DeepFeatures]:
        """:meth:`whole_pass` (same result) that also hands back what enters the last ``outer_layers``
        layers of the last up block, for :meth:`outer_layers_pass` to start from.

        Raises:
            ValueError: ``outer_layers`` is not 1..(layers of the last up block).
        """
        layers = len(self.up_blocks[-1].resnets)
        if not 1 <= outer_layers <= layers:
            raise ValueError(f"outer_layers must be 1..{layers} (layers of the last up block), got {outer_layers}.")
        ctx = self._frame_context(
            sample, timestep, reference, image_tokens, audio_tokens, emotion, memory, update_memory, drop_reference
        )
        x, skips = self._down_and_mid(sample, reference, ctx)
        x, skips = self._up(x, skips, reference, ctx, keep_outer=outer_layers)
        deep = DeepFeatures(hidden=x, audio=ctx.audio, outer_layers=outer_layers)
        x = self._outer_layers(x, skips, reference, ctx, outer_layers)
        return self._output(x, sample), deep

    def outer_layers_pass(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        reference: ReferenceFeatures,
        image_tokens: torch.Tensor,
        audio_tokens: torch.Tensor,
        emotion: torch.Tensor,
        memory: TemporalMemory,
        drop_reference: tuple[bool, ...] | None = None,
        *,
        deep_features: DeepFeatures,
    ) -> torch.Tensor:
        """Only the outer layers, on ``deep_features`` of an earlier whole pass (DeepCache, arXiv 2312.00858):
        the input convolution, the first ``outer_layers - 1`` layers of the first down block (whose outputs
        are the outer layers' skips), the last ``outer_layers`` layers of the last up block, the output layers.

        Arguments as in :meth:`forward`; the memory is only read. ``deep_features`` must come from a pass
        with the same batch, frames and latent size.
        """
        ctx = self._frame_context(
            sample, timestep, reference, image_tokens, audio_tokens, emotion, memory, False, drop_reference
        )
        outer_layers = deep_features.outer_layers
        x = self.conv_in(sample.transpose(1, 2).flatten(0, 1))
        _, block_skips = self.down_blocks[0](x, reference.down[0], ctx, num_layers=outer_layers - 1)
        ctx.audio = deep_features.audio
        x = self._outer_layers(deep_features.hidden, [x, *block_skips], reference, ctx, outer_layers)
        return self._output(x, sample)

    # -- the pieces of the passes ------------------------------------------------------------------

    def _frame_context(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        reference: ReferenceFeatures,
        image_tokens: torch.Tensor,
        audio_tokens: torch.Tensor,
        emotion: torch.Tensor,
        memory: TemporalMemory,
        update_memory: bool,
        drop_reference: tuple[bool, ...] | None,
    ) -> FrameContext:
        batch, _, frames = sample.shape[:3]
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if timesteps.numel() not in (1, batch):
            raise ValueError(f"timestep must be one value or one per batch item ({batch}), got {timesteps.numel()}.")
        temb = self.time_embedding(self.time_proj(timesteps).to(self.dtype))
        temb = temb.expand(batch, -1).repeat_interleave(frames, dim=0)
        return FrameContext(
            batch=batch,
            temb=temb,
            image_tokens=image_tokens,
            emotion=emotion.reshape(-1).to(device=sample.device, dtype=torch.long),
            memory=memory,
            update_memory=update_memory,
            drop_reference=drop_reference,
            audio=audio_tokens.flatten(0, 1).float(),
            item=reference.item,
        )

    def _down_and_mid(
        self, sample: torch.Tensor, reference: ReferenceFeatures, ctx: FrameContext
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The input convolution, the down blocks and the mid block: (hidden, skips)."""
        x = self.conv_in(sample.transpose(1, 2).flatten(0, 1))
        skips = [x]
        for block, features in zip(self.down_blocks, reference.down):
            x, block_skips = block(x, features, ctx)
            skips.extend(block_skips)
        return self.mid_block(x, reference.mid, ctx), skips

    def _up(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        reference: ReferenceFeatures,
        ctx: FrameContext,
        keep_outer: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The up blocks. With ``keep_outer``, stop before the last ``keep_outer`` layers of the last block
        and return (hidden, the skips those layers take)."""
        levels = len(self.up_blocks)
        for i, (block, features) in enumerate(zip(self.up_blocks, reference.up)):
            block_skips = skips[-len(block.resnets) :]
            del skips[-len(block.resnets) :]
            upsample_size = tuple(skips[-1].shape[-2:]) if i < levels - 1 else None
            if keep_outer is not None and i == levels - 1:
                inner = range(len(block.resnets) - keep_outer)
                return block(x, features, block_skips, ctx, upsample_size, layers=inner), block_skips
            x = block(x, features, block_skips, ctx, upsample_size)
        return x

    def _outer_layers(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        reference: ReferenceFeatures,
        ctx: FrameContext,
        outer_layers: int,
    ) -> torch.Tensor:
        """The last ``outer_layers`` layers of the last up block, on ``skips`` (consumed last first)."""
        last = self.up_blocks[-1]
        outer = range(len(last.resnets) - outer_layers, len(last.resnets))
        return last(x, reference.up[-1], skips, ctx, None, layers=outer)

    def _output(self, x: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The output norm and convolution, back to (batch, C, frames, h, w)."""
        batch, _, frames = sample.shape[:3]
        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        return x.unflatten(0, (batch, frames)).transpose(1, 2)
