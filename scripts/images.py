"""The openly licensed photos bundled in scikit-image's wheel that train and test the shipped demo VAE.

Only images whose files ship inside the wheel are listed (no pooch download, no network);
this is a data table plus two loaders, not a data pipeline.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class SampleImage:
    name: str  # the skimage.data function that returns it
    split: str  # "train" or "test" (held out from training)
    licence: str  # as stated in the skimage.data docstring
    source: str  # where skimage took it from, per the same docstring
    max_side: int = 0  # downscale (Lanczos) so the longer side is at most this; 0 keeps it


# Licences and sources are quoted from the docstrings of scikit-image 0.26.0 `skimage.data`.
# Held out: chelsea and coffee, two colour photos whose subjects (fur, porcelain, wood grain)
# appear in no training image. Grey images train texture and edges; they are fed as RGB.
IMAGES: Tuple[SampleImage, ...] = (
    SampleImage("astronaut", "train", "public domain (no known copyright restrictions)",
                "NASA Great Images database, https://flic.kr/p/r9qvLn"),
    SampleImage("rocket", "train", "public domain (released by SpaceX)",
                "SpaceX Photos, https://www.flickr.com/photos/spacexphotos/16511594820/"),
    SampleImage("hubble_deep_field", "train", "public domain (NASA media guidelines)",
                "HubbleSite, http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/"),
    SampleImage("immunohistochemistry", "train", "no known copyright restrictions",
                "Center for Microscopy And Molecular Imaging (CMMI)"),
    SampleImage("retina", "train", "CC0 1.0",
                "Wikimedia Commons, File:Fundus_photograph_of_normal_left_eye.jpg (Mikael Haggstrom)",
                max_side=512),
    SampleImage("camera", "train", "CC0 (photographer Lav Varshney)", "scikit-image"),
    SampleImage("coins", "train", "no known copyright restrictions",
                "Brooklyn Museum Collection, https://www.brooklynmuseum.org/opencollection/archives/image/51611"),
    SampleImage("brick", "train", "CC0", "CC0Textures, https://cc0textures.com/view.php?tex=Bricks25"),
    SampleImage("grass", "train", "CC0", "DeviantArt, https://www.deviantart.com/linolafett/art/Grass-01-434853879"),
    SampleImage("gravel", "train", "CC0", "CC0Textures, https://cc0textures.com/view.php?tex=Gravel04"),
    SampleImage("chelsea", "test", "CC0 (photographer Stefan van der Walt)", "scikit-image"),
    SampleImage("coffee", "test", "CC0 (photographer Rachel Michetti; courtesy of Pikolo Espresso Bar)",
                "scikit-image"),
)

BY_NAME: Dict[str, SampleImage] = {im.name: im for im in IMAGES}


def load_rgb(name: str) -> np.ndarray:
    """The named image as (H, W, 3) uint8 RGB; grey images are repeated to three channels."""
    from PIL import Image
    import skimage.data

    info = BY_NAME[name]
    arr = np.asarray(getattr(skimage.data, name)())
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name}() returned {arr.dtype}, expected uint8")
    if info.max_side and max(arr.shape[:2]) > info.max_side:
        h, w = arr.shape[:2]
        s = info.max_side / max(h, w)
        arr = np.asarray(Image.fromarray(arr).resize((round(w * s), round(h * s)), Image.LANCZOS))
    return np.ascontiguousarray(arr)


def names(split: str) -> List[str]:
    return [im.name for im in IMAGES if im.split == split]


def center_crop_multiple(arr: np.ndarray, multiple: int = 8) -> np.ndarray:
    """Centre crop (H, W, ...) so both sides are multiples of `multiple` (the VAE's downscale factor)."""
    h, w = arr.shape[:2]
    nh, nw = h - h % multiple, w - w % multiple
    top, left = (h - nh) // 2, (w - nw) // 2
    return arr[top : top + nh, left : left + nw]
