"""The ComfyUI-facing side of the pack: node classes, the host VAE wrapper, run helpers.

Imports the host (comfy, folder_paths); vae_core never does. grid.py alone is host-free.
"""
from .node_classes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
