"""Tilers: run an encode or decode function tile by tile over a large input.

`blend_tiled` reproduces diffusers' AutoencoderKL tiling (overlapping tiles, linear cross-fade)
bit for bit. It knows nothing about the model: it only takes a function. Exact tiling with
pooled GroupNorm statistics lives in `exact_tiling.py`.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

# callback(done_tiles, total_tiles); it may raise to cancel between tiles
ProgressCallback = Optional[Callable[[int, int], None]]


def _fade_weights(extent: int, dtype: torch.dtype, device: torch.device):
    """Weights (1 - t/extent, t/extent) for t = 0..extent-1, rounded to the dtype diffusers' scalar math uses."""
    op_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    keep = torch.tensor([1 - t / extent for t in range(extent)], dtype=torch.float64).to(device=device, dtype=op_dtype)
    take = torch.tensor([t / extent for t in range(extent)], dtype=torch.float64).to(device=device, dtype=op_dtype)
    return keep, take


def _cross_fade(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    # diffusers computes a*scalar + b*scalar: each product in opmath precision, rounded to the tensor dtype
    if a.dtype in (torch.float16, torch.bfloat16):
        return (a.float() * keep).to(a.dtype) + (b.float() * take).to(a.dtype)
    return a * keep + b * take


def blend_v(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """Fade the bottom `extent` rows of `a` into the top rows of `b`, in place in `b`."""
    extent = min(a.shape[2], b.shape[2], extent)
    if extent <= 0:
        return b
    keep, take = _fade_weights(extent, b.dtype, b.device)
    b[:, :, :extent, :] = _cross_fade(a[:, :, -extent:, :], b[:, :, :extent, :], keep[:, None], take[:, None])
    return b


def blend_h(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """Fade the right `extent` columns of `a` into the left columns of `b`, in place in `b`."""
    extent = min(a.shape[3], b.shape[3], extent)
    if extent <= 0:
        return b
    keep, take = _fade_weights(extent, b.dtype, b.device)
    b[:, :, :, :extent] = _cross_fade(a[:, :, :, -extent:], b[:, :, :, :extent], keep, take)
    return b


def tile_starts(size: int, stride: int) -> List[int]:
    return list(range(0, size, stride))


def blend_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile_in: int,
    stride_in: int,
    blend_extent: int,
    row_limit: int,
    callback: ProgressCallback = None,
) -> torch.Tensor:
    """Apply `fn` to overlapping `tile_in`-sized tiles of `x` (B, C, H, W) taken every `stride_in`,
    cross-fade `blend_extent` output rows/columns between neighbours, keep `row_limit` of each.

    Only the previous row of output tiles is held, not the whole grid as in diffusers.
    """
    if stride_in < 1:
        raise ValueError(
            f"tile stride is {stride_in}: the tile ({tile_in}) is too small for its overlap; "
            "use a larger tile or a smaller overlap"
        )
    rows_at = tile_starts(x.shape[2], stride_in)
    cols_at = tile_starts(x.shape[3], stride_in)
    total = len(rows_at) * len(cols_at)
    done = 0
    prev_row: List[torch.Tensor] = []
    out_rows: List[torch.Tensor] = []
    for i in rows_at:
        row: List[torch.Tensor] = []
        pieces: List[torch.Tensor] = []
        for jj, j in enumerate(cols_at):
            tile = fn(x[:, :, i : i + tile_in, j : j + tile_in])
            if prev_row:
                tile = blend_v(prev_row[jj], tile, blend_extent)
            if row:
                tile = blend_h(row[-1], tile, blend_extent)
            row.append(tile)
            pieces.append(tile[:, :, :row_limit, :row_limit])
            done += 1
            if callback is not None:
                callback(done, total)
        out_rows.append(torch.cat(pieces, dim=3))
        del pieces
        prev_row = row
    return torch.cat(out_rows, dim=2)
