"""Published config keys that the networks do not take as arguments.

The published ``config.json`` files carry every option of the diffusers classes they were saved from. The
options this implementation does not vary are checked to hold the one value it computes (so an edited
config fails loudly instead of computing something else) and then dropped before the config reaches
``__init__``; keys that only matter for other settings are dropped whatever their value.
"""

from __future__ import annotations

from typing import Any

UNET_FIXED_SETTINGS: dict[str, Any] = {
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "attention_type": "default",
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "dropout": 0.0,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "mid_block_only_cross_attention": None,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": 1,
    "upcast_attention": False,
    "use_linear_projection": False,
}

DIFFUSION_NET_FIXED_SETTINGS: dict[str, Any] = {
    **UNET_FIXED_SETTINGS,
    "act_fn": "silu",
    "mid_block_type": "UNetMidBlock3DCrossAttn",
    "unet_use_cross_frame_attention": False,
    "unet_use_temporal_attention": False,
    "use_inflated_groupnorm": True,
}

REFERENCE_NET_FIXED_SETTINGS: dict[str, Any] = {**UNET_FIXED_SETTINGS, "mid_block_type": "UNetMidBlock2DCrossAttn"}


def strip_fixed_settings(
    class_name: str, config: dict[str, Any], fixed: dict[str, Any], irrelevant: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Return ``config`` without the fixed settings (checked to hold their supported value) and without the
    ``irrelevant`` keys, which do not affect what the network computes."""
    for key, supported in fixed.items():
        if key in config and config[key] != supported and not (supported is None and config[key] in ("", None)):
            raise NotImplementedError(
                f"{class_name}: config sets {key}={config[key]!r}; this implementation computes only "
                f"{key}={supported!r}, the published value."
            )
    return {k: v for k, v in config.items() if k not in fixed and k not in irrelevant}
