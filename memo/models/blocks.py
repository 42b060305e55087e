"""The diffusion net's down, mid and up blocks.

Every layer runs, in order: a resnet; where the block has attention, the spatial transformer (joined by the
reference image) and the audio module; where the resolution has one, the temporal memory module. Frames
travel flattened as (batch*frames, C, H, W), so resnets, samplers and convolutions are diffusers' own 2D
blocks applied to every frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn

from memo.models.audio_module import AudioModule
from memo.models.spatial import SpatialTransformer
from memo.models.temporal_memory import MemoryLinearAttention, TemporalMemory, TemporalMemoryModule


@dataclass
class FrameContext:
    """What every layer of one diffusion-net call needs besides its hidden states."""

    batch: int
    temb: torch.Tensor
    image_tokens: torch.Tensor
    emotion: torch.Tensor
    memory: TemporalMemory
    update_memory: bool
    drop_reference: tuple[bool, ...] | None
    audio: torch.Tensor | None = None
    item: int | None = None  # ReferenceFeatures.item: the one guidance item computed alone, if any


@dataclass(frozen=True)
class BlockSpec:
    """The shape of one block: channels, layer count, and which modules its layers hold."""

    in_channels: int
    out_channels: int
    num_layers: int
    with_attention: bool
    with_motion: bool
    resample: bool
    prev_channels: int = 0
    is_final: bool = False


@dataclass(frozen=True)
class NetSpec:
    """Sizes shared by all blocks of a diffusion net."""

    temb_channels: int
    heads: int
    cross_attention_dim: int
    audio_dim: int
    norm_num_groups: int
    norm_eps: float
    emo_drop_rate: float
    motion_kwargs: dict
    downsample_padding: int = 1
    output_scale_factor: float = 1.0


def _resnet(net: NetSpec, in_channels: int, out_channels: int) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=in_channels,
        out_channels=out_channels,
        temb_channels=net.temb_channels,
        eps=net.norm_eps,
        groups=net.norm_num_groups,
        non_linearity="silu",
        output_scale_factor=net.output_scale_factor,
    )


GUIDANCE_BATCH = 2
"""Items of a guidance batch (unconditional, conditional): the batch of reference features computed for a
diffusion-net call that runs one item of it alone (``FrameContext.item``)."""


def _reference_frame(feature: torch.Tensor, ctx: FrameContext) -> torch.Tensor | None:
    """The reference image's tokens in a reference-net feature of (batch*(1+past), ...), one row per item,
    in the order frame row i joins them (row i meets row i mod items); None for layers without attention,
    whose features only feed the memory.

    For one item of a guidance batch computed alone (``ctx.item``), the rows are those of the whole batch,
    turned so that its frames meet them as its rows of the batch of two did."""
    if feature.dim() != 3:
        return None
    if ctx.item is None:
        return feature.unflatten(0, (ctx.batch, -1))[:, 0]
    references = feature.unflatten(0, (GUIDANCE_BATCH, -1))[:, 0]
    first_row = ctx.item * ctx.temb.shape[0] // ctx.batch  # the row of its first frame in the batch of two
    return references.roll(-first_row, 0)


def _past_frames(feature: torch.Tensor, ctx: FrameContext, hw: tuple[int, int]) -> torch.Tensor:
    """The past frames of a reference-net feature as maps (batch*past, C, H, W), of ``ctx.item`` alone if set."""
    if feature.dim() == 3:
        n, _, c = feature.shape
        feature = feature.reshape(n, *hw, c).permute(0, 3, 1, 2)
    if ctx.item is None:
        return feature.unflatten(0, (ctx.batch, -1))[:, 1:].flatten(0, 1)
    return feature.unflatten(0, (GUIDANCE_BATCH, -1))[ctx.item, 1:].clone(
        memory_format=torch.contiguous_format
    )  # laid out as the copy above


class LayerStack(nn.Module):
    """Shared per-layer conditioning (spatial + audio + temporal) of a block's layers.

    With ``gradient_checkpointing`` on (``DiffusionNet.enable_gradient_checkpointing()``), each resnet, each
    spatial + audio pair and each temporal module is recomputed in the backward pass instead of keeping its
    activations.
    """

    attentions: nn.ModuleList
    audio_modules: nn.ModuleList
    motion_modules: nn.ModuleList
    gradient_checkpointing = False

    def _run(self, fn, *args):
        """``fn(*args)``, checkpointed when gradient checkpointing is on and gradients are being recorded."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(fn, *args)
        return fn(*args)

    def _build_conditioning(self, net: NetSpec, spec: BlockSpec, channels: int, audio_channels: list[int]) -> None:
        if spec.with_attention:
            self.attentions = nn.ModuleList(
                SpatialTransformer(channels, net.heads, net.cross_attention_dim, net.norm_num_groups)
                for _ in range(spec.num_layers)
            )
            self.audio_modules = nn.ModuleList(
                AudioModule(
                    channels,
                    inner,
                    net.heads,
                    net.audio_dim,
                    net.norm_num_groups,
                    net.emo_drop_rate,
                    is_final=spec.is_final and i == spec.num_layers - 1,
                )
                for i, inner in enumerate(audio_channels)
            )
        if spec.with_motion:
            self.motion_modules = nn.ModuleList(
                TemporalMemoryModule(channels, **net.motion_kwargs) for _ in range(spec.num_layers)
            )

    def _condition(self, i: int, x: torch.Tensor, feature: torch.Tensor, ctx: FrameContext) -> torch.Tensor:
        """Spatial attention with the reference, the audio module, then the temporal memory of layer ``i``."""
        reference = _reference_frame(feature, ctx)
        if hasattr(self, "attentions"):
            x, ctx.audio = self._run(
                self._spatial_audio,
                i,
                x,
                reference,
                ctx.image_tokens,
                ctx.audio,
                ctx.emotion,
                ctx.batch,
                ctx.drop_reference,
            )
        if hasattr(self, "motion_modules"):
            past = _past_frames(feature, ctx, x.shape[-2:]) if ctx.update_memory else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # A recomputation must not fold the past frames into the caller's memory a second time, so the
                # checkpointed call works on a copy of this layer's memory entries and hands back the new ones.
                names = [
                    m.memory_name for m in self.motion_modules[i].modules() if isinstance(m, MemoryLinearAttention)
                ]
                held = {name: ctx.memory.states[name] for name in names if name in ctx.memory.states}
                x, states = self._run(self._temporal, i, x, past, ctx.batch, ctx.memory.decay, held)
                ctx.memory.states.update(states)
            else:
                x = self.motion_modules[i](x, ctx.batch, past, ctx.memory)
        return x

    def _spatial_audio(self, i, x, reference, image_tokens, audio, emotion, batch, drop_reference):
        x = self.attentions[i](x, reference, image_tokens, batch, drop_reference)
        return self.audio_modules[i](x, audio, emotion)

    def _temporal(self, i, x, past, batch, decay, held):
        memory = TemporalMemory(decay)
        memory.states.update(held)
        x = self.motion_modules[i](x, batch, past, memory)
        return x, dict(memory.states)


class DownBlock3D(LayerStack):
    """Resnet layers (with attention and audio where ``with_attention``) and a strided-conv downsampler."""

    def __init__(self, net: NetSpec, spec: BlockSpec):
        super().__init__()
        channels = [spec.in_channels] + [spec.out_channels] * (spec.num_layers - 1)
        self.resnets = nn.ModuleList(_resnet(net, c, spec.out_channels) for c in channels)
        # As published, a down block's audio modules are as wide as each layer's input.
        self._build_conditioning(net, spec, spec.out_channels, channels)
        self.downsamplers = (
            nn.ModuleList(
                [
                    Downsample2D(
                        spec.out_channels,
                        use_conv=True,
                        out_channels=spec.out_channels,
                        padding=net.downsample_padding,
                        name="op",
                    )
                ]
            )
            if spec.resample
            else None
        )

    def forward(
        self, x: torch.Tensor, features: list[torch.Tensor], ctx: FrameContext, num_layers: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the whole block, or only its first ``num_layers`` layers and not the downsampler."""
        skips = []
        for i, resnet in enumerate(self.resnets[:num_layers]):
            x = self._condition(i, self._run(resnet, x, ctx.temb), features[i], ctx)
            skips.append(x)
        if self.downsamplers is not None and num_layers is None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock3D(LayerStack):
    """A resnet, then layers of (attention, audio, temporal, resnet)."""

    def __init__(self, net: NetSpec, channels: int, num_layers: int = 1):
        super().__init__()
        spec = BlockSpec(channels, channels, num_layers, with_attention=True, with_motion=True, resample=False)
        self.resnets = nn.ModuleList(_resnet(net, channels, channels) for _ in range(num_layers + 1))
        self._build_conditioning(net, spec, channels, [channels] * num_layers)

    def forward(self, x: torch.Tensor, features: list[torch.Tensor], ctx: FrameContext) -> torch.Tensor:
        x = self._run(self.resnets[0], x, ctx.temb)
        for i, resnet in enumerate(self.resnets[1:]):
            x = self._run(resnet, self._condition(i, x, features[i], ctx), ctx.temb)
        return x


class UpBlock3D(LayerStack):
    """Resnet layers over the hidden state joined with a skip connection, then a nearest-2x upsampler."""

    def __init__(self, net: NetSpec, spec: BlockSpec):
        super().__init__()
        resnets = []
        for i in range(spec.num_layers):
            skip = spec.in_channels if i == spec.num_layers - 1 else spec.out_channels
            previous = spec.prev_channels if i == 0 else spec.out_channels
            resnets.append(_resnet(net, previous + skip, spec.out_channels))
        self.resnets = nn.ModuleList(resnets)
        # As published, an up block's audio modules are as wide as the block's skip input.
        self._build_conditioning(net, spec, spec.out_channels, [spec.in_channels] * spec.num_layers)
        self.upsamplers = (
            nn.ModuleList([Upsample2D(spec.out_channels, use_conv=True, out_channels=spec.out_channels)])
            if spec.resample
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        features: list[torch.Tensor],
        skips: list[torch.Tensor],
        ctx: FrameContext,
        upsample_size: tuple[int, int] | None,
        layers: range | None = None,
    ) -> torch.Tensor:
        """Run the block, or only the consecutive ``layers`` (the upsampler runs after the last layer)."""
        layers = range(len(self.resnets)) if layers is None else layers
        for i in layers:
            x = self._run(self.resnets[i], torch.cat([x, skips.pop()], dim=1), ctx.temb)
            x = self._condition(i, x, features[i], ctx)
        if self.upsamplers is not None and layers.stop == len(self.resnets):
            x = self.upsamplers[0](x, upsample_size)
        return x
