"""Convolutional building blocks of the KL-VAE: resnet, down/up-sampling and the level blocks.

Module and parameter names follow diffusers so that state dicts load with strict=True.
Attention lives in `attention.py`; the encoder/decoder wiring in `model.py`.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .norm import GroupNorm

# GroupNorm epsilon used by every SD-family VAE (diffusers' resnet_eps, LDM's Normalize).
NORM_EPS = 1e-6


def _silu(h: torch.Tensor) -> torch.Tensor:
    # In place whenever autograd does not need the input: saves one activation-sized buffer.
    if h.requires_grad and torch.is_grad_enabled():
        return F.silu(h)
    return F.silu(h, inplace=True)


def _mish(h: torch.Tensor) -> torch.Tensor:
    if h.requires_grad and torch.is_grad_enabled():
        return F.mish(h)
    return F.mish(h, inplace=True)


def _relu(h: torch.Tensor) -> torch.Tensor:
    if h.requires_grad and torch.is_grad_enabled():
        return F.relu(h)
    return F.relu(h, inplace=True)


# Name -> activation, the names diffusers' get_activation accepts for VAEs.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": _silu,
    "swish": _silu,
    "mish": _mish,
    "gelu": F.gelu,
    "relu": _relu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"act_fn {name!r} is not supported; choose one of {sorted(ACTIVATIONS)}") from None


def checkpointed(owner: nn.Module, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """block(*args), through owner's gradient-checkpointing function when it is enabled and autograd is on."""
    if owner.gradient_checkpointing and torch.is_grad_enabled():
        return owner._gradient_checkpointing_func(block, *args)
    return block(*args)


def group_norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(num_groups=groups, num_channels=channels, eps=NORM_EPS, affine=True)


class ResnetBlock2D(nn.Module):
    """norm -> act -> conv3x3 -> norm -> act -> conv3x3, plus a (1x1-projected) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str = "silu"):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.act = get_activation(act_fn)
        # LDM calls this nin_shortcut; diffusers conv_shortcut.
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        if h.requires_grad and torch.is_grad_enabled():
            return x + h
        return h.add_(x)  # same sum as x + h (addition commutes exactly), one buffer fewer


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right (LDM's asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


# Row taps of a 3x3 kernel after nearest-2x upsampling: output row 2i reads low-res rows
# (i-1, i, i) and output row 2i+1 reads (i, i, i+1); folding them gives a 2x2 kernel per phase.
_PHASE_FOLD = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


def subpixel_weights(conv: nn.Conv2d) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Fold a 3x3 conv that follows nearest-2x upsampling into one (4*Cout, Cin, 2, 2) conv on the
    low-res input; output channels are ordered (row phase, col phase, Cout). Folded in float64,
    so the only difference from the reference is fp32 summation order."""
    w = conv.weight.detach().double()  # (Cout, Cin, 3, 3)
    fold = torch.tensor(_PHASE_FOLD, dtype=torch.float64, device=w.device)  # (phase, 2, 3)
    k = torch.einsum("apk,oikl,bql->aboipq", fold, w, fold)  # (2, 2, Cout, Cin, 2, 2)
    k = k.reshape(4 * w.shape[0], w.shape[1], 2, 2).to(conv.weight.dtype)
    bias = None if conv.bias is None else conv.bias.detach().repeat(4)
    return k, bias


def subpixel_upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           pad: Tuple[int, int, int, int] = (1, 1, 1, 1)) -> torch.Tensor:
    """conv3x3(nearest2x(x)) from folded weights: (B, Cin, n, m) -> (B, Cout, 2n, 2m).

    Costs 16 multiply-adds per low-res pixel and channel pair instead of 36.
    """
    b, _, n, m = x.shape
    c = weight.shape[0] // 4
    y = F.conv2d(F.pad(x, pad), weight, bias)  # (B, 4*Cout, n+1, m+1)
    y = y.view(b, 2, 2, c, n + 1, m + 1)
    # keep the input's memory format (channels_last on CPU) so the next conv needs no reorder
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and c > 1 else torch.contiguous_format
    out = torch.empty((b, c, 2 * n, 2 * m), dtype=y.dtype, device=y.device, memory_format=fmt)
    for a in range(2):
        for e in range(2):
            out[:, :, a::2, e::2] = y[:, a, e, :, a : a + n, e : e + m]
    return out


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv.

    Without autograd it runs in sub-pixel form (see `subpixel_weights`), 2.25x fewer FLOPs;
    the folded kernel is cached until the weight changes.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self._folded: Optional[Tuple[tuple, torch.Tensor, Optional[torch.Tensor]]] = None

    def folded(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if torch.compiler.is_compiling():
            # inside torch.compile the fold is part of the graph (no cache: data_ptr/_version break graphs)
            return subpixel_weights(self.conv)
        w = self.conv.weight
        # inference tensors (made under torch.inference_mode) have no version counter
        key = (w.data_ptr(), None if w.is_inference() else w._version, w.dtype, w.device)
        if self._folded is None or self._folded[0] != key:
            self._folded = (key, *subpixel_weights(self.conv))
        return self._folded[1], self._folded[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.conv.weight.requires_grad):
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        weight, bias = self.folded()
        return subpixel_upsample_conv(x.to(weight.dtype), weight, bias)


class DownEncoderBlock2D(nn.Module):
    """One encoder level: `num_layers` resnets, then an optional downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                x = down(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """One decoder level: `num_layers` resnets, then an optional upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                x = up(x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet -> (attention) -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool):
        super().__init__()
        # attentions registered before resnets, as in diffusers, so parameters() come in its order;
        # diffusers keeps a None placeholder so the module path stays attentions.0.
        self.attentions = nn.ModuleList([Attention(channels, groups) if add_attention else None])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, act_fn) for _ in range(2)])
        self.gradient_checkpointing = False  # set by AutoencoderKL.enable_gradient_checkpointing
        self._gradient_checkpointing_func: Optional[Callable] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = checkpointed(self, self.resnets[0], x)
        attn: Optional[Attention] = self.attentions[0]
        if attn is not None:
            x = attn(x)
        return checkpointed(self, self.resnets[1], x)
