"""Latent formats: the scale and shift each model family applies to raw VAE latents, as data.

A diffusion model sees `(z - shift_factor) * scaling_factor`. The VAE nodes never apply these:
the host's LATENT holds raw latents. Values are from each model's published VAE config.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple


@dataclasses.dataclass(frozen=True)
class LatentFormat:
    name: str  # short id accepted as `family=`
    label: str  # for people
    latent_channels: int
    scaling_factor: float
    shift_factor: Optional[float]
    sample_size: int  # diffusers' default tile size for the family
    # per-channel statistics (diffusers' latents_mean/latents_std), for the families that publish them
    latents_mean: Optional[Tuple[float, ...]] = None
    latents_std: Optional[Tuple[float, ...]] = None


FAMILIES = {
    # stabilityai/sd-vae-ft-mse, runwayml/stable-diffusion-v1-5 vae/config.json
    "sd1": LatentFormat("sd1", "SD1.x/2.x", 4, 0.18215, None, 512),
    # stabilityai/sdxl-vae config.json
    "sdxl": LatentFormat("sdxl", "SDXL", 4, 0.13025, None, 1024),
    # stabilityai/stable-diffusion-3-medium-diffusers vae/config.json
    "sd3": LatentFormat("sd3", "SD3/3.5", 16, 1.5305, 0.0609, 1024),
    # black-forest-labs/FLUX.1-dev vae/config.json
    "flux": LatentFormat("flux", "FLUX.1", 16, 0.3611, 0.1159, 1024),
    # playgroundai/playground-v2.5-1024px-aesthetic vae/config.json (the same numbers are ComfyUI's
    # latent_formats.SDXL_Playground_2_5; diffusers' single-file loader reads them from the checkpoint's
    # edm_mean/edm_std and sets PLAYGROUND_VAE_SCALING_FACTOR = 0.5). The VAE itself is SDXL's.
    "playground-v2-5": LatentFormat("playground-v2-5", "Playground v2.5", 4, 0.5, None, 1024,
                                    latents_mean=(-1.6574, 1.886, -1.383, 2.5155),
                                    latents_std=(8.4927, 5.9022, 6.5498, 5.2299)),
    # the shipped demo VAE (models/MODEL_CARD.md): its own latent space, not SD-compatible;
    # 1/std of its posterior samples over its training images, no shift
    "demo": LatentFormat("demo", "demo (not SD-compatible)", 16, 0.31531, None, 256),
}

# Accepted spellings of family names.
_ALIASES = {
    "sd1": "sd1", "sd15": "sd1", "sd1.5": "sd1", "sd2": "sd1", "sd21": "sd1", "sd1.x": "sd1", "sd": "sd1",
    "sdxl": "sdxl", "xl": "sdxl",
    "sd3": "sd3", "sd35": "sd3", "sd3.5": "sd3",
    "flux": "flux", "flux1": "flux", "flux.1": "flux",
    "playgroundv25": "playground-v2-5", "playground2.5": "playground-v2-5", "playgroundv2.5": "playground-v2-5",
    "playground": "playground-v2-5", "pgv25": "playground-v2-5",
    "demo": "demo",
}


def get_family(name: str) -> LatentFormat:
    key = _ALIASES.get(str(name).lower().replace("-", "").replace("_", ""))
    if key is None:
        raise ValueError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[key]


def describe_channels(channels: int, family: Optional[str] = None) -> str:
    """Which families use `channels` latent channels, for error messages. A model whose file names a
    `family` that this count would not suggest (the demo's, left out of the list) is named by it."""
    using = [f for f in FAMILIES.values() if f.latent_channels == channels and f.name != "demo"]
    if family in FAMILIES and FAMILIES[family] not in using:
        return f"family {family}"
    names = [f.label for f in using]
    return "/".join(n.split("/")[0] if "/" in n and len(names) > 1 else n for n in names) if names else "unknown family"
