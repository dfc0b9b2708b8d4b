"""bf16 and fp16 convolutions on CPUs without native support for them.

oneDNN runs bf16 convolutions natively where the CPU has AVX512 (BW/VL/DQ), AVX512-BF16, AMX or
AVX-NE-CONVERT, and fp16 ones with AVX512-FP16 or AMX-FP16. Elsewhere (AMD Zen 2/3, Intel before
Skylake-SP, most laptops; fp16 on nearly every CPU) torch falls back to its im2col path with
emulated half-precision matrix products, measured on an AMD EPYC without AVX512 at about 90-100x
the fp32 conv's time (a 64-channel 3x3 conv at 64²: bf16 0.87 s, fp16 0.85 s, fp32 0.0087 s), and
oneDNN's fused primitives refuse bf16 outright.

There a half-precision conv (or linear) runs here as an fp32 one on the upcast tensors, its output
rounded to the half dtype. A product of two bf16 or two fp16 values is exact in fp32, and a native
half-precision conv accumulates in fp32 and rounds its output once (to inf past fp16's range, which
the precision policy's fp32 retry catches), so this computes what such a conv computes, up to
summation order, at fp32 speed. It costs an fp32 copy of the input and an fp32 output while the
conv runs: half precision saves memory between layers there, not time.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn


def _probe(name: str) -> bool:
    try:
        return bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):  # a torch without the probe, or built without oneDNN
        return False


# Whether oneDNN runs convolutions of each half dtype natively on this CPU. A module global so
# that tests can turn the emulation on where the CPU does not need it.
NATIVE: Dict[torch.dtype, bool] = {
    torch.bfloat16: _probe("_is_mkldnn_bf16_supported"),
    torch.float16: _probe("_is_mkldnn_fp16_supported"),
}


def emulated(x: torch.Tensor) -> bool:
    """Whether a conv or linear on `x` runs as an upcast fp32 one here."""
    return x.device.type == "cpu" and x.dtype in NATIVE and not NATIVE[x.dtype]


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias=None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> torch.Tensor:
    """F.conv2d, with half precision on a CPU without native support computed as described above."""
    if emulated(x):
        b = None if bias is None else bias.float()
        return F.conv2d(x.float(), weight.float(), b, stride, padding, dilation, groups).to(x.dtype)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (the same parameters, state dict and hooks) whose half-precision CPU convs go
    through `conv2d` where the CPU has no native support."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias):
        if self.padding_mode == "zeros" and emulated(input):
            return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose half-precision CPU products run the same way (the attention projections: a
    bf16 matrix product without native support measured 8x the fp32 one's time, 4096 x 512 x 512;
    fp16 5x)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if emulated(input):
            b = None if self.bias is None else self.bias.float()
            return F.linear(input.float(), self.weight.float(), b).to(input.dtype)
        return super().forward(input)
