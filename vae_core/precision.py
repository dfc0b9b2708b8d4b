"""Precision policy: which dtype a run uses (force_upcast), running in it, and the fp32 retry on NaN/inf.

It does not pick tiling (see `planner.py`) and never changes the model for good: weights are
cast for the duration of one run and restored bit for bit afterwards.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)


def resolve_dtype(model, requested: Optional[torch.dtype] = None, force_upcast: Optional[bool] = None) -> torch.dtype:
    """The dtype a run will use. fp16 on a config with force_upcast=True becomes fp32 (the SD/SDXL VAEs
    overflow in fp16) unless `force_upcast=False` overrides it. bf16 is never upcast: its range is
    fp32's, and on CPUs with AVX512-BF16 it is about 2x faster than fp32."""
    dtype = requested or model.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"dtype {dtype} is not supported for a VAE run; use float32, float16 or bfloat16")
    upcast = model.config.force_upcast if force_upcast is None else bool(force_upcast)
    if dtype == torch.float16 and upcast:
        logger.info("fp16 was asked for but this VAE's config has force_upcast=True: running in fp32 "
                    "(pass force_upcast=False to run fp16 anyway)")
        return torch.float32
    return dtype


@contextlib.contextmanager
def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[torch.nn.Module]:
    """Run `model` in `dtype` inside the block; its original parameters and buffers are put back after.

    While the block runs both copies exist (fp32 weights + half copy). Not safe for two threads
    using the same model at once, which the host never does.
    """
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    if all(t.dtype == dtype for t in tensors):
        yield model
        return
    saved = [(t, t.data) for t in tensors]
    try:
        for t, data in saved:
            t.data = data.to(dtype)
        yield model
    finally:
        for t, data in saved:
            t.data = data


def non_finite_count(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum().item())


def run_checked(fn: Callable[[torch.dtype], torch.Tensor], dtype: torch.dtype, what: str = "run",
                retry_fp32: bool = True) -> Tuple[torch.Tensor, bool]:
    """Call fn(dtype); when a half-precision result holds NaN or inf, log it and call fn(float32).
    Returns (output, retried_in_fp32)."""
    out = fn(dtype)
    if dtype not in HALF_DTYPES or not retry_fp32:
        return out, False
    bad = non_finite_count(out)
    if bad == 0:
        return out, False
    logger.warning("%s in %s produced %d NaN/inf values of %d (black or broken image); retrying in fp32",
                   what, str(dtype).replace("torch.", ""), bad, out.numel())
    del out
    return fn(torch.float32), True
