"""MEMO for ComfyUI: a portrait and a voice in, a talking video out.

Link or copy this folder into ``ComfyUI/custom_nodes/`` after installing the ``memo-avatar`` package into
ComfyUI's Python (see the README's ComfyUI section). ComfyUI imports this module and reads its two mappings.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
