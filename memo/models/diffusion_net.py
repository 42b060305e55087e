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
from memo.models.conditions import DiffusionConditions
from memo.models.published_config import DIFFUSION_NET_FIXED_SETTINGS, strip_fixed_settings
from memo.models.reference_net import ReferenceFeatures
from memo.models.temporal_memory import MemoryLinearAttention

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

    :meth:`forward` runs the whole net. Two more entry points serve the deep-feature cache
    (``memo/sampling/deep_cache.py``, a hook on this net): :meth:`forward_keeping_deep_features`, the same
    pass handing back its deep features, and :meth:`forward_outer_layers`, only the outermost layers on
    deep features kept from an earlier pass.
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
        self, sample: torch.Tensor, timestep: torch.Tensor | float, conditions: DiffusionConditions
    ) -> torch.Tensor:
        """Predict the flow-matching velocity of a clip with the whole net.

        Args:
            sample: (batch, C, frames, h, w) noisy latents; the batch holds the guidance halves.
            timestep: the flow-matching timestep (0..1000): one for the whole batch, or one per batch item.
            conditions: what the frames are conditioned on, one item per batch item
                (:class:`memo.models.conditions.DiffusionConditions`); with ``conditions.update_memory`` the
                reference's past frames are folded into the temporal memory first (once per clip).

        Returns:
            (batch, out_channels, frames, h, w) velocity.

        Raises:
            ValueError: a timestep count that is neither 1 nor the batch.
        """
        ctx = self._frame_context(sample, timestep, conditions)
        x, skips = self._down_and_mid(sample, conditions.reference, ctx)
        x = self._up(x, skips, conditions.reference, ctx)
        return self._output(x, sample)

    def forward_keeping_deep_features(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        conditions: DiffusionConditions,
        outer_layers: int = 2,
    ) -> tuple[torch.Tensor, DeepFeatures]:
        """:meth:`forward` (same result) that also hands back what enters the last ``outer_layers`` layers of
        the last up block, for :meth:`forward_outer_layers` to start from (``sampling/deep_cache.py``).

        Raises:
            ValueError: ``outer_layers`` is not 1..(layers of the last up block).
        """
        layers = len(self.up_blocks[-1].resnets)
        if not 1 <= outer_layers <= layers:
            raise ValueError(f"outer_layers must be 1..{layers} (layers of the last up block), got {outer_layers}.")
        reference = conditions.reference
        ctx = self._frame_context(sample, timestep, conditions)
        x, skips = self._down_and_mid(sample, reference, ctx)
        x, skips = self._up(x, skips, reference, ctx, keep_outer=outer_layers)
        deep = DeepFeatures(hidden=x, audio=ctx.audio, outer_layers=outer_layers)
        x = self._outer_layers(x, skips, reference, ctx, outer_layers)
        return self._output(x, sample), deep

    def forward_outer_layers(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        conditions: DiffusionConditions,
        deep_features: DeepFeatures,
    ) -> torch.Tensor:
        """Only the outer layers, on ``deep_features`` of an earlier whole pass (DeepCache, arXiv 2312.00858):
        the input convolution, the first ``outer_layers - 1`` layers of the first down block (whose outputs
        are the outer layers' skips), the last ``outer_layers`` layers of the last up block, the output layers.

        Arguments as in :meth:`forward`; the memory is only read. ``deep_features`` must come from a pass
        with the same batch, frames and latent size.

        Raises:
            ValueError: ``conditions.update_memory`` is set (a step that writes the memory runs whole).
        """
        if conditions.update_memory:
            raise ValueError("An outer-layers pass cannot update the memory: the step that does runs the whole net.")
        reference = conditions.reference
        ctx = self._frame_context(sample, timestep, conditions)
        outer_layers = deep_features.outer_layers
        x = self.conv_in(sample.transpose(1, 2).flatten(0, 1))
        _, block_skips = self.down_blocks[0](x, reference.down[0], ctx, num_layers=outer_layers - 1)
        ctx.audio = deep_features.audio
        x = self._outer_layers(deep_features.hidden, [x, *block_skips], reference, ctx, outer_layers)
        return self._output(x, sample)

    # -- the pieces of the passes ------------------------------------------------------------------

    def _frame_context(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, conditions: DiffusionConditions
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
            image_tokens=conditions.image_tokens,
            emotion=conditions.emotion.reshape(-1).to(device=sample.device, dtype=torch.long),
            memory=conditions.memory,
            update_memory=conditions.update_memory,
            drop_reference=conditions.drop_reference,
            audio=conditions.audio_tokens.flatten(0, 1).float(),
            item=conditions.reference.item,
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
