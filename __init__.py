"""ComfyUI-AutoencoderKL: KL-VAE nodes for ComfyUI (entry point the host imports).

Registers nodes only when the host is importable, so the package (and vae_core) import anywhere.
Also adds this pack's models/vae folder to the host's "vae" model folders.
"""
import logging
import os

_HERE = os.path.dirname(os.path.abspath(__file__))

try:
    import folder_paths  # the host; absent outside ComfyUI
except ImportError:
    folder_paths = None

if folder_paths is not None:
    _models = os.path.join(_HERE, "models", "vae")
    if os.path.isdir(_models):
        folder_paths.add_model_folder_path("vae", _models)
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    logging.getLogger(__name__).debug("ComfyUI not importable: no nodes registered")
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}

# The web extension (web/) reads the nodes' UI outputs; served only when present.
if os.path.isdir(os.path.join(_HERE, "web")):
    WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
