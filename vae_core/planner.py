"""Memory planner: split a batch and tile ("exact") when an encode/decode would not fit, and run it.

It decides and runs; every estimate is `memory.py`'s, the maths of tiling lives in `exact_tiling.py`,
dtype policy in `precision.py`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch

from . import exact_tiling, memory, precision
from .attention import (Attention, AttnProcessorBase, attention_progress, bounded_processor, progress_steps,
                        score_rows)
from .layers import Downsample2D, ResnetBlock2D, Upsample2D

logger = logging.getLogger(__name__)

# Tile sizes (px) the planner tries, largest first.
TILE_CANDIDATES = (2048, 1536, 1024, 768, 512, 384, 256, 192, 128)


@dataclasses.dataclass
class Plan:
    """What `run_decode`/`run_encode` will do."""

    tiled: bool  # run exact tiling
    tile_size: Optional[int]  # px, when tiled
    method: Optional[str]  # "exact" when tiled by the planner; the model's own method when the user tiled
    estimated_bytes: int  # the planner's peak estimate for the chosen way
    free_bytes: Optional[int]  # free memory seen (None: unknown)
    reason: str  # one human sentence
    runner: Optional[Callable] = dataclasses.field(default=None, repr=False)  # a caller's UserTiling.run
    lean: bool = False  # exact tiling with the leanest checkpoints (after an out-of-memory error)
    chunk: Optional[int] = None  # images per run: the batch is split into runs of this many (None: whole)


@dataclasses.dataclass
class UserTiling:
    """A tiled run the caller chose (e.g. a tiled node's settings). The planner runs it as given and
    adds only its retries: in fp32 on NaN/inf, and exact tiling with smaller tiles on out-of-memory."""

    method: str  # for the report and log: "exact" or "blend"
    tile_size: int  # px
    run: Callable[[Any, torch.Tensor, Optional[Callable[[int, int], None]]], torch.Tensor]  # (model, input, callback)
    overlap: int = 0  # px, for the estimate of a blend run


# -- planning ---------------------------------------------------------------------------------


def _rows(model) -> int:
    """Query rows of attention scores the model's processors build at once (memory.estimate_bytes' `rows`)."""
    return max((score_rows(p) for p in model.attn_processors.values()), default=0)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _split(kind: str, shape: Tuple[int, ...], limit: int, dtype: torch.dtype, cfg, **run) -> int:
    """Images per run so that a run of `shape` stays within `limit` bytes: the whole batch when it
    fits, else the largest chunk that fits (0: not even one image)."""
    if memory.chunk_bytes(kind, shape, shape[0], dtype, cfg, **run) <= limit:
        return shape[0]
    return memory.largest_chunk(kind, shape, limit, dtype, cfg, **run)


def _split_words(b: int, chunk: int) -> str:
    if chunk >= b:
        return ""
    runs = -(-b // chunk)
    return f", in {runs} runs of up to {chunk} image{'s' if chunk > 1 else ''}"


def _plan(kind: str, model, t: torch.Tensor, dtype: torch.dtype, free_bytes: Optional[int]) -> Plan:
    """Untiled when it fits; else untiled in smaller runs of the batch (as the host's VAEDecode splits
    a batch); else exact tiling with the largest tile that fits, in as few runs as fit."""
    cfg = model.config
    shape = tuple(t.shape)
    b = shape[0]
    rows = _rows(model)
    est = memory.estimate_bytes(kind, shape, dtype, cfg, rows)
    if free_bytes is None:
        free_bytes = memory.free_memory(t.device)
    if free_bytes is None:
        return Plan(False, None, None, est, None, "free memory is unknown on this device: running untiled")
    limit = memory.budget(free_bytes)
    free = f"{_gib(free_bytes)} free"
    if est <= limit:
        return Plan(False, None, None, est, free_bytes, f"untiled needs ~{_gib(est)} of {free}")
    chunk = _split(kind, shape, limit, dtype, cfg, rows=rows)
    if chunk:
        need = memory.chunk_bytes(kind, shape, chunk, dtype, cfg, rows=rows)
        return Plan(False, None, None, need, free_bytes, chunk=chunk,
                    reason=f"untiled, {b} images need ~{_gib(est)} but {free}: ~{_gib(need)}"
                           f"{_split_words(b, chunk)}")
    px = max(shape[-2:]) * (cfg.downscale_factor if kind == "decode" else 1)
    tiles = [s for s in TILE_CANDIDATES if s < px] or [TILE_CANDIDATES[-1]]
    for tile in tiles:
        chunk = _split(kind, shape, limit, dtype, cfg, method="exact", tile_size=tile, rows=rows)
        if chunk:
            need = memory.chunk_bytes(kind, shape, chunk, dtype, cfg, method="exact", tile_size=tile, rows=rows)
            return Plan(True, tile, "exact", need, free_bytes, chunk=chunk,
                        reason=f"untiled needs ~{_gib(est)} but {free}: exact tiling with {tile} px tiles "
                               f"needs ~{_gib(need)}{_split_words(b, chunk)}")
    tile = tiles[-1]
    need = memory.chunk_bytes(kind, shape, 1, dtype, cfg, method="exact", tile_size=tile, rows=rows)
    return Plan(True, tile, "exact", need, free_bytes, chunk=1,
                reason=f"even {tile} px exact tiles need ~{_gib(need)} for one image and only {free}: "
                       "trying anyway" + _split_words(b, 1))


def _fixed(kind: str, model, t: torch.Tensor, dtype: torch.dtype, plan: Plan, method: str, tile_size: int,
           overlap: int, reason: str, runner: Optional[Callable] = None) -> Plan:
    """A tiling the caller chose, run as given; only the batch is split, when the whole would not fit."""
    shape, cfg = tuple(t.shape), model.config
    run = dict(method=method, tile_size=int(tile_size), overlap=int(overlap), rows=_rows(model))
    chunk = shape[0]
    if plan.free_bytes is not None:
        chunk = max(1, _split(kind, shape, memory.budget(plan.free_bytes), dtype, cfg, **run))
    need = memory.chunk_bytes(kind, shape, chunk, dtype, cfg, **run)
    return dataclasses.replace(plan, tiled=True, tile_size=int(tile_size), method=method, runner=runner,
                               estimated_bytes=need, chunk=chunk, reason=reason + _split_words(shape[0], chunk))


def plan_decode(model, z: torch.Tensor, dtype: Optional[torch.dtype] = None, free_bytes: Optional[int] = None) -> Plan:
    """Plan an untiled or exact-tiled decode of raw latents `z` (B, latent, h, w)."""
    return _plan("decode", model, z, dtype or model.dtype, free_bytes)


def plan_encode(model, x: torch.Tensor, dtype: Optional[torch.dtype] = None, free_bytes: Optional[int] = None) -> Plan:
    """Plan an untiled or exact-tiled encode of pixels `x` (B, C, H, W) in [-1, 1]."""
    return _plan("encode", model, x, dtype or model.dtype, free_bytes)


# -- running ----------------------------------------------------------------------------------


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    # the CPU allocator raises a plain RuntimeError when malloc fails
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def _execute_one(kind: str, model, t: torch.Tensor, plan: Plan, callback, free_bytes: Optional[int]) -> torch.Tensor:
    if plan.runner is not None:
        return plan.runner(model, t, callback)
    if plan.tiled and plan.method == "blend":  # the user enabled diffusers' tiling on the model
        fn = model._tiled_pixels if kind == "decode" else model._tiled_moments
        return fn(t, "blend", callback)
    if plan.tiled:
        fn = exact_tiling.exact_tiled_decode if kind == "decode" else exact_tiling.exact_tiled_encode
        options = dict(model.tiling_options)
        if "store_budget" not in options and (plan.lean or free_bytes is not None):
            # checkpoints may use what the plan leaves of the free memory it was made for
            options["store_budget"] = 0 if plan.lean else exact_tiling.store_budget_for(kind, model, t, plan.tile_size,
                                                                                             free_bytes)
        return fn(model, t, tile_size=plan.tile_size, callback=callback, **options)
    with layer_progress(kind, model, t, callback):
        return model._pixels(t) if kind == "decode" else model._moments(t)


def _execute(kind: str, model, t: torch.Tensor, plan: Plan, callback) -> torch.Tensor:
    """Run `plan` on the batch `t`, in runs of `plan.chunk` images; progress covers the whole batch."""
    b = t.shape[0]
    chunk = min(plan.chunk or b, b)
    if chunk >= b:
        return _execute_one(kind, model, t, plan, callback, plan.free_bytes)
    runs = -(-b // chunk)
    free = plan.free_bytes
    if free is not None:  # the other images' inputs and outputs wait in memory meanwhile
        free = max(0, free - memory.io_bytes(kind, (b - chunk,) + tuple(t.shape[1:]), model.config, t.dtype))
    out: Optional[torch.Tensor] = None
    for i in range(runs):
        def step(done: int, total: int, i: int = i) -> None:
            callback(i * total + done, runs * total)

        part = _execute_one(kind, model, t[i * chunk:(i + 1) * chunk], plan, step if callback else None, free)
        if out is None:
            out = torch.empty((b,) + tuple(part.shape[1:]), dtype=part.dtype, device=part.device)
        out[i * chunk:i * chunk + part.shape[0]] = part
        del part
    return out


@contextlib.contextmanager
def layer_progress(kind: str, model, t: torch.Tensor, callback: Optional[Callable[[int, int], None]]) -> Iterator[int]:
    """Within the block, an untiled `kind` of `t` calls callback(done, total) after each resnet,
    up/down-sampler and chunk of attention queries (a cancel point every few seconds even at
    2048^2, where the whole run is minutes). Yields total (0 without a callback)."""
    if callback is None:
        yield 0
        return
    part = model.decoder if kind == "decode" else model.encoder
    layers = [m for m in part.modules() if isinstance(m, (ResnetBlock2D, Upsample2D, Downsample2D))]
    attentions = [m for m in part.modules() if isinstance(m, Attention)]
    h, w = t.shape[-2:]
    if kind == "encode":  # the mid block runs at the encoder's lowest resolution
        for _ in (m for m in part.modules() if isinstance(m, Downsample2D)):
            h, w = (h - 2) // 2 + 1, (w - 2) // 2 + 1
    # the processors the attention guard will run (a sliced one reports per chunk of queries)
    procs = [bounded_processor(a.processor, (t.shape[0], a.channels, h, w), t.dtype, t.device) for a in attentions]
    total = len(layers) + sum(progress_steps(p, h * w) for p in procs)
    done = 0

    def tick(*_args) -> None:
        nonlocal done
        done += 1
        callback(done, total)

    callback(0, total)
    with contextlib.ExitStack() as stack:
        for a, p in zip(attentions, procs):
            stack.enter_context(attention_progress(a, tick))
            if not isinstance(p, AttnProcessorBase):
                stack.callback(a.register_forward_hook(tick).remove)  # a foreign processor: one step
        for m in layers:
            stack.callback(m.register_forward_hook(tick).remove)
        yield total


def _run(kind: str, model, t: torch.Tensor, dtype: Optional[torch.dtype], force_upcast: Optional[bool],
         callback, free_bytes: Optional[int], tile_size: Optional[int],
         user_tiling: Optional[UserTiling]) -> Tuple[torch.Tensor, Dict[str, Any]]:
    start = time.perf_counter()
    run_dtype = precision.resolve_dtype(model, dtype, force_upcast)

    def choose(d: torch.dtype) -> Plan:
        plan = _plan(kind, model, t, d, free_bytes)
        if tile_size is not None:
            plan = _fixed(kind, model, t, d, plan, "exact", tile_size, 0,
                          f"exact tiling with {tile_size} px tiles was asked for")
        big = model._is_large_latent(t) if kind == "decode" else model._is_large_sample(t)
        if model.use_tiling and big:  # the user chose tiling on this model: honour it
            size = model.tile_sample_min_size
            plan = _fixed(kind, model, t, d, plan, model.tiling_method, size, int(size * model.tile_overlap_factor),
                          "tiling was enabled on the model")
        if user_tiling is not None:
            ut = user_tiling
            plan = _fixed(kind, model, t, d, plan, ut.method, ut.tile_size, ut.overlap,
                          f"{ut.method} tiling with {ut.tile_size} px tiles was asked for", runner=ut.run)
        return plan

    plan = choose(run_dtype)
    logger.info("%s %s in %s: %s", kind, tuple(t.shape), str(run_dtype).replace("torch.", ""), plan.reason)

    def attempt(p: Plan, d: torch.dtype) -> torch.Tensor:
        nonlocal plan
        if d != run_dtype and not p.tiled:  # the fp32 retry of a half run needs twice the memory
            p = plan = choose(d)
        with precision.cast_model(model, d):
            inp = t.to(d)
            try:
                return _execute(kind, model, inp, p, callback)
            except Exception as err:  # only out-of-memory is retried; everything else propagates
                if not _is_oom(err) or p.tile_size is not None and p.tile_size <= TILE_CANDIDATES[-1]:
                    raise
            # retry tiled outside the except block so the failed run's tensors are released
            if t.device.type == "cuda":
                torch.cuda.empty_cache()
            smaller = [s for s in TILE_CANDIDATES if p.tile_size is None or s < p.tile_size]
            retry_tile = smaller[0] if p.tiled else 512
            logger.warning("%s ran out of memory (%s); retrying with exact tiling, %d px tiles, one image at a time",
                           kind, "tiled" if p.tiled else "untiled", retry_tile)
            plan = dataclasses.replace(p, tiled=True, tile_size=retry_tile, method="exact", runner=None, lean=True,
                                       chunk=1, reason="retried tiled after running out of memory")
            return attempt(plan, d)

    # attention budgets inside the run come from the same free-memory figure as the plan
    with memory.attention_free_bytes(free_bytes):
        out, fp32_retry = precision.run_checked(lambda d: attempt(plan, d), run_dtype, what=kind)
    b = t.shape[0]
    chunk = min(plan.chunk or b, b)
    report = {
        "tiled": plan.tiled,
        "tile_size": plan.tile_size if plan.tiled else None,
        "method": plan.method if plan.tiled else None,
        "fp32_retry": fp32_retry,
        "estimated_bytes": int(plan.estimated_bytes),
        "seconds": time.perf_counter() - start,
        "dtype": str(torch.float32 if fp32_retry else run_dtype).replace("torch.", ""),
        "reason": plan.reason,
        "batch_chunk": chunk,
        "batch_runs": -(-b // chunk),
    }
    logger.info("%s done in %.1f s (tiled=%s, tile=%s, runs=%d of up to %d images, fp32_retry=%s)", kind,
                report["seconds"], report["tiled"], report["tile_size"], report["batch_runs"], chunk, fp32_retry)
    return out, report


@torch.no_grad()
def run_decode(model, z: torch.Tensor, dtype: Optional[torch.dtype] = None, force_upcast: Optional[bool] = None,
               callback: Optional[Callable[[int, int], None]] = None, free_bytes: Optional[int] = None,
               tile_size: Optional[int] = None, user_tiling: Optional[UserTiling] = None
               ) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Decode raw latents z (B, latent, h, w) -> pixels (B, out, h*f, w*f) (roughly [-1, 1], fp32 or `dtype`),
    tiling "exact" when the untiled run would not fit, retrying tiled on out-of-memory and in fp32 on
    NaN/inf, and splitting the batch into runs that fit. Returns (pixels, report): report has tiled,
    tile_size, method, fp32_retry, estimated_bytes, seconds, dtype, reason, batch_chunk (images per
    run) and batch_runs. `free_bytes` overrides the measured free memory;
    `tile_size` forces exact tiling; `user_tiling` runs the caller's own tiled function instead."""
    return _run("decode", model, z, dtype, force_upcast, callback, free_bytes, tile_size, user_tiling)


@torch.no_grad()
def run_encode(model, x: torch.Tensor, dtype: Optional[torch.dtype] = None, force_upcast: Optional[bool] = None,
               callback: Optional[Callable[[int, int], None]] = None, free_bytes: Optional[int] = None,
               tile_size: Optional[int] = None, user_tiling: Optional[UserTiling] = None
               ) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Encode pixels x (B, C, H, W) in [-1, 1] -> moments (B, 2*latent, H/f, W/f) after quant_conv
    (wrap in DiagonalGaussianDistribution for mean/sample), with the same policy as `run_decode`."""
    return _run("encode", model, x, dtype, force_upcast, callback, free_bytes, tile_size, user_tiling)
