"""Memory planner: estimate the peak memory of an encode/decode, and tile ("exact") when it would not fit.

It decides and runs; the maths of tiling lives in `exact_tiling.py`, dtype policy in `precision.py`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

from . import precision
from .attention import Attention, AttnProcessor, AttnProcessorBase, attention_progress, progress_steps
from .config import AutoencoderKLConfig
from .layers import Downsample2D, ResnetBlock2D, Upsample2D

logger = logging.getLogger(__name__)

# Measured peak / analytic peak of an untiled run (fp32, CPU, oneDNN convs), from
# benchmarks/bench_tiling.py on the SD-size VAE (decode 1024^2 and 2048^2, encode 1024^2); the analytic model counts
# only the live activations of the widest layer, the allocator and conv workspaces add the rest.
UNTILED_CALIBRATION = {"decode": 1.2, "encode": 1.6}
# Same for exact tiling: measured peak / (largest checkpoint + bands + one tile's working set).
# Measured est/peak was 1.12-1.43 (an overestimate); kept at 1.0 to stay on the safe side.
TILED_CALIBRATION = 1.0
# Fixed overhead in bytes (allocator slack, small buffers).
OVERHEAD_BYTES = 64 * 2**20
# Use at most this fraction of the free memory: leave room for the host and fragmentation.
SAFETY = 0.85
# Tile sizes (px) the planner tries, largest first.
TILE_CANDIDATES = (2048, 1536, 1024, 768, 512, 384, 256, 192, 128)
# Halo (px) a tile carries through a chain of convs between checkpoints (a few latent px).
HALO_PX = 64


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


@dataclasses.dataclass
class UserTiling:
    """A tiled run the caller chose (e.g. a tiled node's settings). The planner runs it as given and
    adds only its retries: in fp32 on NaN/inf, and exact tiling with smaller tiles on out-of-memory."""

    method: str  # for the report and log: "exact" or "blend"
    tile_size: int  # px
    run: Callable[[Any, torch.Tensor, Optional[Callable[[int, int], None]]], torch.Tensor]  # (model, input, callback)


# -- free memory -----------------------------------------------------------------------------


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes that a run on `device` may use: CUDA free memory plus what torch's cache holds unused,
    or MemAvailable from /proc/meminfo on the CPU. None when it cannot be known (other platforms)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


# -- estimates -------------------------------------------------------------------------------


def _attention_elems(channels: int, tokens: int, math_scores: bool) -> int:
    # residual, q, k, v and the output are live together; plain matmul adds scores and fp32 probs
    elems = 5 * channels * tokens
    if math_scores:
        elems += 2 * tokens * tokens
    return elems


def _resnet_elems(cin: int, cout: int, hw: int) -> int:
    return (2 * cin + cout) * hw  # input (kept for the skip), norm1 output, conv1 output


def _peak_elems(kind: str, shape: Sequence[int], cfg: AutoencoderKLConfig, math_attention: bool) -> int:
    """Largest number of activation elements alive at once in an untiled run, per the layer walk."""
    b, _c, h, w = shape
    ch = cfg.block_out_channels
    f = cfg.downscale_factor
    peaks = []
    if kind == "decode":
        lh, lw = h, w
        full = (h * f) * (w * f)
        peaks.append((cfg.latent_channels + ch[-1]) * lh * lw)
        peaks.append(_resnet_elems(ch[-1], ch[-1], lh * lw))
        if cfg.mid_block_add_attention:
            peaks.append(_attention_elems(ch[-1], lh * lw, math_attention))
        rev = tuple(reversed(ch))
        hw = lh * lw
        for i, cout in enumerate(rev):
            cin = rev[max(i - 1, 0)]
            peaks.append(_resnet_elems(cin, cout, hw))
            if i < len(rev) - 1:
                peaks.append(9 * cout * hw)  # input, nearest-2x copy, conv output (both 4x)
                hw *= 4
        peaks.append(2 * rev[-1] * full + cfg.out_channels * full)
    else:
        hw = h * w
        peaks.append((cfg.in_channels + ch[0]) * hw)
        for i, cout in enumerate(ch):
            cin = ch[max(i - 1, 0)]
            peaks.append(_resnet_elems(cin, cout, hw))
            if i < len(ch) - 1:
                peaks.append(cout * hw * 9 // 4)  # input, zero-padded copy, output (1/4)
                hw //= 4
        if cfg.mid_block_add_attention:
            peaks.append(_attention_elems(ch[-1], hw, math_attention))
        peaks.append(3 * ch[-1] * hw)
    return b * max(peaks)


def _io_elems(kind: str, shape: Sequence[int], cfg: AutoencoderKLConfig) -> int:
    b, c, h, w = shape
    f = cfg.downscale_factor
    if kind == "decode":
        return b * (c * h * w + cfg.out_channels * h * f * w * f)
    return b * (c * h * w + 2 * cfg.latent_channels * (h // f) * (w // f))


def estimate_bytes(kind: str, shape: Sequence[int], dtype: torch.dtype, config: AutoencoderKLConfig,
                   attn_processor: Any = None) -> int:
    """Peak bytes above the loaded weights of an untiled `kind` ("encode" or "decode") of an input of
    `shape` (B, C, H, W) (latent shape for decode) in `dtype`; a plain-matmul `attn_processor` adds
    its (B, N, N) score matrices."""
    if kind not in ("encode", "decode"):
        raise ValueError(f"kind must be 'encode' or 'decode', got {kind!r}")
    math_attention = type(attn_processor) is AttnProcessor
    itemsize = torch.empty((), dtype=dtype).element_size()
    elems = _peak_elems(kind, shape, config, math_attention) + _io_elems(kind, shape, config)
    return int(elems * itemsize * UNTILED_CALIBRATION[kind]) + OVERHEAD_BYTES


def trunk_elems(kind: str, shape: Sequence[int], config: AutoencoderKLConfig) -> int:
    """Elements of the widest checkpoint of an exact tiled run of an input of `shape`: a resnet output
    at full resolution (block_out_channels[0] channels). The leanest plan holds about one."""
    b, _c, h, w = shape
    f = config.downscale_factor if kind == "decode" else 1
    return b * config.block_out_channels[0] * h * f * w * f


def estimate_tiled_bytes(kind: str, shape: Sequence[int], dtype: torch.dtype, config: AutoencoderKLConfig,
                         tile_size: int) -> int:
    """Peak bytes above the weights of an exact tiled run with `tile_size` px tiles: the largest
    resnet output (a checkpoint), three bands of it in flight, and one tile's working set."""
    b, c, h, w = shape
    f = config.downscale_factor
    px_h, px_w = (h * f, w * f) if kind == "decode" else (h, w)
    trunk = trunk_elems(kind, shape, config)
    band = b * config.block_out_channels[0] * min(tile_size, px_h) * px_w
    t = min(tile_size, max(px_h, px_w)) + 2 * HALO_PX
    tile_shape = (b, c, t // f, t // f) if kind == "decode" else (b, c, t, t)
    work = _peak_elems(kind, tile_shape, config, False)
    itemsize = torch.empty((), dtype=dtype).element_size()
    elems = trunk + 3 * band + work + _io_elems(kind, shape, config)
    return int(elems * itemsize * TILED_CALIBRATION) + OVERHEAD_BYTES


# -- planning ---------------------------------------------------------------------------------


def _attn_processor(model) -> Any:
    procs = list(model.attn_processors.values())
    return procs[0] if procs else None


def _plan(kind: str, model, t: torch.Tensor, dtype: torch.dtype, free_bytes: Optional[int]) -> Plan:
    cfg = model.config
    shape = tuple(t.shape)
    est = estimate_bytes(kind, shape, dtype, cfg, _attn_processor(model))
    if free_bytes is None:
        free_bytes = free_memory(t.device)
    if free_bytes is None:
        return Plan(False, None, None, est, None, "free memory is unknown on this device: running untiled")
    budget = int(free_bytes * SAFETY)
    if est <= budget:
        return Plan(False, None, None, est, free_bytes,
                    f"untiled needs ~{est / 2**30:.2f} GiB of {free_bytes / 2**30:.2f} GiB free")
    px = max(shape[-2:]) * (cfg.downscale_factor if kind == "decode" else 1)
    tiles = [s for s in TILE_CANDIDATES if s < px] or [TILE_CANDIDATES[-1]]
    for tile in tiles:
        tiled_est = estimate_tiled_bytes(kind, shape, dtype, cfg, tile)
        if tiled_est <= budget:
            return Plan(True, tile, "exact", tiled_est, free_bytes,
                        f"untiled needs ~{est / 2**30:.2f} GiB but {free_bytes / 2**30:.2f} GiB is free: "
                        f"exact tiling with {tile} px tiles needs ~{tiled_est / 2**30:.2f} GiB")
    tile = tiles[-1]
    tiled_est = estimate_tiled_bytes(kind, shape, dtype, cfg, tile)
    return Plan(True, tile, "exact", tiled_est, free_bytes,
                f"even {tile} px exact tiles need ~{tiled_est / 2**30:.2f} GiB and only "
                f"{free_bytes / 2**30:.2f} GiB is free: trying anyway")


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


def _execute(kind: str, model, t: torch.Tensor, plan: Plan, callback) -> torch.Tensor:
    from .exact_tiling import exact_tiled_decode, exact_tiled_encode, store_budget_for

    if plan.runner is not None:
        return plan.runner(model, t, callback)
    if plan.tiled and plan.method == "blend":  # the user enabled diffusers' tiling on the model
        fn = model._tiled_pixels if kind == "decode" else model._tiled_moments
        return fn(t, "blend", callback)
    if plan.tiled:
        fn = exact_tiled_decode if kind == "decode" else exact_tiled_encode
        options = dict(model.tiling_options)
        if "store_budget" not in options and (plan.lean or plan.free_bytes is not None):
            # checkpoints may use what the plan leaves of the free memory it was made for
            options["store_budget"] = 0 if plan.lean else store_budget_for(kind, model, t, plan.tile_size,
                                                                            plan.free_bytes)
        return fn(model, t, tile_size=plan.tile_size, callback=callback, **options)
    with layer_progress(kind, model, t, callback):
        return model._pixels(t) if kind == "decode" else model._moments(t)


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
    total = len(layers) + sum(progress_steps(a.processor, h * w) for a in attentions)
    done = 0

    def tick(*_args) -> None:
        nonlocal done
        done += 1
        callback(done, total)

    callback(0, total)
    with contextlib.ExitStack() as stack:
        for a in attentions:
            stack.enter_context(attention_progress(a, tick))
            if not isinstance(a.processor, AttnProcessorBase):
                stack.callback(a.register_forward_hook(tick).remove)  # a foreign processor: one step
        for m in layers:
            stack.callback(m.register_forward_hook(tick).remove)
        yield total


def _run(kind: str, model, t: torch.Tensor, dtype: Optional[torch.dtype], force_upcast: Optional[bool],
         callback, free_bytes: Optional[int], tile_size: Optional[int],
         user_tiling: Optional[UserTiling]) -> Tuple[torch.Tensor, Dict[str, Any]]:
    start = time.perf_counter()
    run_dtype = precision.resolve_dtype(model, dtype, force_upcast)
    plan = _plan(kind, model, t, run_dtype, free_bytes)
    if tile_size is not None:
        plan = dataclasses.replace(plan, tiled=True, tile_size=int(tile_size), method="exact",
                                   estimated_bytes=estimate_tiled_bytes(kind, tuple(t.shape), run_dtype,
                                                                        model.config, int(tile_size)),
                                   reason=f"exact tiling with {tile_size} px tiles was asked for")
    big = model._is_large_latent(t) if kind == "decode" else model._is_large_sample(t)
    if model.use_tiling and big:  # the user chose tiling on this model: honour it
        plan = dataclasses.replace(plan, tiled=True, tile_size=model.tile_sample_min_size,
                                   method=model.tiling_method, reason="tiling was enabled on the model")
    if user_tiling is not None:
        ut = user_tiling
        plan = dataclasses.replace(plan, tiled=True, tile_size=int(ut.tile_size), method=ut.method, runner=ut.run,
                                   estimated_bytes=estimate_tiled_bytes(kind, tuple(t.shape), run_dtype,
                                                                        model.config, int(ut.tile_size)),
                                   reason=f"{ut.method} tiling with {ut.tile_size} px tiles was asked for")
    logger.info("%s %s in %s: %s", kind, tuple(t.shape), str(run_dtype).replace("torch.", ""), plan.reason)

    def attempt(p: Plan, d: torch.dtype) -> torch.Tensor:
        nonlocal plan
        if d != run_dtype and not p.tiled:  # the fp32 retry of a half run needs twice the memory
            p = plan = _plan(kind, model, t, d, free_bytes)
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
            logger.warning("%s ran out of memory (%s); retrying with exact tiling, %d px tiles",
                           kind, "tiled" if p.tiled else "untiled", retry_tile)
            plan = dataclasses.replace(p, tiled=True, tile_size=retry_tile, method="exact", runner=None, lean=True,
                                       reason="retried tiled after running out of memory")
            return attempt(plan, d)

    out, fp32_retry = precision.run_checked(lambda d: attempt(plan, d), run_dtype, what=kind)
    report = {
        "tiled": plan.tiled,
        "tile_size": plan.tile_size if plan.tiled else None,
        "method": plan.method if plan.tiled else None,
        "fp32_retry": fp32_retry,
        "estimated_bytes": int(plan.estimated_bytes),
        "seconds": time.perf_counter() - start,
        "dtype": str(torch.float32 if fp32_retry else run_dtype).replace("torch.", ""),
        "reason": plan.reason,
    }
    logger.info("%s done in %.1f s (tiled=%s, tile=%s, fp32_retry=%s)", kind, report["seconds"], report["tiled"],
                report["tile_size"], fp32_retry)
    return out, report


@torch.no_grad()
def run_decode(model, z: torch.Tensor, dtype: Optional[torch.dtype] = None, force_upcast: Optional[bool] = None,
               callback: Optional[Callable[[int, int], None]] = None, free_bytes: Optional[int] = None,
               tile_size: Optional[int] = None, user_tiling: Optional[UserTiling] = None
               ) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Decode raw latents z (B, latent, h, w) -> pixels (B, out, h*f, w*f) (roughly [-1, 1], fp32 or `dtype`),
    tiling "exact" when the untiled run would not fit, retrying tiled on out-of-memory and in fp32 on
    NaN/inf. Returns (pixels, report): report has tiled, tile_size, method, fp32_retry,
    estimated_bytes, seconds, dtype and reason. `free_bytes` overrides the measured free memory;
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
