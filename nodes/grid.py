"""Tile grids for the tiled nodes: rows x columns, validation, and the per-tile memory figure the
web panel shows (from `vae_core.memory`, which web/akl_lib.js mirrors). No host imports.

The tiled nodes, their tests and the web extension share these numbers; they must match what
`vae_core.tiling.blend_tiled` actually runs (tiles start every `tile - overlap` pixels).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from ..vae_core import memory

# Limits of the tile_size / overlap widgets (pixels).
TILE_MIN, TILE_MAX, TILE_DEFAULT = 64, 4096, 512
OVERLAP_MAX, OVERLAP_DEFAULT = 2048, 64
# Every KL-VAE family (SD1/SDXL/SD3/FLUX) downsamples by 8, so tiles align to 8 pixels.
ALIGN = 8

METHODS_ALWAYS = ("blend",)

# The model fields the memory model reads (vae_core.memory); a grid carries them so the web panel can
# recompute its estimate for new widget values.
MODEL_FIELDS = ("block_out_channels", "latent_channels", "in_channels", "out_channels", "mid_block_add_attention")


class _Model:
    def __init__(self, fields: Dict[str, Any]):
        self.__dict__.update(fields)


def model_summary(config: Any = None, latent_channels: int = 4, width: int = 128,
                  factor: int = ALIGN) -> Dict[str, Any]:
    """The memory model's fields of `config` (an AutoencoderKLConfig); without one, an SD-shaped VAE
    (widths width, 2, 4, 4 x width over log2(factor) + 1 levels, RGB, mid-block attention)."""
    if config is not None:
        return {k: (list(getattr(config, k)) if k == "block_out_channels" else getattr(config, k))
                for k in MODEL_FIELDS}
    levels = int(math.log2(factor)) + 1
    widths = [width * min(2 ** i, 4) for i in range(levels)]
    return {"block_out_channels": widths, "latent_channels": latent_channels, "in_channels": 3, "out_channels": 3,
            "mid_block_add_attention": True}


def check_tile_params(tile_size: Optional[int], overlap: Optional[int], align: int = ALIGN) -> Optional[str]:
    """None when (tile_size, overlap) are valid, else a message saying what to change.

    Either may be None (a linked input not known at validation time); it is then not checked.
    Values are never rewritten: a bad value is an error the user fixes.
    """
    problems: List[str] = []
    if tile_size is not None:
        if not isinstance(tile_size, int) or isinstance(tile_size, bool):
            return f"tile_size must be a whole number of pixels, got {tile_size!r}"
        if not TILE_MIN <= tile_size <= TILE_MAX:
            problems.append(f"tile_size={tile_size} is outside {TILE_MIN}..{TILE_MAX} pixels; use a value in that range "
                            f"(512 is typical)")
        elif tile_size % align:
            lo, hi = tile_size // align * align, (tile_size // align + 1) * align
            problems.append(f"tile_size={tile_size} is not a multiple of {align} (the VAE's downscale factor); "
                            f"use {max(lo, TILE_MIN)} or {hi}")
    if overlap is not None:
        if not isinstance(overlap, int) or isinstance(overlap, bool):
            return f"overlap must be a whole number of pixels, got {overlap!r}"
        if overlap < 0:
            problems.append(f"overlap={overlap} is negative; use 0 or more pixels")
        elif overlap % align:
            problems.append(f"overlap={overlap} is not a multiple of {align} (the VAE's downscale factor); "
                            f"use {overlap // align * align} or {(overlap // align + 1) * align}")
        elif tile_size is not None and not problems and overlap * 2 > tile_size:
            problems.append(f"overlap={overlap} is more than half of tile_size={tile_size}; "
                            f"use overlap <= {tile_size // 2 // align * align} or a larger tile")
    return "; ".join(problems) if problems else None


def _starts(size: int, stride: int) -> int:
    return len(range(0, size, stride))


def tile_grid(image_h: int, image_w: int, tile_size: int, overlap: int, method: str = "blend",
              latent_channels: int = 4, width: int = 128, dtype_bytes: int = 4, batch: int = 1,
              direction: str = "decode", factor: int = ALIGN, model: Optional[Dict[str, Any]] = None
              ) -> Dict[str, object]:
    """The grid a tiled encode/decode of an image_h x image_w (pixels) image runs.

    An image that fits in one tile runs untiled (1 x 1). `model` is `model_summary(config)` (without
    it, an SD-shaped VAE of first block width `width`); estimated_bytes is the activation peak of one
    tile of the batch (`vae_core.memory.tile_working_bytes`).
    """
    err = check_tile_params(tile_size, overlap, factor)
    if err:
        raise ValueError(err)
    if image_h <= tile_size and image_w <= tile_size:
        rows = cols = 1
    elif method == "blend":
        stride = tile_size - overlap
        rows, cols = _starts(image_h, stride), _starts(image_w, stride)
    else:  # "exact": tiles of tile_size without cross-fade
        rows, cols = math.ceil(image_h / tile_size), math.ceil(image_w / tile_size)
    tile_h, tile_w = min(tile_size, image_h), min(tile_size, image_w)
    if model is None:
        model = model_summary(None, latent_channels, width, factor)
    estimated = memory.tile_working_bytes(direction, tile_h, tile_w, _Model(model), int(dtype_bytes), batch)
    return {
        "rows": rows,
        "cols": cols,
        "tiles": rows * cols,
        "tile_size": tile_size,
        "overlap": overlap,
        "image_h": image_h,
        "image_w": image_w,
        "method": method,
        "direction": direction,
        "latent_channels": model["latent_channels"],
        "estimated_bytes": estimated,
        "model": dict(model),
        "dtype_bytes": int(dtype_bytes),
        "batch": int(batch),
    }
