"""Exact tiled encode/decode: tiles with halos, GroupNorm statistics pooled over the whole image.

The result equals the untiled model up to fp32 rounding (not a blend of tiles). It is not a
blender: `tiling.py` holds diffusers' cross-fade tiling.

How it works
------------
The encoder or decoder is written out as a small graph of *nodes* (convs, norm+activation,
resnet adds, down/up-sampling, the mid-block attention). Every node can compute any
rectangular *region* of its output from regions of its inputs, zero-padded exactly where the
untiled layer would zero-pad, so a tile is computed with just the halo its convolutions need.

A GroupNorm needs the mean and variance of its whole input, so the graph is run as a sequence
of *passes*, one per GroupNorm in network order. Pass k evaluates the norm's input tile by tile
and merges per-tile (count, mean, M2) per (batch, group) in float64 (`norm.GroupStats`, the same
code the untiled model's GroupNorm uses); the variance is biased, as torch's GroupNorm uses. Later passes
reuse those statistics. A pass may also *store* its tensor, in horizontal bands, to become a
checkpoint that later passes start from; everything between checkpoints is recomputed per tile.
Which tensors are stored is a memory/time trade (`store_budget`, bytes): resnet outputs are always
stored; any other tensor a GroupNorm reads (a conv1 output, an up/down-sampled tensor) is stored
when that fits the budget, else recomputed in each later pass that reads it. Bands of a checkpoint
are freed as soon as no remaining tile can reach them, so e.g. the 1024^2 input of the top decoder
level is released while the 2048^2 output fills; the leanest plan (`store_budget=0`) holds about
one largest resnet output at a time. Above that, checkpoints are added greedily by the
multiply-adds they save (`_ExactRun._choose_stores`); by default the budget is what free memory
allows, so a run that has the memory recomputes nothing.

Nearest-2x upsampling followed by a 3x3 conv is computed as four 2x2 convs on the low-resolution
tensor (one per output phase, "sub-pixel" form): the same sums in another order (fp32-rounding
differences only) at 16/36 of the multiply-adds, which pays for recomputing it.

The mid-block attention runs once over the whole latent with the model's own processor, bounded by
the attention guard (`attention.bounded_processor`: query slicing when its score matrix would not fit).
Memory estimates are `memory.py`'s; this module imports neither the planner nor the nodes.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import cpu_half, memory
from .attention import Attention, AttnProcessorBase, attention_progress, bounded_processor, progress_steps
from .layers import ResnetBlock2D, conv_onednn, onednn_ok, subpixel_phases, subpixel_weights
from .winograd import winograd_conv, winograd_ok
from .norm import GroupStats, apply_group_norm

logger = logging.getLogger(__name__)

ProgressCallback = Optional[Callable[[int, int], None]]

# (row0, row1, col0, col1), half-open, in the coordinates of one node's output
Region = Tuple[int, int, int, int]

# -- regions ----------------------------------------------------------------------------


def _grow(r: Region, n: int) -> Region:
    return (r[0] - n, r[1] + n, r[2] - n, r[3] + n)


def _clip(r: Region, size: Tuple[int, int]) -> Region:
    return (max(r[0], 0), min(r[1], size[0]), max(r[2], 0), min(r[3], size[1]))


def _contains(outer: Region, inner: Region) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1] and outer[2] <= inner[2] and inner[3] <= outer[3]


def _crop(t: torch.Tensor, have: Region, want: Region) -> torch.Tensor:
    return t[:, :, want[0] - have[0] : want[1] - have[0], want[2] - have[2] : want[3] - have[2]]


def _format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last when `t` (or the tensor it is a crop of) is laid out NHWC, else NCHW. The model
    may keep its conv weights NHWC, where oneDNN/cuDNN are faster; tiles then stay NHWC."""
    if t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1 and t.shape[3] > 1 and t.stride(3) != 1:
        return torch.channels_last
    return torch.contiguous_format


def _zero_pad(t: torch.Tensor, want: Region, have: Region) -> torch.Tensor:
    """`t` holds region `have` (clipped to the image); pad zeros out to `want` (the conv's padding)."""
    pads = (have[2] - want[2], want[3] - have[3], have[0] - want[0], want[1] - have[1])  # (left, right, top, bottom)
    if any(p < 0 for p in pads):
        raise AssertionError(f"region {have} is not inside {want}")
    if not any(pads):
        return t
    return F.pad(t, pads)


# -- nodes ------------------------------------------------------------------------------


class Node:
    """One tensor of the network as a function of regions: `compute(inputs, r)` returns its
    output on region `r` from input tensors on the (zero-padded) regions `need(i, r)`."""

    name: str = "node"

    def __init__(self, inputs: Sequence["Node"], size: Tuple[int, int], channels: int, scale: float):
        self.inputs = list(inputs)
        self.size = size  # (H, W) of this node's output
        self.channels = channels
        self.scale = scale  # image pixels per pixel of this node (tile sizes are given in image pixels)
        self.store: Optional["BandedStore"] = None  # set once this node is a checkpoint
        self.shared = False  # read by more than one consumer: memoise within a tile
        self.self_pad = False  # compute() gets (tensor, clipped region) and pads as the layer does
        self._memo: Optional[Tuple[Region, torch.Tensor]] = None

    def need(self, i: int, r: Region) -> Region:
        return r  # pointwise by default

    def compute(self, ins: List[torch.Tensor], r: Region) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.name}{self.size}x{self.channels}"


class InputNode(Node):
    name = "input"


class ConvNode(Node):
    """Conv2d with stride 1 and 'same' padding (k=1 or 3): needs a (k-1)/2 halo."""

    name = "conv"

    def __init__(self, conv: torch.nn.Conv2d, src: Node):
        super().__init__([src], src.size, conv.out_channels, src.scale)
        self.conv = conv
        self.halo = conv.kernel_size[0] // 2
        self.self_pad = True

    def need(self, i, r):
        return _grow(r, self.halo)

    def compute(self, ins, r):
        # 'same' conv over the clipped input region: zero padding lands exactly on the image
        # border, and the one garbage pixel at inner edges falls outside r and is cropped away
        t, have = ins[0]
        w = self.conv.weight
        t = t.to(w.dtype)
        if winograd_ok(self.conv, t):  # the untiled model's path for wide fp32 convs, on the tile
            return _crop(winograd_conv(self.conv, t), have, r)
        return _crop(cpu_half.conv2d(t, w, self.conv.bias, padding=self.halo), have, r)


class DownNode(Node):
    """Downsample2D: zero row/column appended bottom/right, then a stride-2 3x3 conv."""

    name = "down"

    def __init__(self, conv: torch.nn.Conv2d, src: Node):
        h, w = src.size
        super().__init__([src], ((h - 2) // 2 + 1, (w - 2) // 2 + 1), conv.out_channels, src.scale * 2)
        self.conv = conv

    def need(self, i, r):
        return (2 * r[0], 2 * r[1] + 1, 2 * r[2], 2 * r[3] + 1)

    def compute(self, ins, r):
        w = self.conv.weight
        return cpu_half.conv2d(ins[0].to(w.dtype), w, self.conv.bias, stride=2)


class UpNode(Node):
    """Upsample2D (nearest 2x, then 3x3 conv) evaluated in sub-pixel form on the low-res input."""

    name = "up"

    def __init__(self, conv: torch.nn.Conv2d, src: Node):
        h, w = src.size
        super().__init__([src], (2 * h, 2 * w), conv.out_channels, src.scale / 2)
        self.conv = conv
        self.weight, self.bias = subpixel_weights(conv)
        self.self_pad = True

    @staticmethod
    def _low(r: Region) -> Region:
        return (r[0] // 2, (r[1] + 1) // 2, r[2] // 2, (r[3] + 1) // 2)

    def need(self, i, r):
        return _grow(self._low(r), 1)

    def compute(self, ins, r):
        t, have = ins[0]  # low-res input on clip(lo grown by 1)
        lo = self._low(r)
        n, m = lo[1] - lo[0], lo[3] - lo[2]
        j0, k0 = lo[0] - have[0], lo[2] - have[2]
        # padding by 1 supplies the zero row/col where `have` was clipped at the border; padded
        # row j0 holds the tap above output row 0 (input row lo[0]-1)
        out = subpixel_phases(F.pad(t.to(self.weight.dtype), (1, 1, 1, 1)), self.weight, self.bias, j0, k0, n, m,
                              _format_of(t))
        have = (2 * lo[0], 2 * lo[1], 2 * lo[2], 2 * lo[3])
        return _crop(out, have, r)


class NormActNode(Node):
    """GroupNorm with statistics pooled over the whole tensor (set by a pass), then the activation."""

    name = "norm"

    def __init__(self, norm: torch.nn.GroupNorm, act: Optional[Callable], src: Node):
        super().__init__([src], src.size, src.channels, src.scale)
        self.norm = norm
        self.act = act
        self.stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (mean, rstd), (B, G) float64

    def compute(self, ins, r):
        if self.stats is None:
            raise AssertionError("GroupNorm statistics used before the pass that computes them")
        y = apply_group_norm(ins[0], *self.stats, self.norm)
        return self.act(y) if self.act is not None else y


class AddNode(Node):
    """The resnet output: main path + (1x1-projected) input."""

    name = "add"

    def __init__(self, main: Node, skip: Node, shortcut: Optional[torch.nn.Conv2d]):
        super().__init__([main, skip], main.size, main.channels, main.scale)
        self.shortcut = shortcut

    def compute(self, ins, r):
        h, x = ins
        if self.shortcut is not None:
            sc = self.shortcut
            x = x.to(sc.weight.dtype)
            dense = x.contiguous(memory_format=torch.channels_last) if _format_of(x) == torch.channels_last else x
            # torch sends channels_last 1x1 convs down its slow path; oneDNN directly where it can
            x = conv_onednn(sc, dense) if onednn_ok(sc, dense) else cpu_half.conv2d(x, sc.weight, sc.bias)
        return h.add_(x)


class AttentionNode(Node):
    """The mid-block attention: global, so it is run once on the whole stored input."""

    name = "attn"

    def __init__(self, attn: Attention, src: Node):
        super().__init__([src], src.size, src.channels, src.scale)
        self.attn = attn

    def compute(self, ins, r):
        raise AssertionError("attention is evaluated whole by the planner, never per tile")


# -- graph building -----------------------------------------------------------------------


def _resnet(block: ResnetBlock2D, x: Node) -> Node:
    x.shared = True
    h = ConvNode(block.conv1, NormActNode(block.norm1, block.act, x))
    h = ConvNode(block.conv2, NormActNode(block.norm2, block.act, h))
    return AddNode(h, x, block.conv_shortcut)


def _encoder_graph(model, x: torch.Tensor) -> Tuple[InputNode, Node]:
    enc = model.encoder
    src = InputNode([], tuple(x.shape[-2:]), x.shape[1], 1.0)
    h: Node = ConvNode(enc.conv_in, src)
    for block in enc.down_blocks:
        for resnet in block.resnets:
            h = _resnet(resnet, h)
        if block.downsamplers is not None:
            for down in block.downsamplers:
                h = DownNode(down.conv, h)
    h = _mid(enc.mid_block, h)
    h = ConvNode(enc.conv_out, NormActNode(enc.conv_norm_out, enc.conv_act, h))
    if model.quant_conv is not None:
        h = ConvNode(model.quant_conv, h)
    return src, h


def _decoder_graph(model, z: torch.Tensor) -> Tuple[InputNode, Node]:
    dec = model.decoder
    f = float(model.config.downscale_factor)
    src = InputNode([], tuple(z.shape[-2:]), z.shape[1], f)
    h: Node = src
    if model.post_quant_conv is not None:
        h = ConvNode(model.post_quant_conv, h)
    h = ConvNode(dec.conv_in, h)
    h = _mid(dec.mid_block, h)
    for block in dec.up_blocks:
        for resnet in block.resnets:
            h = _resnet(resnet, h)
        if block.upsamplers is not None:
            for up in block.upsamplers:
                h = UpNode(up.conv, h)
    h = ConvNode(dec.conv_out, NormActNode(dec.conv_norm_out, dec.conv_act, h))
    return src, h


def _mid(mid, h: Node) -> Node:
    h = _resnet(mid.resnets[0], h)
    if mid.attentions[0] is not None:
        h = AttentionNode(mid.attentions[0], h)
    return _resnet(mid.resnets[1], h)


def _topological(out: Node) -> List[Node]:
    order: List[Node] = []
    seen = set()

    def visit(n: Node) -> None:
        if id(n) in seen:
            return
        seen.add(id(n))
        for i in n.inputs:
            visit(i)
        order.append(n)

    visit(out)
    return order


def _macs(n: Node) -> int:
    """Multiply-adds to compute node `n` over its whole output (attention counts as its projections
    only; it runs once either way)."""
    hw = n.size[0] * n.size[1]
    if isinstance(n, (ConvNode, DownNode)):
        k = n.conv.kernel_size[0] * n.conv.kernel_size[1]
        return k * n.conv.in_channels * n.conv.out_channels * hw
    if isinstance(n, UpNode):  # sub-pixel: four 2x2 kernels per low-res pixel = 4 taps per output pixel
        return 4 * n.conv.in_channels * n.conv.out_channels * hw
    if isinstance(n, AddNode) and n.shortcut is not None:
        return n.shortcut.in_channels * n.shortcut.out_channels * hw
    return n.channels * hw  # norm, activation, add: memory-bound, about one pass over the tensor


def _conv_macs(n: Node) -> int:
    """Multiply-adds of `n`'s convolutions alone (none for norms, adds without a shortcut, attention)."""
    if isinstance(n, (ConvNode, DownNode, UpNode)) or (isinstance(n, AddNode) and n.shortcut is not None):
        return _macs(n)
    return 0


# -- storage and statistics ---------------------------------------------------------------


class BandedStore:
    """A (B, C, H, W) tensor kept as horizontal bands that are allocated when first written and
    released as soon as no remaining tile reads them, so a checkpoint shrinks while the next one
    grows. A band still read only through its last few rows (a halo) is cut down to those rows."""

    def __init__(self, shape: Tuple[int, int, int, int], bounds: List[int], dtype, device):
        self.shape = shape
        self.bounds = bounds  # band i covers rows [bounds[i], bounds[i+1])
        self.bands: Dict[int, torch.Tensor] = {}
        self.starts: Dict[int, int] = {}  # first row band i still holds (after a cut)
        self.freed: set = set()
        self.dtype, self.device = dtype, device

    @classmethod
    def wrap(cls, t: torch.Tensor) -> "BandedStore":
        s = cls(tuple(t.shape), [0, t.shape[2]], t.dtype, t.device)
        s.bands[0] = t
        s.starts[0] = 0
        return s

    def write(self, band: int, cols: Tuple[int, int], t: torch.Tensor) -> None:
        buf = self.bands.get(band)
        if buf is None:
            b, c, _, w = self.shape
            self.dtype = t.dtype  # whatever the producing layer computes in
            buf = torch.empty((b, c, self.bounds[band + 1] - self.bounds[band], w), dtype=t.dtype, device=self.device,
                              memory_format=_format_of(t))
            self.bands[band] = buf
            self.starts[band] = self.bounds[band]
        buf[:, :, :, cols[0] : cols[1]] = t

    def read(self, r: Region) -> torch.Tensor:
        parts = []
        for i in range(len(self.bounds) - 1):
            lo, hi = max(r[0], self.bounds[i]), min(r[1], self.bounds[i + 1])
            if lo >= hi:
                continue
            if i in self.freed or lo < self.starts[i]:
                raise AssertionError(f"rows {lo}..{hi} of band {i} were released but are still needed")
            start = self.starts[i]
            parts.append(self.bands[i][:, :, lo - start : hi - start, r[2] : r[3]])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def free_below(self, row: int) -> None:
        """Release every row above `row` (no longer needed): whole bands, and the head of the band
        that `row` falls in (its tail is copied out, the band's buffer released)."""
        for i in range(len(self.bounds) - 1):
            if i in self.freed or i not in self.bands:
                continue
            if self.bounds[i + 1] <= row:
                del self.bands[i]
                self.freed.add(i)
            elif self.starts[i] < row and 2 * (self.bounds[i + 1] - row) <= self.bounds[i + 1] - self.starts[i]:
                # only when the tail is at most half the band: the copy briefly coexists with the band
                self.bands[i] = self.bands[i][:, :, row - self.starts[i] :].clone(memory_format=_format_of(self.bands[i]))
                self.starts[i] = row

    def free(self) -> None:
        self.free_below(self.shape[2])

    def whole(self) -> torch.Tensor:
        if any(self.starts[i] != self.bounds[i] for i in self.bands) or self.freed:
            raise AssertionError("whole() of a store that was partly released")
        parts = [self.bands[i] for i in range(len(self.bounds) - 1)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _libc_malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def _release_free_heap() -> None:
    """Hand memory that glibc's allocator holds but no tensor uses back to the system: freed
    tile-sized temporaries stay resident otherwise (0.24 GiB of a 2048^2 encode's 2.6 GiB peak)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# -- the run --------------------------------------------------------------------------------


class _ExactRun:
    """Plans and executes the passes over one graph."""

    def __init__(self, inp: InputNode, x: torch.Tensor, out: Node, tile_px: int, store_budget: Optional[int],
                 callback: ProgressCallback):
        self.inp, self.out = inp, out
        self.batch, self.dtype, self.device = x.shape[0], x.dtype, x.device
        inp.store = BandedStore.wrap(x)
        self.tile_px = tile_px
        self.callback = callback
        self.nodes = _topological(out)
        self.tiles_done = 0
        self.trunk = max(self._size(n) for n in self.nodes if isinstance(n, AddNode))  # largest resnet output
        self.readers: Dict[int, List[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                self.readers.setdefault(id(i), []).append(n)
        self.passes = self._plan(self._choose_stores(store_budget))
        self.tiles_total = sum(self._attention_steps(n) if what == "attn"
                               else (len(self._grid(n)[0]) - 1) * (len(self._grid(n)[1]) - 1)
                               for n, what in self.passes)

    # planning
    def _plan(self, optional: set) -> List[Tuple[Node, str]]:
        """(node, what) in network order; what is 'stats' (for the GroupNorm that reads the node),
        'store' (keep it as a checkpoint), 'stats+store', or 'attn' (run the attention whole).
        Resnet outputs are the trunk and always stored; so is what the attention reads; a tensor
        whose id is in `optional` (see `_choose_stores`) is stored too."""
        passes: List[Tuple[Node, str]] = []
        for n in self.nodes:
            if n is self.inp:
                continue
            if isinstance(n, AttentionNode):
                passes.append((n, "attn"))
                continue
            rs = self.readers.get(id(n), [])
            stats = self._normalised(n)
            store = (n is self.out or isinstance(n, AddNode) or any(isinstance(c, AttentionNode) for c in rs)
                     or (stats and id(n) in optional))
            if stats or store:
                passes.append((n, "stats+store" if stats and store else ("stats" if stats else "store")))
        return passes

    def _normalised(self, n: Node) -> bool:
        """Does a GroupNorm read `n` (so some pass must take its statistics)?"""
        return any(isinstance(c, NormActNode) for c in self.readers.get(id(n), []))

    def _choose_stores(self, store_budget: Optional[int]) -> set:
        """Which optional checkpoints (conv1 outputs, up/down-sampled tensors: anything a GroupNorm reads
        that is not a resnet output) to store rather than recompute in every later pass that reads them.

        Storing none is the leanest plan: its checkpoints peak at about one largest resnet output.
        `store_budget` (elements) lets them peak higher; within it, checkpoints are added greedily,
        the one that saves the most recomputed multiply-adds first (`_work`), while the peak
        (`_stored_peak`) stays within the budget. Some are free: an upsampled tensor stored while the
        level above it is still small does not raise the peak at all.
        """
        candidates = [n for n in self.nodes if n is not self.inp and not isinstance(n, (AddNode, AttentionNode))
                      and n is not self.out and self._normalised(n)]
        chosen: set = set()
        lean = self._plan(chosen)
        budget = max(self._stored_peak(lean), store_budget or 0)
        everything = {id(n) for n in candidates}
        if self._stored_peak(self._plan(everything)) <= budget:
            return everything
        work = self._work(lean)
        while True:
            best = None
            for n in candidates:
                if id(n) in chosen:
                    continue
                plan = self._plan(chosen | {id(n)})
                if self._stored_peak(plan) > budget:
                    continue
                saved = work - self._work(plan)
                if saved > 0 and (best is None or saved > best[0]):
                    best = (saved, n)
            if best is None:
                return chosen
            chosen.add(id(best[1]))
            work -= best[0]

    def _work(self, passes: List[Tuple[Node, str]], macs: Callable[[Node], int] = _macs) -> int:
        """Multiply-adds of a run of `passes` (halos aside): each pass evaluates every tensor between
        its node and the checkpoints before it once (shared tensors are memoised within a tile).
        `macs` counts one node over its whole output."""
        stored = {id(self.inp)}
        total = 0
        for n, what in passes:
            seen: set = set()
            stack = [n]
            while stack:
                m = stack.pop()
                if id(m) in seen or id(m) in stored:
                    continue
                seen.add(id(m))
                total += macs(m)
                stack.extend(m.inputs)
            if "store" in what or what == "attn":
                stored.add(id(n))
        return total

    def _stored_peak(self, passes: List[Tuple[Node, str]]) -> int:
        """Elements held in checkpoints at the fullest moment of a run of `passes`: at the start of
        each pass (everything it or a later pass reads) and at its end (with its own checkpoint). A
        checkpoint read for the last time drains band by band while the pass's own fills, so the
        fuller end of the two is the pass's peak; an attention pass holds its input and output whole."""
        stored = {id(self.inp): 0}  # id -> index of the pass that writes it (the input: before all)
        last: Dict[int, int] = {id(self.inp): 0}  # id -> last pass that reads it
        size = {id(n): self._size(n) * (self.batch if n is not self.inp else 0) for n in self.nodes}
        for k, (n, what) in enumerate(passes):
            acc: Dict[int, Region] = {}
            self._reach(n, (0, n.size[0], 0, n.size[1]), acc, frozenset(stored), stored_only=True)
            for i in acc:
                last[i] = k
            if "store" in what or what == "attn":
                stored[id(n)] = k
                last.setdefault(id(n), k)
        peak = 0
        for k, (n, what) in enumerate(passes):
            before = sum(size[i] for i, c in stored.items() if c < k <= last[i])
            after = sum(size[i] for i, c in stored.items() if c <= k < last[i] or (c == k and i == id(self.out)))
            peak = max(peak, before + size[id(n)] if what == "attn" else max(before, after))
        return peak

    def _processor(self, node: "AttentionNode"):
        # the attention guard's choice for the whole latent (sliced when the scores would not fit)
        shape = (self.batch, node.channels) + tuple(node.size)
        return bounded_processor(node.attn.processor, shape, node.attn.to_q.weight.dtype, self.device)

    def _attention_steps(self, node: "AttentionNode") -> int:
        return progress_steps(self._processor(node), node.size[0] * node.size[1])

    @staticmethod
    def _size(n: Node) -> int:
        return n.channels * n.size[0] * n.size[1]

    def _grid(self, n: Node) -> Tuple[List[int], List[int]]:
        # tile_px / sqrt(scale) node pixels: a tile at 1/8 resolution (4x the channels) holds about
        # as many elements as a full-resolution one, with far less halo overhead than tile_px / 8
        step = max(1, int(round(self.tile_px / math.sqrt(n.scale))))
        return list(range(0, n.size[0], step)) + [n.size[0]], list(range(0, n.size[1], step)) + [n.size[1]]

    # evaluation
    def evaluate(self, n: Node, r: Region) -> torch.Tensor:
        if n.store is not None:
            return n.store.read(r)
        if n._memo is not None and _contains(n._memo[0], r):
            return _crop(n._memo[1], n._memo[0], r)
        ins = []
        for i, src in enumerate(n.inputs):
            want = n.need(i, r)
            have = _clip(want, src.size)
            t = self.evaluate(src, have)
            # convs with symmetric padding pad inside the conv call (no copy of the tile)
            ins.append((t, have) if n.self_pad else _zero_pad(t, want, have))
        t = n.compute(ins, r)
        del ins
        if n.shared:
            n._memo = (r, t)
        return t

    def _reach(self, n: Node, r: Region, acc: Dict[int, Region], stop: frozenset = frozenset(),
               stored_only: bool = False) -> None:
        """Union (as a bounding box) of the region of each stored node that region r of n reads;
        nodes whose id is in `stop` count as stored (they will be by then); with `stored_only`, only
        they do (planning, before anything is stored)."""
        if r[0] >= r[1] or r[2] >= r[3]:
            return
        if (n.store is not None and not stored_only) or id(n) in stop:
            old = acc.get(id(n))
            acc[id(n)] = r if old is None else (min(old[0], r[0]), max(old[1], r[1]), min(old[2], r[2]), max(old[3], r[3]))
            return
        for i, src in enumerate(n.inputs):
            self._reach(src, _clip(n.need(i, r), src.size), acc, stop, stored_only)

    def _live_after(self, k: int) -> set:
        """Ids of the nodes that passes after pass k read from storage (each pass stops at
        everything stored before it, so the walks stay short)."""
        stop = {id(n) for n, what in self.passes[: k + 1] if "store" in what or what == "attn"}
        live: set = set()
        for n, what in self.passes[k + 1 :]:
            acc: Dict[int, Region] = {}
            self._reach(n, (0, n.size[0], 0, n.size[1]), acc, frozenset(stop))
            live.update(acc)
            if "store" in what or what == "attn":
                stop.add(id(n))
        return live

    def _clear_memos(self) -> None:
        for n in self.nodes:
            n._memo = None

    def run(self) -> torch.Tensor:
        for k, (node, what) in enumerate(self.passes):
            if what == "attn":
                self._run_attention(node, self._live_after(k))
            else:
                self._run_pass(node, what, self._live_after(k))
        result = self.out.store.whole().contiguous()  # NCHW, as the untiled path returns
        self.out.store = None
        return result

    def _run_attention(self, node: AttentionNode, live_after: set) -> None:
        h = node.inputs[0].store.whole()
        b = h.shape[0]
        proc = self._processor(node)
        # one progress step (and cancel point) per chunk of queries: the whole-latent attention
        # of a 4096^2 decode is minutes of work
        with attention_progress(node.attn, lambda done, steps: self._tick()):
            out = proc(node.attn, h.to(node.attn.to_q.weight.dtype))
        if not isinstance(proc, AttnProcessorBase):
            self._tick()
        node.store = BandedStore.wrap(out)
        if any(isinstance(c, NormActNode) and c.inputs[0] is node for c in self.nodes):
            stats = GroupStats(b, self._norm_of(node).num_groups)
            stats.add(out)
            self._set_stats(node, stats)
        for n in self.nodes:
            if n.store is not None and n is not self.inp and n is not node and id(n) not in live_after:
                n.store = None

    def _run_pass(self, node: Node, what: str, live_after: set) -> None:
        rows, cols = self._grid(node)
        # the passes that write a large checkpoint are where the peak is: there, hand the allocator's
        # free memory back after every tile (the heap keeps ~10% of a 2048^2 trunk otherwise)
        trim = self.device.type == "cpu" and "store" in what and 2 * self._size(node) >= self.trunk
        if trim:
            _release_free_heap()
        stats = GroupStats(self.batch, self._norm_of(node).num_groups) if "stats" in what else None
        store = None
        if "store" in what:
            store = BandedStore((self.batch, node.channels) + tuple(node.size), rows, self.dtype, self.device)
        # stores that this pass reads for the last time are freed band by band as it advances
        dying = [n for n in self.nodes if n.store is not None and id(n) not in live_after and n is not self.inp]
        for bi in range(len(rows) - 1):
            for ci in range(len(cols) - 1):
                r = (rows[bi], rows[bi + 1], cols[ci], cols[ci + 1])
                t = self.evaluate(node, r)
                if stats is not None:
                    stats.add(t)
                if store is not None:
                    store.write(bi, (r[2], r[3]), t)
                del t
                self._clear_memos()  # a tile's memos go with it (before the trim, so their memory can go too)
                if trim:
                    _release_free_heap()
                self._tick()
            if dying and bi + 2 < len(rows):
                acc: Dict[int, Region] = {}
                self._reach(node, (rows[bi + 1], node.size[0], 0, node.size[1]), acc)
                for d in dying:
                    if id(d) in acc:
                        d.store.free_below(acc[id(d)][0])
        for d in dying:
            d.store = None
        if stats is not None:
            self._set_stats(node, stats)
        if store is not None:
            node.store = store

    def _norm_of(self, node: Node) -> torch.nn.GroupNorm:
        for n in self.nodes:
            if isinstance(n, NormActNode) and n.inputs[0] is node:
                return n.norm
        raise AssertionError(f"no GroupNorm reads {node}")

    def _set_stats(self, node: Node, stats: "GroupStats") -> None:
        for consumer in self.nodes:
            if isinstance(consumer, NormActNode) and consumer.inputs[0] is node:
                consumer.stats = stats.finish(consumer.norm.eps)

    def _tick(self) -> None:
        self.tiles_done += 1
        if self.callback is not None:
            self.callback(self.tiles_done, self.tiles_total)


def _check_tile(tile_size: int, store_budget: Optional[int]) -> None:
    if int(tile_size) < 8:
        raise ValueError(f"exact tiling: tile_size={tile_size} px is too small; use 64 px or more (256-1024 is typical)")
    if store_budget is not None and (isinstance(store_budget, bool) or int(store_budget) < 0):
        raise ValueError(f"exact tiling: store_budget={store_budget!r} must be a number of bytes >= 0 "
                         "(0: the leanest plan), or None (the default: what free memory allows)")


def store_budget_for(kind: str, model, t: torch.Tensor, tile_size: int, free_bytes: Optional[int]) -> int:
    """The default `store_budget` in bytes: `free_bytes` (with the planner's safety margin) less what
    the leanest exact run needs besides its checkpoints; 0 (the leanest plan) when it is unknown."""
    if free_bytes is None:
        return 0
    dtype = _store_dtype(model)
    lean = memory.estimate_tiled_bytes(kind, tuple(t.shape), dtype, model.config, int(tile_size))
    trunk = memory.trunk_elems(kind, tuple(t.shape), model.config) * memory.itemsize(dtype)  # counted in `lean`
    return max(0, memory.budget(free_bytes) - lean + trunk)


def _store_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype  # checkpoints are kept in the dtype the layers compute in


def _budget_elems(kind: str, model, t: torch.Tensor, tile_size: int, store_budget: Optional[int]) -> int:
    """`store_budget` bytes (None: from the device's free memory now) in stored elements."""
    if store_budget is None:
        store_budget = store_budget_for(kind, model, t, tile_size, memory.free_memory(t.device))
    return int(store_budget) // memory.itemsize(_store_dtype(model))


def _planned_run(kind: str, model, t: torch.Tensor, tile_size: int, store_budget: Optional[int],
                 callback: ProgressCallback) -> "_ExactRun":
    """The checked arguments' graph and plan ("encode": t is pixels, "decode": latents), ready to run."""
    _check_tile(tile_size, store_budget)
    inp, out = (_encoder_graph if kind == "encode" else _decoder_graph)(model, t)
    budget = _budget_elems(kind, model, t, tile_size, store_budget)
    return _ExactRun(inp, t, out, int(tile_size), budget, callback)


@torch.no_grad()
def exact_tiled_encode(model, x: torch.Tensor, tile_size: int = 512, callback: ProgressCallback = None,
                       store_budget: Optional[int] = None) -> torch.Tensor:
    """Pixels (B, C, H, W) in [-1, 1] -> moments (B, 2*latent, H/f, W/f) after quant_conv, equal to the
    untiled `model._moments(x)` up to fp32 rounding. `tile_size` is in pixels (working set per tile).
    `store_budget` is the bytes the stored checkpoints may peak at: 0 gives the leanest plan (about one
    full-resolution resnet output), None (default) what free memory allows; more memory, less
    recomputation (see `_ExactRun._choose_stores`)."""
    return _planned_run("encode", model, x, tile_size, store_budget, callback).run()


@torch.no_grad()
def exact_tiled_decode(model, z: torch.Tensor, tile_size: int = 512, callback: ProgressCallback = None,
                       store_budget: Optional[int] = None) -> torch.Tensor:
    """Raw latents (B, latent, h, w) -> pixels (B, out, h*f, w*f) after post_quant_conv and the decoder,
    equal to the untiled `model._pixels(z)` up to fp32 rounding. `tile_size` is in output pixels;
    `store_budget` as for `exact_tiled_encode`."""
    return _planned_run("decode", model, z, tile_size, store_budget, callback).run()


def planned_work(kind: str, model, t: torch.Tensor, tile_size: int = 512, store_budget: Optional[int] = None) -> float:
    """The convolution multiply-adds an exact tiled run with these arguments would do, as a multiple of
    the untiled model's (halos aside: a tile's convs also compute their halo): what its recomputation
    costs before any per-tile overhead. 1.0 when every checkpoint fits; the leanest plan
    (`store_budget=0`) of an SD-style decoder at 1024^2 does about 1.35x, because the widest level's
    conv1 outputs and upsampled tensors are recomputed. Plans only: nothing is evaluated. `kind` is
    "encode" (t: pixels) or "decode" (t: latents)."""
    if kind not in ("encode", "decode"):
        raise ValueError(f"planned_work: kind must be 'encode' or 'decode', not {kind!r}")
    run = _planned_run(kind, model, t, tile_size, store_budget, None)
    run.inp.store = None  # the run held `t` as its input checkpoint; planning is done
    return run._work(run.passes, _conv_macs) / sum(_conv_macs(n) for n in run.nodes)
