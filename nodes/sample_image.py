"""The "AutoencoderKL Sample Image" node: loads a photo bundled with the pack (models/samples/), so
the example workflows run as loaded on a fresh install. Not a general image loader (use the host's
Load Image for your own pictures); it never reads or writes the host's input folder."""
from __future__ import annotations

import os
from typing import List

import numpy as np
import torch
from PIL import Image

from .cache import file_signature

SAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "samples")
DEFAULT_SAMPLE = "chelsea.png"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def sample_names() -> List[str]:
    """The bundled photos, by file name (the licence file and anything else are left out)."""
    if not os.path.isdir(SAMPLES_DIR):
        return []
    return sorted(f for f in os.listdir(SAMPLES_DIR) if f.lower().endswith(IMAGE_EXTENSIONS))


def sample_path(name: str) -> str:
    """The path of a bundled photo; only names that sample_names() lists are accepted."""
    names = sample_names()
    if name not in names:
        raise ValueError(f"AutoencoderKL Sample Image: image={name!r} is not a photo bundled in {SAMPLES_DIR}; "
                         f"choose one of {names} (for your own pictures use the host's Load Image node)")
    return os.path.join(SAMPLES_DIR, name)


class AutoencoderKLSampleImage:
    DESCRIPTION = ("Loads a photo that ships with the pack (models/samples, CC0), so the example workflows run "
                   "without copying a file into ComfyUI's input folder. Use the host's Load Image for your own "
                   "pictures.")
    CATEGORY = "latent/AutoencoderKL"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The photo as IMAGE [1, H, W, 3] in [0, 1].",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = sample_names()
        default = DEFAULT_SAMPLE if DEFAULT_SAMPLE in names else (names[0] if names else DEFAULT_SAMPLE)
        return {
            "required": {
                "image": (names, {"default": default, "tooltip": "A photo bundled with the pack in its "
                          "models/samples folder (see models/samples/LICENSE.md for its source and licence)."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, image):
        try:
            return f"{image}|{file_signature(sample_path(image))}"
        except (OSError, ValueError):  # missing or refused: run again so that the error is reported
            return float("nan")

    def load(self, image: str):
        path = sample_path(image)
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
        return (torch.from_numpy(rgb)[None],)  # (1, H, W, 3)
