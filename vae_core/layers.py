"""Convolutional building blocks of the KL-VAE: resnet, down/up-sampling and the level blocks.

Module and parameter names follow diffusers so that state dicts load with strict=True.
Attention lives in `attention.py`; the encoder/decoder wiring in `model.py`.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_half
from .attention import Attention
from .cpu_half import Conv2d
from .norm import GroupNorm, writable_here
from .winograd import winograd_conv, winograd_ok

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


def no_hooks(module: nn.Module) -> bool:
    """No forward hooks on `module`, its children, or globally: nobody else can hold an
    intermediate tensor, so inference may overwrite the ones that are dead."""
    from torch.nn.modules import module as _m

    if torch.compiler.is_compiling():  # a compiled graph plans its own buffers
        return False
    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def run_owned(owner: nn.Module, blocks: Iterable[nn.Module], box: List[torch.Tensor]) -> torch.Tensor:
    """box.pop() through `blocks` in turn, as `h = checkpointed(owner, block, h)` would, but at
    inference without hooks each block gets the only reference to its input (`consume`), so the
    input is freed once the block's first layer has read it instead of when the block returns.
    The caller hands its tensor over in `box` and keeps no reference. For an SD encoder at 256²
    that is one 32 MiB activation less at the peak."""
    owned = no_hooks(owner) and not (owner.gradient_checkpointing and torch.is_grad_enabled())
    h = box.pop()
    for block in blocks:
        if owned:
            box = [h]
            del h
            h = block.consume(box)
        else:
            h = checkpointed(owner, block, h)
    return h


def norm_(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """norm(x), in place when `norm` is our GroupNorm and that is safe (see GroupNorm.forward_)."""
    return norm.forward_(x) if isinstance(norm, GroupNorm) else norm(x)


_FUSED_DTYPES = (torch.float32, torch.bfloat16)


def onednn_ok(conv: nn.Conv2d, h: torch.Tensor) -> bool:
    """Whether `conv` on `h` can be called as a oneDNN primitive directly: CPU inference, fp32/bf16,
    a dense channels_last input of the weights' dtype, zero padding given as numbers."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or h.device.type != "cpu":
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if h.dtype not in _FUSED_DTYPES or h.dtype != conv.weight.dtype or conv.padding_mode != "zeros":
        return False
    if cpu_half.emulated(h):  # oneDNN's primitives refuse bf16 on CPUs without it
        return False
    if isinstance(conv.padding, str) or h.dim() != 4 or h.shape[1] <= 1:
        return False
    return h.is_contiguous(memory_format=torch.channels_last)


def fused_add_ok(conv: nn.Conv2d, h: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `conv_add_(conv, h, out)` can run as one oneDNN conv with a sum post-op: `onednn_ok`,
    and `out` a dense channels_last tensor of h's dtype shaped like the result, writable here."""
    if not onednn_ok(conv, h) or out.dtype != h.dtype or out.dim() != 4 or out.shape[1] <= 1:
        return False
    if not writable_here(out):
        return False
    if not out.is_contiguous(memory_format=torch.channels_last):
        return False
    kh, kw = conv.kernel_size
    (ph, pw), (sh, sw), (dh, dw) = conv.padding, conv.stride, conv.dilation
    size = ((h.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (h.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
    return tuple(out.shape) == (h.shape[0], conv.out_channels, *size)


def conv_onednn(conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
    """conv(h) through oneDNN directly (check `onednn_ok`). For the resnets' 1x1 shortcuts, where
    torch's dispatch picks its slow im2col path for channels_last input: 23 vs 48 ms for
    512 -> 256 channels at 128² on this project's CPU (one thread)."""
    return torch.ops.mkldnn._convolution_pointwise(h, conv.weight, conv.bias, list(conv.padding), list(conv.stride),
                                                   list(conv.dilation), conv.groups, "none", [], "")


def conv_add_(conv: nn.Conv2d, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = conv(h) + out, in out's buffer, as one oneDNN convolution with a sum post-op (check
    `fused_add_ok` first). It skips the conv's fresh output buffer (whose page faults cost about
    as much as the add) and the separate add pass: 18% off a 128-channel 256² conv + add on this
    project's CPU. fp32 results equal conv(h).add_(out) to the last bit or within one rounding;
    bf16 ones round once instead of twice."""
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        out, h, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        "add", 1.0, None, [], None)


def conv3x3(conv: nn.Conv2d, h: torch.Tensor, private: bool) -> torch.Tensor:
    """conv(h), through Winograd's F(2x2, 3x3) where it applies (`winograd.winograd_ok`: fp32 CPU
    inference, >= 256 channels in and out) and no hook can see that the module was not called."""
    return winograd_conv(conv, h) if private and winograd_ok(conv, h) else conv(h)


def group_norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(num_groups=groups, num_channels=channels, eps=NORM_EPS, affine=True)


class ResnetBlock2D(nn.Module):
    """norm -> act -> conv3x3 -> norm -> act -> conv3x3, plus a (1x1-projected) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str = "silu"):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.act = get_activation(act_fn)
        # LDM calls this nin_shortcut; diffusers conv_shortcut.
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, owned=False)

    def forward_owned(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) for a caller that never reads x again: its buffer may receive the result."""
        return self._run(x, owned=True)

    def _shortcut(self, x: torch.Tensor, private: bool) -> torch.Tensor:
        sc = self.conv_shortcut
        return conv_onednn(sc, x) if private and onednn_ok(sc, x) else sc(x)

    def _run(self, x: torch.Tensor, owned: bool) -> torch.Tensor:
        private = no_hooks(self)  # no hook can hold an intermediate: dead ones may be overwritten
        if self.conv_shortcut is not None and private and owned:
            # the skip first: then x itself is dead and norm1 can normalise it in place, so the
            # widest tensor of the block (its input) is never held twice
            skip = self._shortcut(x, private)
            h = conv3x3(self.conv1, self.act(norm_(self.norm1, x)), private)
            del x
            x = skip
        else:
            h = conv3x3(self.conv1, self.act(self.norm1(x)), private)
            if self.conv_shortcut is not None:
                x = self._shortcut(x, private)
                owned = True  # a tensor of our own
        # conv1's output is dead after norm2: at inference it is normalised in place (no new buffer)
        h = self.act(norm_(self.norm2, h) if private else self.norm2(h))
        if private and owned and fused_add_ok(self.conv2, h, x):
            if winograd_ok(self.conv2, h):
                return winograd_conv(self.conv2, h, add_to=x)
            return conv_add_(self.conv2, h, x)
        h = conv3x3(self.conv2, h, private)
        if h.requires_grad and torch.is_grad_enabled():
            return x + h
        return h.add_(x)  # same sum as x + h (addition commutes exactly), one buffer fewer


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right (LDM's asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


# Row taps of a 3x3 kernel after nearest-2x upsampling: output row 2i reads low-res rows
# (i-1, i, i) and output row 2i+1 reads (i, i, i+1); folding them gives a 2x2 kernel per phase.
_PHASE_FOLD = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
_FOLD_CHUNK = 32  # output channels folded per step


def subpixel_weights(conv: nn.Conv2d) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Fold a 3x3 conv that follows nearest-2x upsampling into one (4*Cout, Cin, 2, 2) conv on the
    low-res input; output channels are ordered (row phase, col phase, Cout). Folded in float64,
    so the only difference from the reference is fp32 summation order."""
    w = conv.weight.detach()  # (Cout, Cin, 3, 3)
    cout, cin = w.shape[:2]
    fold = torch.tensor(_PHASE_FOLD, dtype=torch.float64, device=w.device)  # (phase, 2, 3)
    k = torch.empty((2, 2, cout, cin, 2, 2), dtype=w.dtype, device=w.device)
    # a few output channels at a time, so the float64 temporaries stay small (for 512 channels
    # the whole fold at once held about 70 MiB beyond the 16 MiB result)
    for o in range(0, cout, _FOLD_CHUNK):
        part = w[o : o + _FOLD_CHUNK].double()
        k[:, :, o : o + _FOLD_CHUNK] = torch.einsum("apk,oikl,bql->aboipq", fold, part, fold).to(w.dtype)
    bias = None if conv.bias is None else conv.bias.detach().repeat(4)
    return k.reshape(4 * cout, cin, 2, 2), bias


def subpixel_phases(xp: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], top: int, left: int,
                    n: int, m: int, fmt: torch.memory_format) -> torch.Tensor:
    """The (B, Cout, 2n, 2m) output of folded weights on the padded low-res input `xp`, whose
    row `top`, column `left` holds the tap above-left of output pixel (0, 0).

    One 2x2 conv per phase, each on its own (n+1, m+1) window, written straight into its pixels
    of the output: no (B, 4*Cout, n+1, m+1) intermediate (which made the upsampler's peak hold
    twice its output), and none of its discarded row and column. Each output value is the same
    dot product as in the one-conv form; on this project's CPU the four convs are also 5-15% faster.
    """
    b = xp.shape[0]
    c = weight.shape[0] // 4
    w = weight.view(2, 2, c, *weight.shape[1:])
    bs = None if bias is None else bias.view(2, 2, c)
    out = torch.empty((b, c, 2 * n, 2 * m), dtype=xp.dtype, device=xp.device, memory_format=fmt)
    for a in range(2):
        for e in range(2):
            window = xp[:, :, top + a : top + a + n + 1, left + e : left + e + m + 1]
            out[:, :, a::2, e::2] = cpu_half.conv2d(window, w[a, e], None if bs is None else bs[a, e])
    return out


def subpixel_upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           pad: Tuple[int, int, int, int] = (1, 1, 1, 1)) -> torch.Tensor:
    """conv3x3(nearest2x(x)) from folded weights: (B, Cin, n, m) -> (B, Cout, 2n, 2m).

    Costs 16 multiply-adds per low-res pixel and channel pair instead of 36.
    """
    n, m = x.shape[2:]
    c = weight.shape[0] // 4
    # keep the input's memory format (channels_last on CPU) so the next conv needs no reorder
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and c > 1 else torch.contiguous_format
    return subpixel_phases(F.pad(x, pad), weight, bias, 0, 0, n, m, fmt)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv.

    Without autograd it runs in sub-pixel form (see `subpixel_weights`), 2.25x fewer FLOPs;
    the folded kernel is cached until the weight changes.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, padding=1)
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


class _ResnetStack(nn.Module):
    """`num_layers` resnets, then an optional resampler: the body of the encoder's and the
    decoder's levels. Subclasses name the resampler list as diffusers does."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(num_layers)
        )

    def _samplers(self) -> Optional[nn.ModuleList]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, owned=False)

    def consume(self, box: List[torch.Tensor]) -> torch.Tensor:
        """forward(box.pop()); a caller that hands over its only reference this way lets each
        intermediate be freed as soon as the next layer has used it (see `run_owned`), and the
        first resnet may write its result into the input's buffer."""
        return self._run(box.pop(), owned=True)

    def _run(self, x: torch.Tensor, owned: bool) -> torch.Tensor:
        private = no_hooks(self)
        for resnet in self.resnets:
            x = resnet.forward_owned(x) if private and owned else resnet(x)
            owned = True  # from here on x is a tensor of ours
        for sampler in self._samplers() or ():
            x = sampler(x)
        return x


class DownEncoderBlock2D(_ResnetStack):
    """One encoder level: `num_layers` resnets, then an optional downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, add_downsample: bool):
        super().__init__(in_channels, out_channels, num_layers, groups, act_fn)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def _samplers(self) -> Optional[nn.ModuleList]:
        return self.downsamplers


class UpDecoderBlock2D(_ResnetStack):
    """One decoder level: `num_layers` resnets, then an optional upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, add_upsample: bool):
        super().__init__(in_channels, out_channels, num_layers, groups, act_fn)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def _samplers(self) -> Optional[nn.ModuleList]:
        return self.upsamplers


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
