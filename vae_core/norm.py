"""GroupNorm with statistics that stay accurate on large channels_last tensors.

torch's CPU GroupNorm (and batch_norm_update_stats) for channels_last input accumulate each
group's sums in fp32 over the whole image. The error grows with the pixel count: on a
(1, 128, 2048, 2048) tensor the normalised output is off by up to 6e-3, against 1e-6 for the same
tensor in NCHW (torch 2.14, measured with `benchmarks/bench_norm.py`). The model keeps its
activations channels_last on the CPU, where convs are faster, so its GroupNorms use the
statistics below instead: per-channel moments of row chunks of at most `CHUNK_PIXELS` pixels,
merged into per-group mean and variance in float64. With 8192-pixel chunks the 2048^2 error is
1.9e-6, the same as torch's NCHW kernel, and the statistics take 0.08 s of the norm's 0.6 s.
The exact tiler (`exact_tiling.py`) merges tiles with the same code, so tiled and untiled runs
normalise with the same numbers.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# Pixels per chunk whose per-channel moments are taken in fp32 by one kernel call.
CHUNK_PIXELS = 1 << 13


def _channels_last_strides(t: torch.Tensor) -> bool:
    """NHWC in memory (channels innermost), dense or a crop of such a tensor."""
    return t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1 and t.shape[3] > 1 and t.stride(3) != 1


class GroupStats:
    """Per-(batch, group) mean and variance of a tensor seen in pieces (tiles, row chunks).

    `add` records per-channel (count, mean, M2) of each piece; `finish` merges them all at once in
    float64 with the two-pass form of Chan et al.'s update:
    mean = sum n_i m_i / N,  M2 = sum M2_i + sum n_i (m_i - mean)^2.
    """

    def __init__(self, batch: int, groups: int, device=None):
        self.batch, self.groups = batch, groups
        self.counts: List[int] = []
        self.means: List[torch.Tensor] = []  # (B, C) float64 each
        self.m2s: List[torch.Tensor] = []

    def add(self, t: torch.Tensor) -> None:
        b, c, h, w = t.shape
        if h * w == 0:
            return
        if _channels_last_strides(t):
            # bands of rows, each made dense channels_last (a no-op for whole-width bands of one item)
            step = max(1, CHUNK_PIXELS // w)
            for r in range(0, h, step):
                self._add_dense(t[:, :, r : r + step], torch.channels_last)
        else:
            # torch's NCHW reduction is accurate at any size (it sums per channel plane)
            self._add_dense(t, torch.contiguous_format)

    def _add_dense(self, t: torch.Tensor, fmt: torch.memory_format) -> None:
        b, c, h, w = t.shape
        # torch.batch_norm_update_stats gives per-channel mean and biased variance in one call,
        # ~20x faster than var_mean on the CPU; it pools the batch, so one call per item.
        # Half-precision channels_last input on the CPU goes to the kernel as it is, with fp32 running
        # buffers (throwaway; momentum 0): it then accumulates in fp32 and returns fp32 moments without
        # an fp32 copy of the chunk (3x faster on 512-channel chunks). They are those of the copy to
        # the last bit for most chunk shapes and within an fp32 rounding of them for the rest, equally
        # accurate against float64. (Without the buffers it returns moments rounded to the input's
        # dtype, 0.4% off in the variance; on NCHW input its fp32 path is the more accurate.)
        as_is = t.dtype in (torch.bfloat16, torch.float16) and t.device.type == "cpu" and fmt == torch.channels_last
        running = (torch.zeros(c, dtype=torch.float32), torch.ones(c, dtype=torch.float32)) if as_is else (None, None)
        per_item = [torch.batch_norm_update_stats((item if as_is else item.float()).contiguous(memory_format=fmt),
                                                  *running, 0.0)
                    for item in (t[i : i + 1] for i in range(b))]
        self.counts.append(h * w)
        self.means.append(torch.stack([m for m, _ in per_item]).double())
        self.m2s.append(torch.stack([v for _, v in per_item]).double() * (h * w))

    def finish(self, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, rstd), each (B, G) float64; the variance is biased, as torch's GroupNorm uses."""
        if not self.counts:
            raise ValueError("GroupStats.finish: no elements were added")
        g = self.groups
        means = torch.stack(self.means)  # (K, B, C)
        m2s = torch.stack(self.m2s)
        k, b, c = means.shape
        n = torch.tensor(self.counts, dtype=torch.float64, device=means.device).view(k, 1, 1, 1)
        means = means.view(k, b, g, c // g)
        m2s = m2s.view(k, b, g, c // g)
        total = n.sum() * (c // g)
        mean = (means * n).sum((0, 3)) / total  # (B, G)
        m2 = m2s.sum((0, 3)) + (n * (means - mean[None, :, :, None]).pow(2)).sum((0, 3))
        return mean, torch.rsqrt(m2 / total + eps)


def apply_group_norm(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, norm: nn.GroupNorm,
                     inplace: bool = False) -> torch.Tensor:
    """(x - mean) * rstd * gamma + beta with (B, G) float64 statistics; the result has x's dtype and
    memory format.

    The per-channel scale and shift are folded in float64 and applied by torch's inference batch-norm
    kernel with mean 0, variance 1 and eps 0 (so its 1/sqrt(var + eps) is exactly 1): one fused
    multiply-add per element in fp32, rounded once to x's dtype, without fp32 temporaries for
    half-precision input (3-5x faster than the same sum spelt with addcmul and casts for bf16).

    With `inplace` the result overwrites x (the same kernel through its out= form, so the numbers
    are the same): no new buffer, which on the CPU also saves the page faults of a fresh one
    (about 20 ms for a 32 MiB activation on this project's CPU, 5x the kernel itself).
    """
    b, c = x.shape[:2]
    g = norm.num_groups
    scale = rstd.view(b, g, 1)
    shift = -mean.view(b, g, 1) * scale
    if norm.affine:
        gamma = norm.weight.detach().double().view(1, g, c // g)
        beta = norm.bias.detach().double().view(1, g, c // g)
        scale, shift = scale * gamma, shift * gamma + beta
    else:
        scale, shift = scale.expand(b, g, c // g), shift.expand(b, g, c // g)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = scale.reshape(b, c).to(acc)
    shift = shift.reshape(b, c).to(acc)
    zero = torch.zeros(c, dtype=acc, device=x.device)
    one = torch.ones(c, dtype=acc, device=x.device)
    if inplace:
        unused = torch.empty(0, dtype=acc, device=x.device)
        for i in range(b):  # statistics are per item; batch_norm's parameters are per channel
            item = x[i : i + 1]
            torch.ops.aten.native_batch_norm.out(item, scale[i], shift[i], zero, one, False, 0.0, 0.0,
                                                 out=item, save_mean=unused, save_invstd=unused)
        return x
    if b == 1:
        return F.batch_norm(x, zero, one, scale[0], shift[0], False, 0.0, 0.0)
    out = torch.empty_like(x)
    for i in range(b):  # statistics are per item; batch_norm's parameters are per channel
        out[i : i + 1] = F.batch_norm(x[i : i + 1], zero, one, scale[i], shift[i], False, 0.0, 0.0)
    return out


def writable_here(t: torch.Tensor) -> bool:
    """Whether `t` may be written in place in the current mode: an inference tensor cannot be
    written outside inference mode, nor a normal one inside it."""
    return t.is_inference() == torch.is_inference_mode_enabled()


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state-dict names) that computes its statistics with
    `GroupStats` where torch's kernel would lose precision: channels_last input on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not _channels_last_strides(x):
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            # training: torch's NCHW kernel (accurate, differentiable), handed back channels_last
            y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
            return y.contiguous(memory_format=torch.channels_last)
        return apply_group_norm(x, *self._stats(x), self)

    def _stats(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        stats = GroupStats(x.shape[0], self.num_groups)
        stats.add(x)
        return stats.finish(self.eps)

    def forward_(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) written into x where that is safe and gives the same numbers: inference on a
        dense channels_last CPU tensor the caller no longer needs, with no hooks on this module.
        Elsewhere it is forward(x)."""
        if torch.compiler.is_compiling():  # a compiled graph plans its own buffers
            return self(x)
        if (x.device.type != "cpu" or torch.is_grad_enabled() or self._forward_hooks or self._forward_pre_hooks
                or not x.is_contiguous(memory_format=torch.channels_last) or not _channels_last_strides(x)
                or not writable_here(x)):
            return self(x)
        return apply_group_norm(x, *self._stats(x), self, inplace=True)
