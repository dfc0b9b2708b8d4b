"""The one memory model of vae_core: every peak-memory estimate (untiled, exact tiled, blend tiled,
attention score matrices, batch splits), the free-memory probe and the attention budget.

Pure arithmetic on shapes and config fields: it runs no network and imports nothing else of vae_core
(the planner, exact tiling, attention and the nodes ask it; web/akl_lib.js mirrors `tile_working_bytes`).
On the CPU, free memory honours a container's cgroup limit (v2 and v1) as well as MemAvailable.
"""
from __future__ import annotations

import contextlib
import os
import contextvars
from typing import Any, Iterator, Optional, Sequence, Union

import torch

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
# Halo (px) a tile carries through a chain of convs between checkpoints (a few latent px).
HALO_PX = 64
# An attention score matrix (plus its fp32 softmax) may take at most this many bytes at once, and never
# more than the budget: above it, queries are sliced. Slicing costs no time: 8192 positions x 512
# channels, fp32, one CPU thread, took 6.5-7.0 s whole (512 MiB), sliced at 256 MiB or at 64 MiB
# (5.8-7.0 s; noise on a shared machine). The 2048^2 SD decode's whole matrix would be 32 GiB.
ATTENTION_SCORE_CAP = 256 * 2**20

Dtype = Union[torch.dtype, int]  # a torch dtype, or its size in bytes
# `rows` of a processor that builds the score matrix of every query at once (plain matmul, or unknown).
ALL_ROWS = 2**62


def itemsize(dtype: Dtype) -> int:
    """Bytes per element of `dtype` (an int is taken as the size itself)."""
    if isinstance(dtype, int):
        return dtype
    return torch.empty((), dtype=dtype).element_size()


# -- free memory and budgets ------------------------------------------------------------------


def free_memory(device: Union[torch.device, str]) -> Optional[int]:
    """Bytes that a run on `device` may use: CUDA free memory plus what torch's cache holds unused,
    or on the CPU MemAvailable from /proc/meminfo bounded by the container's cgroup limit (where one
binds this process). None when it cannot be known (other platforms)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))
    if device.type == "cpu":
        candidates = [v for v in (_meminfo_available(), cgroup_available()) if v is not None]
        return min(candidates) if candidates else None
    return None


def _meminfo_available() -> Optional[int]:
    """MemAvailable from /proc/meminfo in bytes, None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# -- system memory within a container: cgroup limits (v2 and v1) --------------------------------

CGROUP_ROOT = "/sys/fs/cgroup"
# cgroup v1 writes "no limit" as a number near 2**63 (PAGE_COUNTER_MAX pages); nothing real is this big
_UNLIMITED = 1 << 60


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _own_cgroup_dirs(root: str, membership: str = "/proc/self/cgroup") -> list:
    """The cgroup directories that bound this process: v2's (the unified line of /proc/self/cgroup)
    and v1's memory controller, each with its ancestors up to the mount point."""
    lines = (_read(membership) or "").splitlines()
    rels = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, controllers, rel = parts
        if controllers == "":  # v2
            rels.append(("", rel))
        elif "memory" in controllers.split(","):  # v1
            rels.append(("memory", rel))
    dirs = []
    for sub, rel in rels:
        base = os.path.join(root, sub) if sub else root
        rel = rel.strip("/")
        while True:
            d = os.path.join(base, rel) if rel else base
            if os.path.isdir(d):
                dirs.append(d)
            if not rel:
                break
            rel = os.path.dirname(rel)
    if not dirs and os.path.isdir(root):  # a container with its own cgroup namespace: the root is ours
        dirs.append(root)
    return dirs


def _inactive_file(stat: Optional[str]) -> int:
    """Page cache the kernel can drop before it runs the OOM killer ('inactive_file' in memory.stat)."""
    for line in (stat or "").splitlines():
        key, _, value = line.partition(" ")
        if key in ("inactive_file", "total_inactive_file"):
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def cgroup_available(root: str = CGROUP_ROOT, membership: str = "/proc/self/cgroup") -> Optional[int]:
    """Bytes this process's cgroup still lets it take (the tightest limit minus what is charged,
    less the droppable page cache), None when no cgroup limits it."""
    best = None
    for d in _own_cgroup_dirs(root, membership):
        for limit_name, usage_name in (("memory.max", "memory.current"),
                                       ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            raw_limit, raw_usage = _read(os.path.join(d, limit_name)), _read(os.path.join(d, usage_name))
            if raw_limit is None or raw_usage is None or raw_limit == "max":
                continue
            try:
                limit, usage = int(raw_limit), int(raw_usage)
            except ValueError:
                continue
            if limit <= 0 or limit >= _UNLIMITED:
                continue
            used = max(0, usage - _inactive_file(_read(os.path.join(d, "memory.stat"))))
            free = max(0, limit - used)
            best = free if best is None else min(best, free)
    return best



def budget(free_bytes: int) -> int:
    """What a run may plan to use out of `free_bytes` (the SAFETY margin off)."""
    return int(free_bytes * SAFETY)


_ATTENTION_FREE: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("akl_attention_free", default=None)


@contextlib.contextmanager
def attention_free_bytes(free_bytes: Optional[int]) -> Iterator[None]:
    """Within the block, attention budgets come from `free_bytes` (the planner's figure) instead of
    the device's free memory measured at each call. None changes nothing (an enclosing figure stays)."""
    if free_bytes is None:
        yield
        return
    token = _ATTENTION_FREE.set(free_bytes)
    try:
        yield
    finally:
        _ATTENTION_FREE.reset(token)


def attention_budget(device: Union[torch.device, str]) -> int:
    """Bytes one attention call's score matrices may take: ATTENTION_SCORE_CAP, or less when free
    memory (the planner's figure inside `attention_free_bytes`, else measured now) is short."""
    free = _ATTENTION_FREE.get()
    if free is None:
        free = free_memory(device)
    if free is None:
        return ATTENTION_SCORE_CAP
    return min(ATTENTION_SCORE_CAP, budget(free))


# -- attention ----------------------------------------------------------------------------------


def score_bytes_per_element(dtype: Dtype) -> int:
    """Bytes per (query, key) pair while a plain-matmul softmax runs: the scores in the compute dtype
    plus the fp32 softmax (and its fp32 copy of half-precision scores)."""
    size = itemsize(dtype)
    return 8 if size >= 4 else size + 8


def score_bytes(batch: int, rows: int, tokens: int, dtype: Dtype) -> int:
    """Bytes of the score matrices of `rows` queries against `tokens` keys, for the whole batch."""
    return batch * rows * tokens * score_bytes_per_element(dtype)


def rows_within(limit: int, batch: int, tokens: int, dtype: Dtype) -> int:
    """The most queries whose score matrices fit in `limit` bytes (0: not even one)."""
    per_row = batch * tokens * score_bytes_per_element(dtype)
    return max(0, int(limit) // per_row) if per_row else 0


def attention_rows(tokens: int, rows: Optional[int], dtype: Dtype, batch: int = 1,
                   limit: int = ATTENTION_SCORE_CAP) -> int:
    """Query rows whose scores a run holds at once: `rows` (None: a processor with no score matrix)
    as the attention guard bounds it to `limit` bytes."""
    if not rows:
        return 0
    rows = min(int(rows), tokens)
    if score_bytes(batch, rows, tokens, dtype) <= limit:
        return rows
    return max(1, rows_within(limit, batch, tokens, dtype))


# -- the layer walk ------------------------------------------------------------------------------
#
# `config` is anything with block_out_channels, latent_channels, in_channels, out_channels and
# mid_block_add_attention (an AutoencoderKLConfig, or the nodes' model summary). Element counts are
# exact integers; bytes are multiplied in at the end, in the order web/akl_lib.js repeats.


def _factor(config: Any) -> int:
    return 2 ** (len(config.block_out_channels) - 1)


def _resnet_elems(cin: int, cout: int, hw: int) -> int:
    return (2 * cin + cout) * hw  # input (kept for the skip), norm1 output, conv1 output


def _peak_bytes(kind: str, shape: Sequence[int], config: Any, size: int, rows: int) -> int:
    """Largest number of activation bytes alive at once in an untiled run, per the layer walk;
    `rows` query rows of attention scores (0: fused attention)."""
    b, _c, h, w = shape
    ch = tuple(config.block_out_channels)
    f = _factor(config)
    peaks = []

    def attention(tokens: int) -> int:
        # residual, q, k, v and the output are live together, plus the bounded score matrices
        return 5 * ch[-1] * tokens * size + rows * tokens * score_bytes_per_element(size)

    if kind == "decode":
        full = (h * f) * (w * f)
        hw = h * w
        peaks.append((config.latent_channels + ch[-1]) * hw * size)
        peaks.append(_resnet_elems(ch[-1], ch[-1], hw) * size)
        if config.mid_block_add_attention:
            peaks.append(attention(hw))
        rev = tuple(reversed(ch))
        for i, cout in enumerate(rev):
            cin = rev[max(i - 1, 0)]
            peaks.append(_resnet_elems(cin, cout, hw) * size)
            if i < len(rev) - 1:
                peaks.append(9 * cout * hw * size)  # input, nearest-2x copy, conv output (both 4x)
                hw *= 4
        peaks.append((2 * rev[-1] * full + config.out_channels * full) * size)
    elif kind == "encode":
        hw = h * w
        peaks.append((config.in_channels + ch[0]) * hw * size)
        for i, cout in enumerate(ch):
            cin = ch[max(i - 1, 0)]
            peaks.append(_resnet_elems(cin, cout, hw) * size)
            if i < len(ch) - 1:
                peaks.append(cout * hw * 9 // 4 * size)  # input, zero-padded copy, output (1/4)
                hw //= 4
        if config.mid_block_add_attention:
            peaks.append(attention(hw))
        peaks.append(3 * ch[-1] * hw * size)
    else:
        raise ValueError(f"kind must be 'encode' or 'decode', got {kind!r}")
    return b * max(peaks)


def io_bytes(kind: str, shape: Sequence[int], config: Any, dtype: Dtype) -> int:
    """Bytes of the input (`shape`, B C H W; the latent's for decode) and the output of a run."""
    b, c, h, w = shape
    f = _factor(config)
    if kind == "decode":
        elems = b * (c * h * w + config.out_channels * h * f * w * f)
    else:
        elems = b * (c * h * w + 2 * config.latent_channels * (h // f) * (w // f))
    return elems * itemsize(dtype)


def _tokens(kind: str, shape: Sequence[int], config: Any) -> int:
    """Positions the mid-block attention attends over for an input of `shape`."""
    h, w = shape[-2:]
    if kind == "encode":
        for _ in range(len(config.block_out_channels) - 1):
            h, w = (h - 2) // 2 + 1, (w - 2) // 2 + 1
    return h * w


def estimate_bytes(kind: str, shape: Sequence[int], dtype: Dtype, config: Any, rows: Optional[int] = None) -> int:
    """Peak bytes above the loaded weights of an untiled `kind` ("encode" or "decode") of an input of
    `shape` (B, C, H, W) (latent shape for decode) in `dtype`. `rows`: the query rows of attention
    scores the processor builds at once (`attention.score_rows`), bounded as the attention guard bounds them;
    None or 0 for a fused processor."""
    size = itemsize(dtype)
    bounded = attention_rows(_tokens(kind, shape, config), rows, size, shape[0])
    peak = _peak_bytes(kind, shape, config, size, bounded) + io_bytes(kind, shape, config, size)
    return int(peak * UNTILED_CALIBRATION[kind]) + OVERHEAD_BYTES


def trunk_elems(kind: str, shape: Sequence[int], config: Any) -> int:
    """Elements of the widest checkpoint of an exact tiled run of an input of `shape`: a resnet output
    at full resolution (block_out_channels[0] channels). The leanest plan holds about one."""
    b, _c, h, w = shape
    f = _factor(config) if kind == "decode" else 1
    return b * config.block_out_channels[0] * h * f * w * f


def estimate_tiled_bytes(kind: str, shape: Sequence[int], dtype: Dtype, config: Any, tile_size: int,
                         rows: Optional[int] = None) -> int:
    """Peak bytes above the weights of an exact tiled run with `tile_size` px tiles: the largest
    resnet output (a checkpoint), three bands of it in flight and one tile's working set, or the
    whole-latent attention pass (its input, q, k, v, output and bounded scores) when that is larger."""
    b, c, h, w = shape
    f = _factor(config)
    size = itemsize(dtype)
    px_h, px_w = (h * f, w * f) if kind == "decode" else (h, w)
    trunk = trunk_elems(kind, shape, config)
    band = b * config.block_out_channels[0] * min(tile_size, px_h) * px_w
    t = min(tile_size, max(px_h, px_w)) + 2 * HALO_PX
    tile_shape = (b, c, t // f, t // f) if kind == "decode" else (b, c, t, t)
    work = _peak_bytes(kind, tile_shape, config, size, 0)
    tiles = (trunk + 3 * band) * size + work
    tokens = _tokens(kind, shape, config)
    attn = 0
    if config.mid_block_add_attention:
        bounded = attention_rows(tokens, rows, size, b)
        attn = b * (5 * config.block_out_channels[-1] * tokens * size + bounded * tokens * score_bytes_per_element(size))
    peak = max(tiles, attn) + io_bytes(kind, shape, config, size)
    return int(peak * TILED_CALIBRATION) + OVERHEAD_BYTES


def estimate_blend_bytes(kind: str, shape: Sequence[int], dtype: Dtype, config: Any, tile_size: int, overlap: int,
                         rows: Optional[int] = None) -> int:
    """Peak bytes of a blend-tiled run (diffusers' cross-fade) in `tile_size` px tiles overlapping by
    `overlap` px: one tile's untiled run, plus every tile's output kept until the rows are blended
    (about (t / (t - o))^2 outputs), plus the input and the blended output."""
    b, c, h, w = shape
    f = _factor(config)
    lat = tile_size // f
    tile_shape = (b, c, min(lat, h), min(lat, w)) if kind == "decode" else (b, c, min(tile_size, h), min(tile_size, w))
    one = estimate_bytes(kind, tile_shape, dtype, config, rows)
    out = io_bytes(kind, shape, config, dtype) - b * c * h * w * itemsize(dtype)  # the whole output alone
    kept = int((tile_size / max(1, tile_size - overlap)) ** 2 * out)
    return one + kept + io_bytes(kind, shape, config, dtype)


def fits_one_tile(kind: str, shape: Sequence[int], config: Any, tile_size: int) -> bool:
    """Does an input of `shape` fit in one `tile_size` px tile (the tiled nodes then run untiled)?"""
    f = _factor(config) if kind == "decode" else 1
    return shape[-2] * f <= tile_size and shape[-1] * f <= tile_size


def estimate_run_bytes(kind: str, shape: Sequence[int], dtype: Dtype, config: Any, method: Optional[str] = None,
                       tile_size: Optional[int] = None, overlap: int = 0, rows: Optional[int] = None) -> int:
    """Peak bytes of a run as the tiled nodes and the planner make it: untiled (`method` None, or an
    input that fits in one tile), "exact" or "blend" tiled."""
    if method is None or tile_size is None or fits_one_tile(kind, shape, config, tile_size):
        return estimate_bytes(kind, shape, dtype, config, rows)
    if method == "exact":
        return estimate_tiled_bytes(kind, shape, dtype, config, tile_size, rows)
    if method == "blend":
        return estimate_blend_bytes(kind, shape, dtype, config, tile_size, overlap, rows)
    raise ValueError(f"tiling method {method!r} is unknown; choose 'blend' or 'exact'")


# -- batches -------------------------------------------------------------------------------------


def chunk_bytes(kind: str, shape: Sequence[int], chunk: int, dtype: Dtype, config: Any, **run: Any) -> int:
    """Peak bytes of a batch of `shape` run `chunk` images at a time: one chunk's run, plus the input
    and output of the other images, which wait in memory. `run`: as for `estimate_run_bytes`."""
    b = shape[0]
    chunk = max(1, min(int(chunk), b))
    rest = (b - chunk,) + tuple(shape[1:])
    return estimate_run_bytes(kind, (chunk,) + tuple(shape[1:]), dtype, config, **run) + \
        io_bytes(kind, rest, config, dtype)


def largest_chunk(kind: str, shape: Sequence[int], limit: int, dtype: Dtype, config: Any, **run: Any) -> int:
    """The most images of the batch `shape` that one run may take so that `chunk_bytes` stays within
    `limit` bytes; 0 when not even one image fits."""
    lo, hi = 0, int(shape[0])  # chunk_bytes grows with the chunk: the largest that fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if chunk_bytes(kind, shape, mid, dtype, config, **run) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


# -- the tile grid (the web panel) ---------------------------------------------------------------


def tile_working_bytes(kind: str, tile_h: int, tile_w: int, config: Any, dtype: Dtype, batch: int = 1) -> int:
    """Activation peak of one `tile_h` x `tile_w` px tile of `batch` images (fused attention, no
    input/output, no overhead): the number the tiled nodes' grid shows. web/akl_lib.js repeats it."""
    f = _factor(config)
    shape = (batch, config.latent_channels, tile_h // f, tile_w // f) if kind == "decode" \
        else (batch, config.in_channels, tile_h, tile_w)
    return int(_peak_bytes(kind, shape, config, itemsize(dtype), 0) * UNTILED_CALIBRATION[kind])
