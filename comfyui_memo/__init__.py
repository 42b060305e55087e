"""MEMO for ComfyUI: a portrait and a voice in, a talking video out.

Link or copy this folder into ``ComfyUI/custom_nodes/`` after installing the ``memo-avatar`` package into
ComfyUI's Python (see the README's ComfyUI section). ComfyUI imports this module and reads its two mappings.
"""

if __name__ == "memo":
    # Older ComfyUI imports a custom node under its folder name, which would hide the memo package itself.
    raise ImportError(
        "The MEMO node pack is in a custom_nodes folder named 'memo', which hides the memo package it runs on; "
        "rename the folder or link (e.g. custom_nodes/ComfyUI-MEMO) and restart ComfyUI."
    )

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
