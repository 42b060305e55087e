"""emotion2vec speech-emotion encoder (data2vec 2.0 audio backbone) in plain torch.

MEMO pools this encoder's features over time and feeds them to its emotion classifier. The original release
runs it through funasr/modelscope; this module loads the same published ``config.yaml`` + ``model.pt`` with
nothing but torch and omegaconf, and computes the same features (eval mode, no masking, no padding mask).

Module names mirror the published checkpoint (``d2v_model.`` prefix removed) so its state dict loads as is.
Only the inference path is built: no pretraining decoder, no EMA teacher, no 9-way ``proj`` head.
"""

from __future__ import annotations

import ast
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from memo.constants import SAMPLE_RATE
from memo.io.hub import EMOTION2VEC_FILES, EMOTION2VEC_REPO, resolve_model_dir
from memo.io.model_files import ModelFolder
from memo.io.model_load import ModelSpec, Shapes, load_model, read_torch_file

DEFAULT_REPO = EMOTION2VEC_REPO
CHECKPOINT_PREFIX = "d2v_model."
UNUSED_HEAD_PREFIX = "proj."


def _parse_conv_spec(spec: str) -> list[tuple[int, int, int]]:
    """Parse a ``feature_encoder_spec`` such as ``'[(512, 10, 5)] + [(512, 3, 2)] * 4'`` without ``eval``.

    Only int literals, tuples, lists, ``+`` and ``*`` are accepted, so a config file cannot run code.
    """

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Tuple):
            return tuple(value(item) for item in node.elts)
        if isinstance(node, ast.List):
            return [value(item) for item in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported element {ast.dump(node)!r}")

    try:
        layers = value(ast.parse(spec, mode="eval"))
    except (SyntaxError, ValueError, TypeError) as error:
        raise ValueError(f"Cannot parse feature_encoder_spec {spec!r}: {error}") from error
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"feature_encoder_spec {spec!r} must be a non-empty list of (channels, kernel, stride)")
    for layer in layers:
        if not (isinstance(layer, tuple) and len(layer) == 3 and all(isinstance(v, int) and v > 0 for v in layer)):
            raise ValueError(f"feature_encoder_spec {spec!r}: {layer!r} is not (channels, kernel, stride)")
    return layers


def _alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's geometric per-head slopes: 2^(-8 (h+1) / n) for a power-of-two n, interleaved otherwise."""

    def power_of_two(n: int) -> list[float]:
        first = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [first ** (h + 1) for h in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    lower = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(lower) + _alibi_slopes(2 * lower)[0::2][: num_heads - lower]


@dataclass(frozen=True)
class Emotion2VecConfig:
    """The sizes and flags of ``model_conf`` (and its ``modalities.audio``) that inference depends on."""

    embed_dim: int
    num_heads: int
    depth: int
    mlp_ratio: float
    norm_eps: float
    norm_affine: bool
    normalize: bool
    conv_layers: tuple[tuple[int, int, int], ...]
    conv_pos_width: int
    conv_pos_depth: int
    conv_pos_groups: int
    num_extra_tokens: int
    prenet_depth: int
    num_alibi_heads: int
    use_alibi: bool
    alibi_scale_init: float
    alibi_scale_per_head: bool

    @classmethod
    def from_model_conf(cls, model_conf: Mapping[str, Any] | DictConfig) -> Emotion2VecConfig:
        """Read ``model_conf``; refuse variants whose weights or computation this module does not implement."""
        conf = model_conf if isinstance(model_conf, DictConfig) else OmegaConf.create(dict(model_conf))
        audio = conf.modalities.audio
        unsupported = {
            "model_conf.layer_norm_first": bool(conf.get("layer_norm_first", False)),
            "audio.extractor_mode != 'layer_norm'": audio.get("extractor_mode", "layer_norm") != "layer_norm",
            "audio.conv_pos_pre_ln": bool(audio.get("conv_pos_pre_ln", False)),
            "audio.learned_alibi": bool(audio.get("learned_alibi", False)),
            "audio.learned_alibi_scale_per_layer": bool(audio.get("learned_alibi_scale_per_layer", False)),
            "audio.alibi_max_pos": audio.get("alibi_max_pos", None) is not None,
        }
        offending = [name for name, present in unsupported.items() if present]
        if offending:
            raise NotImplementedError(f"emotion2vec config options not supported: {', '.join(offending)}")
        return cls(
            embed_dim=int(conf.embed_dim),
            num_heads=int(conf.num_heads),
            depth=int(conf.depth),
            mlp_ratio=float(conf.mlp_ratio),
            norm_eps=float(conf.norm_eps),
            norm_affine=bool(conf.norm_affine),
            normalize=bool(conf.get("normalize", True)),
            conv_layers=tuple(_parse_conv_spec(str(audio.feature_encoder_spec))),
            conv_pos_width=int(audio.conv_pos_width),
            conv_pos_depth=int(audio.conv_pos_depth),
            conv_pos_groups=int(audio.conv_pos_groups),
            num_extra_tokens=int(audio.num_extra_tokens),
            prenet_depth=int(audio.prenet_depth),
            num_alibi_heads=int(audio.num_alibi_heads),
            use_alibi=bool(audio.use_alibi_encoder),
            alibi_scale_init=float(audio.alibi_scale),
            alibi_scale_per_head=bool(audio.learned_alibi_scale_per_head),
        )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Emotion2VecConfig:
        """Read the published ``config.yaml`` (a funasr config whose ``model_conf`` holds the model)."""
        return cls.from_model_conf(OmegaConf.load(path).model_conf)


class _TransposeLast(nn.Module):
    """Swap the last two dimensions: (B, C, T) <-> (B, T, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-2, -1)


class _Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype, as the conv feature extractor does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class _TrimForEvenKernel(nn.Module):
    """Drop the extra last step a symmetric padding of k // 2 leaves when the kernel k is even."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.trim = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : -self.trim] if self.trim else x


class _ConvFeatureExtractor(nn.Module):
    """Waveform (B, L) -> (B, C, T): strided Conv1d (no bias) -> channel LayerNorm -> GELU, per layer.

    The Identity stands where the original has a (disabled) dropout, keeping the checkpoint's indices.
    """

    def __init__(self, layers: tuple[tuple[int, int, int], ...]):
        super().__init__()
        blocks = []
        in_channels = 1
        for channels, kernel, stride in layers:
            blocks.append(
                nn.Sequential(
                    nn.Conv1d(in_channels, channels, kernel, stride=stride, bias=False),
                    nn.Identity(),
                    nn.Sequential(_TransposeLast(), _Fp32LayerNorm(channels), _TransposeLast()),
                    nn.GELU(),
                )
            )
            in_channels = channels
        self.conv_layers = nn.ModuleList(blocks)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = wav.unsqueeze(1)
        for block in self.conv_layers:
            x = block(x)
        return x


class _Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and an additive (ALiBi) bias."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class _Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """Post-norm transformer block: h = LN1(x + Attn(x)); out = LN2(h + MLP(h))."""

    def __init__(self, cfg: Emotion2VecConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)
        self.attn = _Attention(dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)
        self.mlp = _Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, bias))
        return self.norm2(x + self.mlp(x))


class _ContextEncoder(nn.Module):
    """The audio prenet: a LayerNorm on the input, then ``prenet_depth`` blocks."""

    def __init__(self, cfg: Emotion2VecConfig):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.prenet_depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = self.norm(x)
        for block in self.blocks:
            x = block(x, bias)
        return x


class _AudioEncoder(nn.Module):
    """The audio modality encoder: conv features, projection, positional conv, extra tokens, ALiBi, prenet."""

    def __init__(self, cfg: Emotion2VecConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        conv_channels = cfg.conv_layers[-1][0]
        self.local_encoder = _ConvFeatureExtractor(cfg.conv_layers)
        self.project_features = nn.Sequential(
            _TransposeLast(), nn.LayerNorm(conv_channels), nn.Linear(conv_channels, dim)
        )
        kernel = max(3, cfg.conv_pos_width // cfg.conv_pos_depth)
        self.relative_positional_encoder = nn.Sequential(
            _TransposeLast(),
            *[
                nn.Sequential(
                    nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=cfg.conv_pos_groups),
                    _TrimForEvenKernel(kernel),
                    _TransposeLast(),
                    nn.LayerNorm(dim, elementwise_affine=False),
                    _TransposeLast(),
                    nn.GELU(),
                )
                for _ in range(cfg.conv_pos_depth)
            ],
            _TransposeLast(),
        )
        self.context_encoder = _ContextEncoder(cfg)
        if cfg.num_extra_tokens > 0:
            self.extra_tokens = nn.Parameter(torch.zeros(1, cfg.num_extra_tokens, dim))
        else:
            self.register_parameter("extra_tokens", None)
        if cfg.use_alibi:
            heads = cfg.num_alibi_heads if cfg.alibi_scale_per_head else 1
            self.alibi_scale = nn.Parameter(torch.full((1, 1, heads, 1, 1), cfg.alibi_scale_init))
        else:
            self.register_parameter("alibi_scale", None)

    def alibi_bias(self, steps: int, device: torch.device) -> torch.Tensor | None:
        """(1, num_heads, N, N) float32 bias -slope_h * |i - j| * max(scale_h, 0), zero for the extra tokens."""
        if self.alibi_scale is None:
            return None
        slopes = torch.tensor(_alibi_slopes(self.cfg.num_alibi_heads), dtype=torch.float32, device=device)
        positions = torch.arange(steps, device=device)
        distance = (positions[None, :] - positions[:, None]).abs().neg().float()
        bias = slopes[:, None, None] * distance[None]
        bias = bias[None] * self.alibi_scale.float().clamp_min(0).squeeze(0)
        extra = self.cfg.num_extra_tokens
        missing_heads = self.cfg.num_heads - self.cfg.num_alibi_heads
        return F.pad(bias, (extra, 0, extra, 0, 0, max(missing_heads, 0)))


class Emotion2VecEncoder(nn.Module):
    """emotion2vec(+) encoder: 16 kHz waveform (B, L) -> feature sequence (B, T, D), T ~ 50 per second.

    Build it from the published ``config.yaml`` (:meth:`from_config`) or load config and weights together
    (:meth:`from_pretrained`). Inputs must be normalised per waveform as the original does
    (:meth:`normalize_waveform`); :meth:`utterance_features` does that and pools over time.
    """

    def __init__(self, cfg: Emotion2VecConfig):
        super().__init__()
        self.cfg = cfg
        self.modality_encoders = nn.ModuleDict({"AUDIO": _AudioEncoder(cfg)})
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.min_samples = self._min_samples(cfg.conv_layers)

    @staticmethod
    def _min_samples(layers: tuple[tuple[int, int, int], ...]) -> int:
        """Shortest waveform the strided convs turn into at least one feature frame."""
        length = 1
        for _, kernel, stride in reversed(layers):
            length = (length - 1) * stride + kernel
        return length

    @classmethod
    def from_config(cls, config: str | os.PathLike | Mapping[str, Any] | DictConfig) -> Emotion2VecEncoder:
        """Build an (uninitialised) encoder from a ``config.yaml`` path, a full config, or its ``model_conf``."""
        if isinstance(config, (str, os.PathLike)):
            config = OmegaConf.load(config)
        conf = config if isinstance(config, DictConfig) else OmegaConf.create(dict(config))
        return cls(Emotion2VecConfig.from_model_conf(conf.model_conf if "model_conf" in conf else conf))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_REPO,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> Emotion2VecEncoder:
        """Load ``config.yaml`` + ``model.pt`` from a local directory or a hub repo id, in eval mode.

        The checkpoint is read with ``weights_only=True`` (it is a pickle) and loaded strictly: every
        parameter must be present and every checkpoint tensor must be used, except the 9-way ``proj``
        head that MEMO does not need. Raises :class:`~memo.io.model_files.DamagedModelError` (one line) when a
        file is damaged or the weights do not fit the config (checked before they load, :meth:`spec`).
        """
        folder = resolve_model_dir(
            name_or_path,
            allow_patterns=list(EMOTION2VEC_FILES),
            revision=revision,
            cache_dir=cache_dir,
            setting="emotion2vec",
        )
        return load_model(cls.spec(ModelFolder("emotion2vec", str(name_or_path), folder, ()), device, dtype))

    @classmethod
    def spec(
        cls, model: ModelFolder, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> ModelSpec[Emotion2VecEncoder]:
        """How the ``config.yaml`` + ``model.pt`` of ``model.folder`` are checked and loaded
        (:mod:`memo.io.model_load`): the config builds the encoder, whose tensors the checkpoint must hold
        exactly (its ``proj`` head aside)."""

        def load() -> Emotion2VecEncoder:
            with torch.device("meta"):
                encoder = cls.from_config(model.folder / "config.yaml")
            encoder.load_published_state_dict(cls.read_checkpoint(model.folder / "model.pt"), assign=True)
            return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)

        return ModelSpec(
            model=model,
            config="config.yaml",
            weights="model.pt",
            build=cls.from_config,
            load=load,
            shapes=cls.checkpoint_shapes,
            kind=f"{cls.__module__}.{cls.__qualname__}",
            strict=True,
        )

    @classmethod
    def checkpoint_shapes(cls, path: str | os.PathLike) -> Shapes:
        """The encoder's tensors a published ``model.pt`` holds, by the encoder's names (``proj`` head left
        out), read through a memory map: the weights themselves are not read."""
        state = cls.read_checkpoint(path, mmap=True)
        return {
            key.removeprefix(CHECKPOINT_PREFIX): (None, tuple(tensor.shape))
            for key, tensor in state.items()
            if not key.startswith(UNUSED_HEAD_PREFIX)
        }

    @staticmethod
    def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, torch.Tensor]:
        """The raw state dict (``ckpt["model"]``) of a published fairseq/funasr ``model.pt``; ``mmap``: mapped,
        not read (a legacy, non-zip file is read whole)."""
        checkpoint = read_torch_file(path, mmap=mmap)
        state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
        if not isinstance(state, Mapping):
            raise ValueError("it is a PyTorch file but no emotion2vec checkpoint (it holds no 'model' state dict)")
        return dict(state)

    def load_published_state_dict(self, state: Mapping[str, torch.Tensor], assign: bool = False) -> None:
        """Load a published state dict: strip ``d2v_model.``, skip the ``proj.*`` head, refuse anything else."""
        wanted: dict[str, torch.Tensor] = {}
        unexpected: list[str] = []
        for key, tensor in state.items():
            if key.startswith(CHECKPOINT_PREFIX):
                wanted[key[len(CHECKPOINT_PREFIX) :]] = tensor
            elif not key.startswith(UNUSED_HEAD_PREFIX):
                unexpected.append(key)
        own = set(self.state_dict())
        missing = sorted(own - set(wanted))
        unexpected += sorted(set(wanted) - own)
        if missing or unexpected:
            raise ValueError(
                "emotion2vec checkpoint does not match the config: "
                f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
            )
        self.load_state_dict(wanted, strict=True, assign=assign)

    @property
    def embed_dim(self) -> int:
        """Width D of the features."""
        return self.cfg.embed_dim

    @staticmethod
    def normalize_waveform(wav: torch.Tensor) -> torch.Tensor:
        """Standardise each waveform on its own (zero mean, unit biased variance, eps 1e-5), in float32.

        For one waveform this is the original's ``F.layer_norm(wav, wav.shape)``; for (B, L) each row is
        normalised independently, which is what one-at-a-time processing would give.
        """
        wav = wav.float()
        return F.layer_norm(wav, wav.shape[-1:])

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """Normalised waveform (B, L) or (L,) at 16 kHz -> features (B, T, D), extra tokens dropped."""
        if wav.dim() == 1:
            wav = wav.unsqueeze(0)
        if wav.dim() != 2:
            raise ValueError(f"expected a (batch, samples) waveform, got shape {tuple(wav.shape)}")
        if wav.shape[-1] < self.min_samples:
            raise ValueError(
                f"waveform of {wav.shape[-1]} samples is shorter than the encoder's minimum of "
                f"{self.min_samples} samples ({self.min_samples / SAMPLE_RATE * 1000:.0f} ms at 16 kHz)"
            )
        audio = self.modality_encoders["AUDIO"]
        parameter = audio.project_features[2].weight
        x = audio.local_encoder(wav.to(device=parameter.device, dtype=parameter.dtype))
        x = audio.project_features(x)
        x = x + audio.relative_positional_encoder(x)
        bias = audio.alibi_bias(x.shape[1], x.device)
        if audio.extra_tokens is not None:
            x = torch.cat([audio.extra_tokens.expand(x.shape[0], -1, -1), x], dim=1)
        if bias is not None:
            bias = bias.to(x.dtype)
        x = audio.context_encoder(x, bias)
        for block in self.blocks:
            x = block(x, bias)
        return x[:, self.cfg.num_extra_tokens :]

    def mean_features(self, wav: torch.Tensor) -> torch.Tensor:
        """Normalised waveform (B, L) -> time-averaged features (B, D), the utterance embedding MEMO uses."""
        return self.forward(wav).mean(dim=1)

    def utterance_features(self, wav: torch.Tensor) -> torch.Tensor:
        """Raw waveform (B, L) or (L,) -> (B, D): normalise each waveform (if the config says so), then pool."""
        if self.cfg.normalize:
            wav = self.normalize_waveform(wav)
        return self.mean_features(wav)
