"""Running vae_core from the nodes: IMAGE/LATENT conversion, device and dtype, the host's memory
manager, progress bars, cancel, and a run report for the UI.

No VAE maths here: encode/decode/tiling are vae_core's. Untiled runs go through the core's
planner (`vae_core/planner.py`, run_encode/run_decode), which tiles when memory is short.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import comfy.model_management as mm
import comfy.utils

from ..vae_core import memory, planner, tiling
from ..vae_core.attention import score_rows
from ..vae_core.exact_tiling import exact_tiled_decode, exact_tiled_encode
from ..vae_core.distribution import DiagonalGaussianDistribution
from . import grid, host_memory
from .vae_object import DTYPE_NAMES, AutoencoderKLVAE, outside_inference_mode

logger = logging.getLogger(__name__)

def tiling_methods() -> Tuple[str, ...]:
    """The tiled nodes' `method` choices: diffusers' "blend" and the core's "exact" (the default)."""
    return grid.METHODS_ALWAYS + ("exact",)


# The tiled nodes' method when a prompt (or a workflow saved before the input existed) gives none:
# "exact" equals the untiled result. Saved workflows keep the method they stored.
DEFAULT_METHOD = "exact"


# -- IMAGE / LATENT <-> tensors -------------------------------------------------------------


def crop_to_multiple(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Centre-crop IMAGE (B, H, W, C) so H and W are multiples of `factor`, as the host's VAEEncode does."""
    h, w = image.shape[1], image.shape[2]
    nh, nw = h // factor * factor, w // factor * factor
    if nh == 0 or nw == 0:
        raise ValueError(f"the image is {w}x{h} pixels; the VAE needs at least {factor}x{factor} "
                         f"(its downscale factor)")
    top, left = (h % factor) // 2, (w % factor) // 2
    return image[:, top:top + nh, left:left + nw, :]


def image_to_pixels(image: torch.Tensor, factor: int, channels: int) -> torch.Tensor:
    """IMAGE (B, H, W, C) in [0, 1] -> x (B, channels, H', W') in [-1, 1], H', W' multiples of factor."""
    if image.ndim != 4:
        raise ValueError(f"expected an IMAGE of shape [B, H, W, C], got {list(image.shape)}")
    if image.shape[-1] < channels:
        raise ValueError(f"the image has {image.shape[-1]} channel(s) (grayscale or a mask?); this VAE needs "
                         f"{channels} (RGB). Convert it to RGB first (e.g. with a mask-to-image or "
                         "grayscale-to-RGB node); extra channels such as alpha are dropped")
    image = crop_to_multiple(image[..., :channels], factor)
    return image.movedim(-1, 1) * 2.0 - 1.0


def pixels_to_image(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x (B, C, H, W) in roughly [-1, 1] -> IMAGE (B, H, W, C) float32 in [0, 1] on `device`."""
    return torch.clamp((x.float() + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1).to(device)


# -- progress and cancel --------------------------------------------------------------------


# A tiled run of more tiles than this is announced up front (log, node text, run report); any run of
# more progress steps than this (exact tiling counts a step per tile per pass) gets its time left
# announced once 1% of its steps has run. A 4096^2 decode in 64 px blend tiles with 32 px overlap is
# 16,384 tiles, about 6 h on a CPU.
LONG_RUN_TILES = 2000
# A long run's time left is announced this many seconds in (after at least three steps) when 1% of
# its steps takes longer: a 6 h run is timed after about a minute, not 3.6 min.
EARLY_ESTIMATE_S = 60.0


def show_text(text: str) -> None:
    """Show `text` on the running node now (the host's progress text, where it has one) and log it."""
    logger.warning("%s", text)
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:  # an older host: the log and the run report carry it
        return
    context = get_executing_context()
    server = getattr(PromptServer, "instance", None)
    if context is not None and server is not None and hasattr(server, "send_progress_text"):
        server.send_progress_text(text, context.node_id)


def progress_callback(total: int, notes: Optional[List[str]] = None,
                      announce_over: Optional[int] = None) -> Callable[[int, int], None]:
    """callback(done, total) for the core's tilers: checks Cancel, then moves the node's progress bar.
    A run of more than `announce_over` steps gets its estimated time left announced (LONG_RUN_TILES,
    EARLY_ESTIMATE_S), appended to `notes` (the run report's warnings)."""
    pbar = comfy.utils.ProgressBar(max(1, total))
    start = time.perf_counter()
    announced = False
    announce_over = LONG_RUN_TILES if announce_over is None else announce_over

    def callback(done: int, total_now: int) -> None:
        nonlocal announced
        mm.throw_exception_if_processing_interrupted()
        pbar.update_absolute(done, max(1, total_now))
        if announced or total_now <= announce_over or done < 1:
            return
        elapsed = time.perf_counter() - start
        # after 1% of the steps, or sooner once a few steps took long enough to time
        if done >= max(1, total_now // 100) or (done >= 3 and elapsed >= EARLY_ESTIMATE_S):
            announced = True
            eta = elapsed / done * (total_now - done)
            text = (f"long run: {total_now} steps, about {_duration(eta)} left at the pace of the first {done} "
                    "(Cancel stops it within one step)")
            show_text(text)
            if notes is not None:
                notes.append(text)

    return callback


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# -- helpers ---------------------------------------------------------------------------------


class _Measure:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda" and torch.cuda.is_available()

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.t0
        self.peak = int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else None


def _report(direction: str, vae: AutoencoderKLVAE, batch: int, h: int, w: int, tile: Optional[Dict[str, Any]],
            estimated: int) -> Dict[str, Any]:
    return {
        "direction": direction,
        "tiled": tile is not None,
        "tile_size": tile["tile_size"] if tile else None,
        "overlap": tile["overlap"] if tile else None,
        "method": tile["method"] if tile else None,
        "tiles": None,
        "fp32_retry": False,
        "estimated_bytes": int(estimated),
        "seconds": None,
        "peak_bytes": None,
        "device": str(vae.device),
        "dtype": DTYPE_NAMES.get(vae.vae_dtype, str(vae.vae_dtype)),
        "batch": int(batch),
        "image_h": int(h),
        "image_w": int(w),
        "planner": False,
        "reason": None,
        "batch_chunk": int(batch),  # images per run: the planner splits a batch that does not fit whole
        "batch_runs": 1,
        "warnings": [],  # long runs, inputs far outside the VAE's range
    }


def _free_bytes(vae: AutoencoderKLVAE) -> int:
    """Free memory as the host's memory manager sees it on the VAE's device."""
    return host_memory.free_bytes(vae)


_PLANNER_KEYS = ("tiled", "tile_size", "method", "fp32_retry", "estimated_bytes", "reason", "batch_chunk",
                 "batch_runs")


def _merge_planner_report(report: Dict[str, Any], planner_report: Dict[str, Any]) -> None:
    report.update({k: planner_report[k] for k in _PLANNER_KEYS if k in planner_report})
    report["planner"] = True


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


# -- bad inputs and absurd sizes ---------------------------------------------------------------


def check_input(t: torch.Tensor, what: str) -> None:
    """Refuse an empty batch, a zero-sized side and NaN/inf values before any work: a VAE turns
    them into an empty, broken or black image without saying so. `what` names the input."""
    if t.shape[0] == 0:
        raise ValueError(f"the {what} batch is empty ({list(t.shape)}): there is nothing to "
                         f"{'decode' if what == 'latent' else 'encode'}; check the node that makes it")
    if any(s == 0 for s in t.shape[1:]):
        raise ValueError(f"the {what} has a zero-sized side ({list(t.shape)}); check the node that makes it")
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        nan = int(torch.isnan(t).sum())
        culprit = "a sampler that diverged in fp16" if what == "latent" else "image maths that divided by zero"
        raise ValueError(f"the {what} holds {bad} non-finite values ({nan} NaN, {bad - nan} inf) of {t.numel()}; "
                         f"a VAE would turn them into a broken image. The node that made the {what} went wrong "
                         f"(e.g. {culprit}): fix it there")


# Far outside what a VAE sees: trained latents stay within tens, images within [0, 1]. Such inputs
# run (they may be deliberate) but the run report says so.
LATENT_RANGE = 1e4
IMAGE_RANGE = (-0.5, 1.5)


def input_warnings(t: torch.Tensor, what: str) -> List[str]:
    """Warnings for a finite `what` ("latent" or "image") far outside a VAE's range; never refused."""
    if what == "latent":
        top = float(t.abs().max())
        if top > LATENT_RANGE:
            return [f"the latent holds values up to |{top:.3g}|, far outside a VAE's range (|z| < {LATENT_RANGE:g}); "
                    "the image will be meaningless: check the scaling of what feeds this node"]
        return []
    lo, hi = float(t.min()), float(t.max())
    if lo < IMAGE_RANGE[0] or hi > IMAGE_RANGE[1]:
        return [f"the image holds values in [{lo:.3g}, {hi:.3g}], far outside [0, 1] (warned outside "
                f"[{IMAGE_RANGE[0]}, {IMAGE_RANGE[1]}]): check the node that makes it"]
    return []


def _check_output(t: torch.Tensor, direction: str, inp: torch.Tensor) -> None:
    """fp32 already failed (or was the dtype): say so instead of returning a black image."""
    if not _finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"AutoencoderKL {direction}: the result holds {bad} NaN/inf values even in fp32, from "
                         f"finite inputs (largest |value| {inp.abs().max().item():.3g}); the input is far outside "
                         "the VAE's range (a latent of another model, or wrongly scaled): check what feeds this node")


def available_ram() -> Optional[int]:
    """Bytes of system memory the server may still take (MemAvailable within the cgroup's limit), None when unknown."""
    return host_memory.available_ram()


# Use at most this fraction of the available system memory for one run; the rest is the host's
# and the allocator's slack. Running out of *system* memory does not raise: the kernel's OOM
# killer ends the whole server, so the nodes refuse such runs up front.
RAM_FRACTION = 0.85


def _rows(vae: AutoencoderKLVAE) -> int:
    """Query rows of attention scores this VAE object's processors build at once (memory's `rows`)."""
    return max((score_rows(p) for p in vae.attn_processors.values()), default=0)


def _needed_ram(direction: str, vae: AutoencoderKLVAE, shape, tile: Optional[Dict[str, Any]]) -> Tuple[int, str]:
    """(bytes of system memory a run needs at least, how it would run). shape: the input (B, C, H, W).
    A batch that does not fit whole is split by the planner, so the least is one image at a time
    (the other images' inputs and outputs waiting in memory); `vae_core.memory` gives every number."""
    cfg = vae.core.config
    b, _c, h, w = shape
    f = vae.upscale_ratio
    px_h, px_w = (h * f, w * f) if direction == "decode" else (h, w)
    # the result on the intermediate device: IMAGE float32 (decode) or latents (encode), made from a copy
    out = b * px_h * px_w * 3 * 4 if direction == "decode" else b * 2 * cfg.latent_channels * (h // f) * (w // f) * 4
    if direction == "encode":
        out += b * 3 * h * w * 4  # the [-1, 1] copy of the IMAGE the encoder reads
    if vae.device.type != "cpu":  # device memory is the planner's (a CUDA OOM raises and is retried tiled)
        return 2 * out, "on " + str(vae.device)
    dtype, rows = vae.vae_dtype, _rows(vae)
    if tile is not None:
        run = dict(method=tile["method"], tile_size=tile["tile_size"], overlap=tile["overlap"], rows=rows)
        how = f"{tile['method']}-tiled in {tile['tile_size']} px tiles"
    else:
        smallest = planner.TILE_CANDIDATES[-1]
        tiled = dict(method="exact", tile_size=smallest, rows=rows)
        if memory.chunk_bytes(direction, shape, 1, dtype, cfg, rows=rows) <= \
                memory.chunk_bytes(direction, shape, 1, dtype, cfg, **tiled):
            run, how = dict(rows=rows), "untiled"
        else:
            run, how = tiled, f"even with exact tiling in {smallest} px tiles"
    if b > 1:
        how += ", one image at a time"
    return memory.chunk_bytes(direction, shape, 1, dtype, cfg, **run) + out, how


def check_memory(direction: str, vae: AutoencoderKLVAE, shape, tile: Optional[Dict[str, Any]] = None) -> None:
    """Refuse a run that cannot fit in system memory, before it allocates anything."""
    free = available_ram()
    if free is None:
        return
    need, how = _needed_ram(direction, vae, shape, tile)
    if need <= free * RAM_FRACTION:
        return
    b, c, h, w = shape
    f = vae.upscale_ratio
    px = f"{w * f}x{h * f}" if direction == "decode" else f"{w}x{h}"
    raise ValueError(
        f"AutoencoderKL {direction}: {b} image(s) of {px} px ({'latent' if direction == 'decode' else 'pixels'} "
        f"{list(shape)}) need about {need / 2**30:.1f} GiB of system memory ({how}), but only "
        f"{free / 2**30:.1f} GiB is available ({RAM_FRACTION:.0%} of it may be used); refused before starting, so "
        "the server is not ended by the system's out-of-memory killer. Use a smaller size "
        "(e.g. crop the latent), a smaller tile, or a machine with more memory.")


# -- running ---------------------------------------------------------------------------------


def _prepare(direction: str, vae: AutoencoderKLVAE, shape, tile: Optional[Dict[str, Any]]
             ) -> Tuple[Dict[str, Any], int]:
    """Refuse what cannot fit in system memory, load the weights for the estimated working set, and
    start the run report. shape: the input (B, C, H, W). Returns (report, progress total)."""
    check_memory(direction, vae, tuple(shape), tile)
    b = shape[0]
    cfg = vae.core.config
    factor = vae.upscale_ratio if direction == "decode" else vae.downscale_ratio
    scale = factor if direction == "decode" else 1  # decode's shape is the latent's
    h, w = shape[-2] * scale, shape[-1] * scale
    run = dict(rows=_rows(vae))
    total = 1
    if tile is not None:
        g = grid.tile_grid(h, w, tile["tile_size"], tile["overlap"], tile["method"], direction=direction,
                           factor=factor, model=grid.model_summary(cfg))
        total = g["tiles"]
        run.update(method=tile["method"], tile_size=tile["tile_size"], overlap=tile["overlap"])
    estimated = memory.estimate_run_bytes(direction, tuple(shape), vae.vae_dtype, cfg, **run)
    report = _report(direction, vae, b, h, w, tile, estimated)
    if tile is not None and total > LONG_RUN_TILES:
        text = (f"long run: {b} image(s) of {w}x{h} px in {total} tiles of {tile['tile_size']} px "
                f"({tile['method']}); its time is estimated after the first 1% of steps, and Cancel stops it "
                "within one tile. Larger tiles make far fewer")
        show_text(text)
        report["warnings"].append(text)
    vae.load_to_device(estimated)
    vae.use_own_attention()
    return report, total


# -- encode ----------------------------------------------------------------------------------


def _moments(core, x: torch.Tensor, f: int, tile: Dict[str, Any], cb) -> torch.Tensor:
    """A tiled node's posterior parameters (B, 2C, h, w) for x (B, C, H, W) on the device, in the core's dtype."""
    t, o = tile["tile_size"], tile["overlap"]
    if x.shape[-2] <= t and x.shape[-1] <= t:
        out = core.encode(x).latent_dist.parameters
        cb(1, 1)
        return out
    if tile["method"] == "exact":
        return exact_tiled_encode(core, x, tile_size=t, callback=cb)
    # diffusers' blend tiling with integer pixels: tiles every t - o pixels, o // f latent rows cross-faded
    return tiling.blend_tiled(core._moments, x, t, t - o, o // f, (t - o) // f, cb)


def encode(vae: AutoencoderKLVAE, image: torch.Tensor, posterior: str = "mode", seed: int = 0,
           tile: Optional[Dict[str, Any]] = None) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """IMAGE -> raw latents (B, C, H/f, W/f) float32 on the host's intermediate device, and a report."""
    if posterior not in ("mode", "sample"):
        raise ValueError(f"posterior={posterior!r}: choose 'mode' (the host's behaviour) or 'sample'")
    f = vae.downscale_ratio
    check_input(image, "image")
    warnings = input_warnings(image, "image")
    x = image_to_pixels(image, f, vae.input_channels)
    report, total = _prepare("encode", vae, x.shape, tile)
    report["warnings"] += warnings
    with _Measure(vae.device) as meas, outside_inference_mode():
        moments = _run_planned("encode", vae, x, f, tile, total, report)
        _check_output(moments, "encode", x)
        dist = DiagonalGaussianDistribution(moments.to(vae.output_device).float())
        if posterior == "mode":
            z = dist.mode()
        else:
            z = dist.sample(generator=torch.Generator("cpu").manual_seed(int(seed)))
    report["seconds"], report["peak_bytes"] = round(meas.seconds, 4), meas.peak
    return z.to(vae.vae_output_dtype()).contiguous(), report  # the host's intermediate dtype


def _run_planned(direction: str, vae: AutoencoderKLVAE, t: torch.Tensor, f: int, tile: Optional[Dict[str, Any]],
                 total: int, report: Dict[str, Any]) -> torch.Tensor:
    """Run through the core's planner, which owns the retries (fp32 on NaN/inf, exact tiling on
    out-of-memory); a tiled node's own settings are handed to it as a UserTiling."""
    core = vae.core
    dtype = next(core.parameters()).dtype
    user = None
    if tile is not None:
        report["tiles"] = total
        run = _moments if direction == "encode" else _pixels
        user = planner.UserTiling(tile["method"], tile["tile_size"], lambda model, inp, cb: run(model, inp, f, tile, cb),
                                  overlap=tile["overlap"])
    fn = planner.run_encode if direction == "encode" else planner.run_decode
    out, prep = fn(core, t.to(vae.device, dtype), dtype=dtype, callback=progress_callback(total, report["warnings"]),
                   free_bytes=_free_bytes(vae), user_tiling=user)
    _merge_planner_report(report, prep)
    if prep["tiled"] and prep["tile_size"] != (tile or {}).get("tile_size"):
        report["overlap"] = None  # the planner chose exact tiles: no overlap
    return out.to(vae.output_device)


# -- decode ----------------------------------------------------------------------------------


def _pixels(core, z: torch.Tensor, f: int, tile: Dict[str, Any], cb) -> torch.Tensor:
    """A tiled node's pixels (B, C, h*f, w*f) for raw latents z on the device, in the core's dtype."""
    t, o = tile["tile_size"], tile["overlap"]
    if z.shape[-2] * f <= t and z.shape[-1] * f <= t:
        out = core.decode(z).sample
        cb(1, 1)
        return out
    if tile["method"] == "exact":
        return exact_tiled_decode(core, z, tile_size=t, callback=cb)
    # diffusers' blend tiling with integer pixels: latent tiles of t // f every (t - o) // f, o pixels cross-faded
    return tiling.blend_tiled(core._pixels, z, t // f, (t - o) // f, o, t - o, cb)


def decode(vae: AutoencoderKLVAE, samples: torch.Tensor, tile: Optional[Dict[str, Any]] = None
           ) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Raw latents (B, C, h, w) -> IMAGE (B, h*f, w*f, 3) float32 in [0, 1] on the intermediate device."""
    vae.check_latent(samples)
    check_input(samples, "latent")
    warnings = input_warnings(samples, "latent")
    f = vae.upscale_ratio
    report, total = _prepare("decode", vae, samples.shape, tile)
    report["warnings"] += warnings
    with _Measure(vae.device) as meas, outside_inference_mode():
        x = _run_planned("decode", vae, samples, f, tile, total, report)
        _check_output(x, "decode", samples)
        image = pixels_to_image(x, vae.output_device).to(vae.vae_output_dtype())
    report["seconds"], report["peak_bytes"] = round(meas.seconds, 4), meas.peak
    return image, report
