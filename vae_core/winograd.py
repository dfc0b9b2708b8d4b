"""Winograd F(2x2, 3x3) convolutions for the VAE's widest 3x3 convs, fp32 inference on the CPU.

A 3x3 convolution computes each 2x2 block of outputs from the 4x4 block of inputs around it. In
Winograd's minimal filtering form (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016) that block costs 16 products per input/output channel pair instead of 36: the
4x4 input tile d and the 3x3 kernel g are transformed, multiplied elementwise and transformed
back,

    Y = A^T [(G g G^T) * (B^T d B)] A,

and summed over input channels the elementwise products become 16 matrix products, one per
position of the 4x4 transformed tile: (tiles, Cin) @ (Cin, Cout). So the multiply-adds fall to
16/36 = 0.44 of the direct conv's; the transforms are additions and halvings only (no constant
larger than 1, so F(2x2, 3x3) rounds no worse than the direct conv: measured 1.3-1.8e-6 against
float64 where oneDNN's direct conv gave 4.6-8.3e-6, on SD-size layers).

What it costs is memory traffic: the transformed input is 4x the input, the products 4x the
output. Those passes are cheap against the products only where the channels are wide, so this
serves convs with at least `MIN_CHANNELS` input and output channels (in every SD-family VAE the
256- and 512-channel levels and the mid blocks: half to two thirds of the conv work), and runs in
bands of tile rows (`BAND_ROWS` tiles per product, at most `BAND_BYTES` of transformed input),
so its extra memory is bounded whatever the image size. The 16 products go through oneDNN's
matrix product, as the direct convs do. Everything else, and every dtype but fp32, stays on oneDNN's direct convolution.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import cpu_half

# Convs narrower than this (in or out) stay direct: at 128 channels the transforms' memory passes
# cost what the 2.25x fewer multiply-adds save (benchmarks/bench_winograd.py, the README's table).
MIN_CHANNELS = 256
# Tiles per band: each of the 16 products is a (BAND_ROWS, Cin) @ (Cin, Cout) matrix product,
# large enough to run near the GEMM's peak (256 rows ran well below it on this project's CPU).
BAND_ROWS = 1024
# ...and the band's workspace (the transformed input and the products) stays below this.
BAND_BYTES = 32 << 20

# Images smaller than this many 2x2 tiles (32x32 px) stay direct: their products are too short.
MIN_TILES = 256

# Kernel transform G (4x3); B^T and A^T are written out in the code as additions.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))

enabled = True  # a switch for benchmarks and tests: False sends every conv to the direct path


def winograd_ok(conv: nn.Conv2d, h: torch.Tensor) -> bool:
    """Whether `winograd_conv(conv, h)` applies: fp32 CPU inference outside torch.compile, a plain
    3x3 conv (stride 1, zero padding 1, no groups) with >= MIN_CHANNELS in and out, on a dense
    channels_last input of even height and width."""
    if not enabled or torch.compiler.is_compiling() or torch.is_grad_enabled():
        return False
    if type(conv) not in (nn.Conv2d, cpu_half.Conv2d):  # another subclass (LoRA, quantised) has its own forward
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if h.device.type != "cpu" or h.dtype != torch.float32 or conv.weight.dtype != torch.float32:
        return False
    if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.dilation != (1, 1):
        return False
    if conv.groups != 1 or conv.padding_mode != "zeros":
        return False
    if min(conv.in_channels, conv.out_channels) < MIN_CHANNELS:
        return False
    if h.dim() != 4 or h.shape[2] % 2 or h.shape[3] % 2 or h.shape[2] * h.shape[3] < 4 * MIN_TILES:
        return False
    return h.is_contiguous(memory_format=torch.channels_last)


def kernel_transform(weight: torch.Tensor) -> torch.Tensor:
    """G g G^T for every (out, in) channel pair: (16, Cout, Cin), position 4a+b of the transformed
    4x4 tile first, each a dense (Cout, Cin) matrix as oneDNN's matrix product takes its weights.
    One product of the 16x9 matrix G (x) G with the 9 kernel taps: a few ms against the conv's tens.
    Computed per call: caching it would hold 16/9 of every wide conv's weights beside them."""
    cout, cin = weight.shape[:2]
    g = weight.new_tensor(_G)
    kron = torch.kron(g, g)  # (16, 9): tap (k, l) of the 3x3 kernel -> position (a, b) of the 4x4 tile
    taps = weight.permute(2, 3, 0, 1).reshape(9, cout * cin)  # (9 taps, Cout x Cin)
    return torch.mm(kron, taps).view(16, cout, cin)


def _rows(p: torch.Tensor, out: torch.Tensor) -> None:
    """B^T along dim 0 of p, four rows per tile with stride 2: p (2n+2, ...) -> out (4, n, ...)."""
    n = out.shape[1]
    r = [p[j : j + 2 * n : 2] for j in range(4)]
    torch.sub(r[0], r[2], out=out[0])
    torch.add(r[1], r[2], out=out[1])
    torch.sub(r[2], r[1], out=out[2])
    torch.sub(r[1], r[3], out=out[3])


def _product(v: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """v @ u.T (+ bias) through oneDNN's matrix product: (rows, Cin), (Cout, Cin) -> (rows, Cout).
    On this project's AMD CPU it ran 10-25% faster than torch.bmm (MKL) on these shapes."""
    return torch.ops.mkldnn._linear_pointwise(v, u, bias, "none", [], "")


def winograd_conv(conv: nn.Conv2d, h: torch.Tensor, add_to: Optional[torch.Tensor] = None) -> torch.Tensor:
    """conv(h) (check `winograd_ok`), or with `add_to` conv(h) + add_to computed into add_to's
    buffer (a dense channels_last tensor shaped like the result). Returns a channels_last tensor."""
    batch, cin, height, width = h.shape
    cout = conv.out_channels
    u = kernel_transform(conv.weight)  # (16, Cout, Cin)
    th, tw = height // 2, width // 2  # tiles down and across
    # tile rows per band: BAND_ROWS tiles, but no more workspace than BAND_BYTES
    per_row = 16 * tw * (cin + cout) * 4
    nb = max(1, min(th, -(-BAND_ROWS // tw), BAND_BYTES // per_row))
    out = add_to if add_to is not None else torch.empty(batch, cout, height, width, memory_format=torch.channels_last)
    pad = h.new_zeros(2 * nb + 2, width + 2, cin)  # one band of input rows, zero-padded
    rows = h.new_empty(4, nb, width + 2, cin)
    v = h.new_empty(4, 4, nb, tw, cin)
    for i in range(batch):
        x = h[i].permute(1, 2, 0)  # (H, W, Cin), dense
        y = out[i].permute(1, 2, 0).view(th, 2, tw, 2, cout)  # output rows 2t+a, columns 2s+b
        for t0 in range(0, th, nb):
            n = min(nb, th - t0)
            lo, hi = 2 * t0 - 1, 2 * (t0 + n) + 1  # input rows of this band's tiles, with their halo
            p = pad[: 2 * n + 2]
            p[0].zero_() if lo < 0 else None
            p[-1].zero_() if hi > height else None
            a, b = max(lo, 0), min(hi, height)
            p[a - lo : b - lo, 1 : width + 1].copy_(x[a:b])
            r = rows[:, :n]
            _rows(p, r)  # (4, n, W+2, Cin)
            vb = v[:, :, :n]
            for k in range(4):  # the same transform across, on each transformed row
                _rows(r[k].transpose(0, 1), vb[k].transpose(1, 2))
            vb = vb.reshape(16, n * tw, cin)  # a view but for the last, shorter band
            # the 16 products; A^T's column 1 is all ones, so the bias added to product (1, 1)
            # reaches all four outputs of each tile
            m = [_product(vb[k], u[k], bias=conv.bias if k == 5 else None).view(n, tw, cout) for k in range(16)]
            # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] down (s0, s1 per column b), then across
            s0 = [m[b] + m[4 + b] for b in range(4)]
            s1 = [m[4 + b] - m[8 + b] for b in range(4)]
            for b in range(4):
                s0[b] += m[8 + b]
                s1[b] -= m[12 + b]
            del m
            yb = y[t0 : t0 + n]
            for k, s in enumerate((s0, s1)):
                y0, y1 = yb[:, k, :, 0], yb[:, k, :, 1]  # output rows 2t+k, even and odd columns
                if add_to is None:
                    torch.add(s[0], s[1], out=y0)
                    y0 += s[2]
                    torch.sub(s[1], s[2], out=y1)
                    y1 -= s[3]
                else:
                    e = s[0] + s[1]
                    e += s[2]
                    y0 += e
                    torch.sub(s[1], s[2], out=e)
                    e -= s[3]
                    y1 += e
    return out
