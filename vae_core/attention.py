"""The VAE's single-head spatial self-attention and its interchangeable processors.

A processor computes the whole attention block for one `Attention` module, as in diffusers;
processors differ only in how they evaluate softmax(q k^T / sqrt(C)) v. Register new ones
with `register_attn_processor`.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Callable, Dict, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_half, memory
from .norm import GroupNorm
from .cpu_half import Linear

logger = logging.getLogger(__name__)

NORM_EPS = 1e-6

# With a progress hook set (`attention_progress`), queries are attended this many at a time and the
# hook is told after each chunk: at 4096^2 (262,144 tokens) that is 64 steps instead of one 12-minute call.
QUERY_CHUNK = 4096

ProgressHook = Callable[[int, int], None]


class Attention(nn.Module):
    """GroupNorm, one-head self-attention over all H*W positions, residual add.

    Parameter names are diffusers' (group_norm, to_q, to_k, to_v, to_out.0); LDM files store
    the same weights as norm, q, k, v, proj_out (1x1 convs), see `convert.py`.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.channels = channels
        self.heads = 1  # every KL-VAE uses a single head as wide as the mid block
        self.scale = channels ** -0.5  # diffusers spells it so (1/sqrt(C) differs in the last bit)
        self.group_norm = GroupNorm(groups, channels, eps=NORM_EPS, affine=True)
        self.to_q = Linear(channels, channels, bias=True)
        self.to_k = Linear(channels, channels, bias=True)
        self.to_v = Linear(channels, channels, bias=True)
        self.to_out = nn.ModuleList([Linear(channels, channels, bias=True), nn.Dropout(0.0)])
        self.processor: AttnProcessorBase = default_processor()
        self.progress: Optional[ProgressHook] = None  # see attention_progress

    # -- what diffusers' processors read (AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor,
    # XFormersAttnProcessor): the VAE's block is diffusers' Attention with these fixed settings.
    spatial_norm = None  # no MoVQ-style spatial norm
    norm_cross = None  # self-attention only: no encoder_hidden_states norm
    norm_q = None
    norm_k = None
    residual_connection = True
    rescale_output_factor = 1.0
    upcast_attention = False
    upcast_softmax = True  # scores go through softmax in fp32
    is_cross_attention = False
    only_cross_attention = False
    added_kv_proj_dim = None

    @property
    def inner_dim(self) -> int:
        return self.channels

    def prepare_attention_mask(self, attention_mask: Optional[torch.Tensor], target_length: int, batch_size: int,
                               out_dim: int = 3) -> Optional[torch.Tensor]:
        """A (B, Nq, Nk) or (B, 1, Nk) additive mask repeated per head: (B*heads, ., Nk) for out_dim=3,
        (B, heads, ., Nk) for out_dim=4. The VAE itself never passes a mask (None stays None)."""
        if attention_mask is None:
            return None
        if attention_mask.shape[-1] != target_length:
            raise ValueError(f"attention mask covers {attention_mask.shape[-1]} keys, the input has {target_length}")
        if attention_mask.shape[0] < batch_size * self.heads and out_dim == 3:
            attention_mask = attention_mask.repeat_interleave(self.heads, dim=0)
        elif out_dim == 4:
            attention_mask = attention_mask.unsqueeze(1).repeat_interleave(self.heads, dim=1)
        return attention_mask

    def head_to_batch_dim(self, tensor: torch.Tensor, out_dim: int = 3) -> torch.Tensor:
        """(B, N, heads*D) -> (B*heads, N, D) (out_dim=3) or (B, heads, N, D) (out_dim=4)."""
        b, n, dim = tensor.shape
        t = tensor.reshape(b, n, self.heads, dim // self.heads).permute(0, 2, 1, 3)  # (B, heads, N, D)
        return t.reshape(b * self.heads, n, dim // self.heads) if out_dim == 3 else t

    def batch_to_head_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """(B*heads, N, D) -> (B, N, heads*D)."""
        bh, n, d = tensor.shape
        t = tensor.reshape(bh // self.heads, self.heads, n, d).permute(0, 2, 1, 3)  # (B, N, heads, D)
        return t.reshape(bh // self.heads, n, self.heads * d)

    def get_attention_scores(self, query: torch.Tensor, key: torch.Tensor,
                             attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """softmax(scale * q k^T + mask) over keys, (B*heads, Nq, Nk), softmax in fp32 (upcast_softmax)."""
        return _softmax_scores(query, key, self.scale, attention_mask).to(query.dtype)

    fused_projections = False  # to_qkv present (fuse_projections), used instead of to_q/to_k/to_v

    @torch.no_grad()
    def fuse_projections(self, fuse: bool = True) -> None:
        """Add `to_qkv`, one (C -> 3C) linear holding to_q|to_k|to_v, which processors then use (one matmul
        instead of three); fuse=False removes it. As diffusers, the fused copy is a snapshot of the weights."""
        if not fuse:
            self._modules.pop("to_qkv", None)
            self.fused_projections = False
            return
        w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])  # (3C, C)
        b = torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias])
        self.to_qkv = Linear(w.shape[1], w.shape[0], bias=True, device=w.device, dtype=w.dtype)
        self.to_qkv.weight.copy_(w)
        self.to_qkv.bias.copy_(b)
        self.fused_projections = True

    def norm_encoder_hidden_states(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        raise ValueError("the VAE's attention is self-attention only: it has no norm for encoder_hidden_states")

    def set_processor(self, processor: "AttnProcessorBase") -> None:
        self.processor = processor

    def get_processor(self) -> "AttnProcessorBase":
        return self.processor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # every call is bounded: a processor whose score matrix would not fit runs sliced instead
        return bounded_processor(self.processor, x.shape, x.dtype, x.device)(self, x)


# -- processors ----------------------------------------------------------------------


class AttnProcessorBase:
    """Runs an `Attention` block; subclasses implement `attend(q, k, v)` on (B, N, C) tensors."""

    def attend(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if hidden_states.ndim != 4:
            raise ValueError(f"VAE attention expects (B, C, H, W), got shape {tuple(hidden_states.shape)}")
        b, c, h, w = hidden_states.shape
        residual = hidden_states
        normed = attn.group_norm(hidden_states)
        tokens = normed.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C); a view when channels_last
        del normed
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(tokens).chunk(3, dim=-1)  # (B, HW, C) each
        else:
            q = attn.to_q(tokens)
            k = attn.to_k(tokens)
            v = attn.to_v(tokens)
        del tokens
        out = self._attend_in_steps(attn, q, k, v)  # (B, HW, C)
        del q, k, v
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        out = out.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W), channels_last strides
        if out.requires_grad and torch.is_grad_enabled():
            return out + residual
        return out.add_(residual)

    def _attend_in_steps(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`attend`, in chunks of QUERY_CHUNK queries when a progress hook is set. Each query's
        softmax row is independent of the others, so chunking changes no value beyond kernel rounding."""
        hook = getattr(attn, "progress", None)
        n = q.shape[1]
        if hook is None:
            return self.attend(attn, q, k, v).to(q.dtype)
        steps = math.ceil(n / QUERY_CHUNK)
        if steps == 1:
            out = self.attend(attn, q, k, v).to(q.dtype)
            hook(1, 1)
            return out
        out = torch.empty_like(q)
        for i in range(steps):
            rows = slice(i * QUERY_CHUNK, (i + 1) * QUERY_CHUNK)
            out[:, rows] = self.attend(attn, q[:, rows], k, v)
            hook(i + 1, steps)  # may raise (a cancel): nothing is left half-written outside `out`
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def progress_steps(processor, tokens: int) -> int:
    """How many times `processor` calls a progress hook for `tokens` positions (at least once; a
    processor that does not derive from AttnProcessorBase never calls it, and counts as one step)."""
    return max(1, math.ceil(tokens / QUERY_CHUNK)) if isinstance(processor, AttnProcessorBase) else 1


@contextlib.contextmanager
def attention_progress(attn: Attention, hook: Optional[ProgressHook]) -> Iterator[None]:
    """Within the block, `attn`'s processor calls hook(done, steps) after each chunk of queries
    (`progress_steps` of them); the hook may raise to cancel."""
    old = attn.progress
    attn.progress = hook
    try:
        yield
    finally:
        attn.progress = old


def _softmax_scores(q: torch.Tensor, k: torch.Tensor, scale: float,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(scale * q k^T + mask) over keys, (B, Nq, Nk), in fp32 whatever the input dtype
    (diffusers' upcast_softmax=True for VAEs); the scores themselves are rounded to q's dtype first,
    as a half-precision matmul leaves them.

    On a CPU without native half precision (`cpu_half`) torch's bf16/fp16 matmuls are emulated at
    ~40x the fp32 time (4,096 positions, C=512, one thread, AMD EPYC without AVX512: bf16 36 s against
    0.93 s); there the product runs in fp32 on the upcast values and is rounded once to q's dtype,
    which is what the native kernel computes (exact products, fp32 sums, one rounding)."""
    if cpu_half.emulated(q):
        base = None if mask is None else mask.float()
        scores = _baddbmm(q.float(), k.float(), scale, base).to(q.dtype)
    else:
        scores = _baddbmm(q, k, scale, mask)
    return scores.float().softmax(dim=-1)


def _baddbmm(q: torch.Tensor, k: torch.Tensor, scale: float, base: Optional[torch.Tensor]) -> torch.Tensor:
    if base is None:
        base, beta = q.new_empty(q.shape[0], q.shape[1], k.shape[1]), 0
    else:
        beta = 1
    return torch.baddbmm(base, q, k.transpose(-1, -2), beta=beta, alpha=scale)  # (B, Nq, Nk)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    probs = _softmax_scores(q, k, scale).to(q.dtype)
    if cpu_half.emulated(q):
        return torch.bmm(probs.float(), v.float()).to(q.dtype)
    return torch.bmm(probs, v)


class AttnProcessor(AttnProcessorBase):
    """The reference: explicit score matrix, softmax, matmul. Memory grows as (H*W)^2."""

    def attend(self, attn, q, k, v):
        return _math_attention(q, k, v, attn.scale)


# bf16 attention on the CPU: query rows per chunk are sized so that one chunk's scores, their fp32
# softmax and its bf16 probabilities (8 bytes per score) stay within this many bytes.
CPU_BF16_CHUNK_BYTES = 64 << 20


@functools.lru_cache(maxsize=None)
def _cpu_bf16_matmul() -> bool:
    """Whether chunked matmul attention beats SDPA in bf16 on this CPU: with AVX512-BF16 but no AMX.
    There torch's CPU flash kernel runs bf16 at fp32 speed while bf16 matmuls are native (measured
    on an AMD EPYC: 0.28-0.46x SDPA's time). With AMX the flash kernel is fast itself (measured on
    an AMX Xeon: the matmul path took 1.7-3.6x SDPA's time), and without native bf16 the matmuls
    are emulated, so both keep SDPA."""
    def probe(name: str) -> bool:
        return bool(getattr(torch.cpu, name, lambda: False)())

    return probe("_is_avx512_bf16_supported") and not probe("_is_amx_tile_supported")


def _cpu_bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Math attention (bf16 matmuls, softmax in fp32) over chunks of queries, each within
    CPU_BF16_CHUNK_BYTES of transient scores: a bounded working set, like a fused kernel's."""
    b, n, c = q.shape
    rows = max(1, min(n, CPU_BF16_CHUNK_BYTES // (8 * b * k.shape[1])))
    if rows == n:
        return _math_attention(q, k, v, scale)
    out = torch.empty_like(q)
    for i in range(0, n, rows):
        out[:, i : i + rows] = _math_attention(q[:, i : i + rows], k, v, scale)
    return out


class AttnProcessor2_0(AttnProcessorBase):
    """torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels).

    On a CPU with AVX512-BF16 but no AMX, in bf16, it computes the same maths as explicit matmuls
    over bounded chunks of queries instead: there torch's CPU flash kernel (torch 2.14) ran bf16 no
    faster than fp32, 2.5-4x slower than these chunks at 1,024-16,384 positions and C=512 (one thread,
    AMD EPYC). With AMX the flash kernel is the faster one (1.7-3.6x, Intel Xeon), so it stays SDPA.
    The error against a float64 reference stays at bf16's level, about twice SDPA's, as the scores
    and probabilities are rounded to bf16 (4,096 positions, inputs of scale 1: 1.4e-3 against 7.6e-4).
    Chunking changes no value: each query row is computed alone. fp32 and fp16, and every other device, go
    to SDPA, and so does a CPU without native bf16."""

    def attend(self, attn, q, k, v):
        b, n, c = q.shape
        if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and _cpu_bf16_matmul()
                and not torch.compiler.is_compiling()):
            return _cpu_bf16_attention(q, k, v, attn.scale)
        # (B, heads=1, N, C), the layout diffusers passes, so kernel choice and rounding match
        out = F.scaled_dot_product_attention(q.view(b, n, 1, c).transpose(1, 2), k.view(b, -1, 1, c).transpose(1, 2),
                                             v.view(b, -1, 1, c).transpose(1, 2), dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(b, n, c)


class SlicedAttnProcessor(AttnProcessorBase):
    """Math attention over `slice_size` query positions at a time: peak score memory is
    slice_size * H*W instead of (H*W)^2. (diffusers slices over heads; the VAE has one.)"""

    def __init__(self, slice_size: int = 1024):
        if int(slice_size) < 1:
            raise ValueError(f"slice_size must be a positive number of query positions, got {slice_size}")
        self.slice_size = int(slice_size)

    def attend(self, attn, q, k, v):
        out = torch.empty_like(q)
        for start in range(0, q.shape[1], self.slice_size):
            stop = start + self.slice_size
            out[:, start:stop] = _math_attention(q[:, start:stop], k, v, attn.scale)
        return out

    def __repr__(self) -> str:
        return f"SlicedAttnProcessor(slice_size={self.slice_size})"


class XFormersAttnProcessor(AttnProcessorBase):
    """xformers' memory_efficient_attention; only available when xformers imports."""

    def __init__(self, attention_op: Optional[Callable] = None):
        try:
            import xformers.ops  # noqa: F401  (optional, heavy)
        except ImportError as err:
            raise ImportError(
                "XFormersAttnProcessor needs the xformers package, which is not importable here "
                f"({err}). Install xformers for your torch build, or use 'sdpa' (the default)."
            ) from err
        self.attention_op = attention_op

    def attend(self, attn, q, k, v):
        import xformers.ops

        return xformers.ops.memory_efficient_attention(q, k, v, op=self.attention_op, scale=attn.scale)


# -- the attention guard -------------------------------------------------------------


def score_rows(processor) -> int:
    """Query rows whose (rows, H*W) score matrix `processor` builds at once: 0 for the fused kernels
    (SDPA, xformers), its slice for the sliced one, what a processor declares in an int attribute
    `score_rows`, and every query (memory.ALL_ROWS) for plain matmul and for any other processor."""
    declared = getattr(processor, "score_rows", None)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    if isinstance(processor, (AttnProcessor2_0, XFormersAttnProcessor)):
        return 0
    if isinstance(processor, SlicedAttnProcessor):
        return processor.slice_size
    return memory.ALL_ROWS


def bounded_processor(processor, shape, dtype: torch.dtype, device) -> Callable:
    """`processor`, unless the score matrices it would build for an input of `shape` (B, C, H, W) exceed
    the attention budget (`memory.attention_budget`): then the sliced form of the same maths, sized to
    fit. Raises ValueError when not even one query row fits."""
    b, _c, h, w = shape
    tokens = h * w
    rows = min(score_rows(processor), tokens)
    if rows == 0:
        return processor
    limit = memory.attention_budget(device)
    need = memory.score_bytes(b, rows, tokens, dtype)
    if need <= limit:
        return processor
    fit = memory.rows_within(limit, b, tokens, dtype)
    if fit < 1:
        raise ValueError(
            f"VAE attention over {tokens} positions (batch {b}) needs {need / 2**20:.0f} MiB of score matrices "
            f"with {type(processor).__name__}, and even one query row ({memory.score_bytes(b, 1, tokens, dtype)} "
            f"bytes) exceeds the {limit} bytes free memory leaves for it; use a smaller image or batch, or free "
            "memory (unload other models)")
    logger.info("attention: %s would build %.1f GiB of score matrices for %d positions; running it as "
                "SlicedAttnProcessor(slice_size=%d) within %.0f MiB", type(processor).__name__, need / 2**30,
                tokens, fit, limit / 2**20)
    return SlicedAttnProcessor(fit)


# -- registry ----------------------------------------------------------------------

# name -> factory(**kwargs) -> processor
_REGISTRY: Dict[str, Callable[..., AttnProcessorBase]] = {}


def register_attn_processor(name: str, factory: Callable[..., AttnProcessorBase], *, overwrite: bool = False) -> None:
    """Make `factory` available as `set_attn_processor(name)` and in the node's combo."""
    key = name.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"attention processor {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[key] = factory


def available_attn_processors() -> list[str]:
    """Registered names whose backend can run here (xformers only when it imports)."""
    names = []
    for name in _REGISTRY:
        if name == "xformers":
            try:
                import xformers.ops  # noqa: F401
            except ImportError:
                continue
        names.append(name)
    return names


def make_attn_processor(name: str, **kwargs) -> AttnProcessorBase:
    try:
        factory = _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown attention processor {name!r}; registered: {sorted(_REGISTRY)}") from None
    return factory(**kwargs)


def default_processor() -> AttnProcessorBase:
    """SDPA, as diffusers defaults to on torch >= 2.0."""
    return AttnProcessor2_0()


register_attn_processor("math", lambda **kw: AttnProcessor())
register_attn_processor("sdpa", lambda **kw: AttnProcessor2_0())
register_attn_processor("sliced", lambda slice_size=1024, **kw: SlicedAttnProcessor(slice_size))
register_attn_processor("xformers", lambda **kw: XFormersAttnProcessor())
