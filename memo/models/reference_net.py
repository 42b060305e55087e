"""Reference net: a 2D UNet over the reference image and the past frames that returns per-layer features.

It is Stable Diffusion's UNet2DConditionModel (diffusers' own blocks) run at timestep 0 on the latents of
the reference image and the past frames, stopped at the last transformer norm it needs. What the diffusion
net reads from it, layer by layer: in layers with attention, the first normalised hidden state of the
transformer block (its ``norm1`` output); in layers without, the resnet output. The parts after the last
such feature (the last block's attention and feed-forward, the output norm and convolution) are not built,
so the published weights load with no missing or unexpected key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block, get_up_block
from torch import nn

from memo.models.published_config import REFERENCE_NET_FIXED_SETTINGS, strip_fixed_settings


@dataclass
class ReferenceFeatures:
    """Per-layer features: ``down[block][layer]``, ``mid[layer]``, ``up[block][layer]``.

    Attention layers give (batch*frames, H*W, C) tokens, the others (batch*frames, C, H, W) maps.

    ``item``: None when the diffusion net's batch is the batch of these features; else the features are of
    a guidance batch of two (unconditional, conditional) and the diffusion net computes that one item of it
    alone (guidance-parallel generation, ``memo/runtime/parallel.py``): its frames join the reference
    frames as they would in the batch of two, and its temporal memory takes its own past frames.
    """

    down: list[list[torch.Tensor]]
    mid: list[torch.Tensor]
    up: list[list[torch.Tensor]]
    item: int | None = None


def _transformer_features(
    transformer: Transformer2DModel, x: torch.Tensor, context: torch.Tensor, features: list[torch.Tensor]
) -> torch.Tensor | None:
    """Run a Transformer2DModel, appending each block's ``norm1`` output; None when its tail is pruned."""
    n, _, h, w = x.shape
    tokens = transformer.proj_in(transformer.norm(x))
    inner = tokens.shape[1]
    tokens = tokens.permute(0, 2, 3, 1).reshape(n, h * w, inner)
    for block in transformer.transformer_blocks:
        features.append(block.norm1(tokens))
        if not hasattr(block, "attn1"):
            return None
        tokens = block(tokens, encoder_hidden_states=context)
    tokens = tokens.reshape(n, h, w, inner).permute(0, 3, 1, 2)
    return transformer.proj_out(tokens) + x


def _transformer_step(transformer: Transformer2DModel, x: torch.Tensor, context: torch.Tensor):
    """:func:`_transformer_features` without side effects (so that it can be checkpointed): (output, features)."""
    features: list[torch.Tensor] = []
    return _transformer_features(transformer, x, context, features), features


class ReferenceNet(ModelMixin, ConfigMixin):
    """The reference net of MEMO (published as ``reference_net/``, class name UNet2DConditionModel).

    ``enable_gradient_checkpointing()`` recomputes each resnet and transformer in the backward pass.
    """

    _supports_gradient_checkpointing = True

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """Check and drop the published settings this class does not take (see ``published_config``)."""
        config_dict = strip_fixed_settings(
            cls.__name__, config_dict, REFERENCE_NET_FIXED_SETTINGS, ("addition_embed_type_num_heads", "out_channels")
        )
        return super().extract_init_dict(config_dict, **kwargs)

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types: tuple[str, ...] = (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        attention_head_dim: int = 8,
        sample_size: int | None = None,
    ):
        super().__init__()
        self.gradient_checkpointing = False
        heads = attention_head_dim  # diffusers' historical naming: this number is the head count
        time_dim = block_out_channels[0] * 4
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_dim)

        common = dict(
            temb_channels=time_dim,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            cross_attention_dim=cross_attention_dim,
            num_attention_heads=heads,
        )
        self.down_blocks = nn.ModuleList()
        out_ch = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    add_downsample=i < len(block_out_channels) - 1,
                    downsample_padding=downsample_padding,
                    attention_head_dim=out_ch // heads,
                    **common,
                )
            )
        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=block_out_channels[-1],
            temb_channels=time_dim,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            output_scale_factor=mid_block_scale_factor,
            cross_attention_dim=cross_attention_dim,
            num_attention_heads=heads,
        )
        reversed_channels = list(reversed(block_out_channels))
        self.up_blocks = nn.ModuleList()
        out_ch = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            prev_ch, out_ch = out_ch, reversed_channels[i]
            self.up_blocks.append(
                get_up_block(
                    block_type,
                    num_layers=layers_per_block + 1,
                    in_channels=reversed_channels[min(i + 1, len(block_out_channels) - 1)],
                    out_channels=out_ch,
                    prev_output_channel=prev_ch,
                    add_upsample=i < len(block_out_channels) - 1,
                    resolution_idx=i,
                    attention_head_dim=out_ch // heads,
                    **common,
                )
            )
        self._prune_unused_tail()

    def _prune_unused_tail(self) -> None:
        """Drop what lies after the last feature the diffusion net reads (absent from the checkpoint)."""
        last = self.up_blocks[-1]
        if not hasattr(last, "attentions"):
            return
        transformer = last.attentions[-1]
        del transformer.proj_out
        block = transformer.transformer_blocks[-1]
        for name in ("attn1", "norm2", "attn2", "norm3", "ff"):
            if getattr(block, name, None) is not None:
                delattr(block, name)

    def _run(self, fn, *args):
        """``fn(*args)``, checkpointed when gradient checkpointing is on and gradients are being recorded."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(fn, *args)
        return fn(*args)

    def _attend(
        self, attention: Transformer2DModel, x: torch.Tensor, context: torch.Tensor, features: list[torch.Tensor]
    ):
        x, new_features = self._run(_transformer_step, attention, x, context)
        features.extend(new_features)
        return x

    def _layer(self, resnet, attention, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, features: list):
        """A resnet and its attention (if any), recording the feature the diffusion net reads from the layer."""
        x = self._run(resnet, x, temb)
        if attention is None:
            features.append(x)
            return x
        return self._attend(attention, x, context, features)

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor
    ) -> ReferenceFeatures:
        """latents: (N, 4, h, w); context: (N, tokens, dim) image tokens, one set per latent."""
        timesteps = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(latents.shape[0])
        temb = self.time_embedding(self.time_proj(timesteps).to(latents.dtype))

        x = self.conv_in(latents)
        skips = [x]
        down: list[list[torch.Tensor]] = []
        for block in self.down_blocks:
            features: list[torch.Tensor] = []
            attentions = getattr(block, "attentions", [None] * len(block.resnets))
            for resnet, attention in zip(block.resnets, attentions):
                x = self._layer(resnet, attention, x, temb, context, features)
                skips.append(x)
            for downsampler in block.downsamplers or []:
                x = downsampler(x)
                skips.append(x)
            down.append(features)

        mid: list[torch.Tensor] = []
        x = self._run(self.mid_block.resnets[0], x, temb)
        for attention, resnet in zip(self.mid_block.attentions, self.mid_block.resnets[1:]):
            x = self._run(resnet, self._attend(attention, x, context, mid), temb)

        up: list[list[torch.Tensor]] = []
        for block in self.up_blocks:
            features = []
            attentions = getattr(block, "attentions", [None] * len(block.resnets))
            for resnet, attention in zip(block.resnets, attentions):
                x = self._layer(resnet, attention, torch.cat([x, skips.pop()], dim=1), temb, context, features)
            if block.upsamplers is not None:
                size = skips[-1].shape[2:] if skips else None
                for upsampler in block.upsamplers:
                    x = upsampler(x, size)
            up.append(features)
        return ReferenceFeatures(down=down, mid=mid, up=up)
