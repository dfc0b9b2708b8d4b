"""How much do fewer multiplies buy the fp32 CPU path? Three ways to run the VAE's 3x3 convolutions,
timed per conv at the VAE's own shapes and for whole SD-size encodes and decodes, each against a
float64 reference:

- `direct`: oneDNN's direct convolution on channels_last tensors, what the core runs for every conv
  narrower than `vae_core.winograd.MIN_CHANNELS` and for every dtype but fp32;
- `F(2x2)`: the core's own Winograd F(2x2, 3x3) (`vae_core/winograd.py`: 2.25x fewer multiplies,
  transforms of additions only, products through the GEMM in bands), which the core runs for fp32
  convs with >= MIN_CHANNELS (512) in and out channels;
- `nnpack`: torch's NNPACK, whose 3x3 convolution is Winograd F(6x6, 3x3) (about 5x fewer
  multiplies, paid for with larger rounding) and which torch never picks for a batch of one. A
  probe: the core does not use it (see the README).

    python benchmarks/bench_winograd.py                          # per-conv rows and 256² encode/decode
    python benchmarks/bench_winograd.py --threads 1 --sizes 256 512

Per-conv rows time each path on the same conv (F(2x2) regardless of MIN_CHANNELS, which is what
these rows decide). Whole-model rows: the same weights, run as `direct` (Winograd switched off),
as the core runs them (`core`: F(2x2) where it applies), and with every 3x3 stride-1 convolution
through NNPACK (NCHW in, channels_last out, the conv+skip fusion off, since NNPACK has no sum
post-op), in one process. Errors are relative: max |y - y64| / max |y64| over the output, y64 from
the same weights in float64. `kept MiB` is the resident memory a first NNPACK call of that shape
leaves behind (torch keeps NNPACK's workspace in a static buffer that only grows); the per-conv
rows run largest-last so each one shows its own growth. Ratios: that path / direct (below 1: faster).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_attention import best_of  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

# (in channels, out channels, side) of the 3x3 convs in an SD-size VAE at a 512² image
CONV_SHAPES = ((512, 512, 32), (512, 512, 64), (256, 512, 128), (512, 256, 128), (256, 256, 128), (128, 128, 256),
               (128, 128, 512))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rel_err(y, ref) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


REFUSED = set()  # (in, out) channels of convs NNPACK refused ("SpatialConvolution_updateOutput failed")


def nnpack_conv(conv, x):
    """conv(x) through NNPACK, or through conv's own forward where NNPACK refuses the call. Every call
    fails, with no reason given, until something has run nnp_initialize: torch's
    `_nnpack_available()` does, and main() calls it first."""
    import torch

    try:
        y = torch._nnpack_spatial_convolution(x.contiguous(), conv.weight.contiguous(), conv.bias, list(conv.padding))
    except RuntimeError:
        REFUSED.add((conv.in_channels, conv.out_channels))
        return type(conv).forward(conv, x)
    return y.contiguous(memory_format=torch.channels_last)


def conv_rows(shapes, repeats: int) -> None:
    import torch
    import torch.nn.functional as F

    from vae_core.winograd import winograd_conv

    print("| conv | direct ms | F(2x2) ms | F(2x2) / direct | nnpack ms | nnpack / direct | direct err | F(2x2) err "
          "| nnpack err | kept MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for cin, cout, side in shapes:
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (cin * 9) ** 0.5)
            conv.bias.copy_(torch.randn(cout, generator=g))
        x = torch.randn(1, cin, side, side, generator=g)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
        with torch.no_grad():
            ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
            before = rss_mib()
            y_nn = torch._nnpack_spatial_convolution(x, conv.weight, conv.bias, [1, 1])
            kept = rss_mib() - before - y_nn.numel() * 4 / 2**20
            y_d = conv_cl(x_cl)
            y_w = winograd_conv(conv_cl, x_cl)
            t_d = best_of(lambda: conv_cl(x_cl), repeats)
            t_w = best_of(lambda: winograd_conv(conv_cl, x_cl), repeats)
            t_n = best_of(lambda: torch._nnpack_spatial_convolution(x, conv.weight, conv.bias, [1, 1]), repeats)
        print(f"| {cin}->{cout} at {side}² | {t_d * 1e3:.1f} | {t_w * 1e3:.1f} | {t_w / t_d:.2f} | {t_n * 1e3:.1f} | "
              f"{t_n / t_d:.2f} | {rel_err(y_d, ref):.1e} | {rel_err(y_w, ref):.1e} | {rel_err(y_nn, ref):.1e} | "
              f"{max(kept, 0.0):.0f} |", flush=True)


def model_rows(config, sizes, repeats: int) -> None:
    import torch

    import vae_core.layers as layers
    from vae_core import AutoencoderKL, winograd

    torch.manual_seed(0)
    vae = AutoencoderKL(**config).eval()
    with torch.no_grad():  # random weights with some spread (zero biases would hide rounding)
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    vae64 = copy.deepcopy(vae).double()
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
             and m.stride == (1, 1) and m.padding == (1, 1) and m.groups == 1]
    fused_add_ok = layers.fused_add_ok

    def use(path: str) -> None:
        winograd.enabled = path == "core"
        for m in convs:
            if path == "nnpack":
                m.forward = lambda x, m=m: nnpack_conv(m, x)
            else:
                m.__dict__.pop("forward", None)
        layers.fused_add_ok = (lambda *a: False) if path == "nnpack" else fused_add_ok

    print()
    wide = sum(min(m.in_channels, m.out_channels) >= winograd.MIN_CHANNELS for m in convs)
    print(f"whole model: {len(convs)} 3x3 stride-1 convs, {wide} of them wide enough for the core's F(2x2) "
          f"(>= {winograd.MIN_CHANNELS} channels); best of {repeats} warm calls")
    print("| op | size | direct s | core s | core / direct | nnpack s | nnpack / direct | direct err | core err "
          "| nnpack err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for size in sizes:
            x = torch.rand(1, 3, size, size, generator=g) * 2 - 1
            z = vae.encode(x).latent_dist.mean
            refs = {"encode": vae64.encode(x.double()).latent_dist.mean, "decode": vae64.decode(z.double()).sample}
            calls = {"encode": lambda: vae.encode(x).latent_dist.mean, "decode": lambda: vae.decode(z).sample}
            for op in ("encode", "decode"):
                row = {}
                for path in ("direct", "core", "nnpack"):
                    use(path)
                    try:
                        row[path] = (best_of(calls[op], repeats), rel_err(calls[op](), refs[op]))
                    finally:
                        use("core")
                (t_d, e_d), (t_c, e_c), (t_n, e_n) = row["direct"], row["core"], row["nnpack"]
                print(f"| {op} | {size} | {t_d:.3f} | {t_c:.3f} | {t_c / t_d:.2f} | {t_n:.3f} | {t_n / t_d:.2f} | "
                      f"{e_d:.1e} | {e_c:.1e} | {e_n:.1e} |", flush=True)
    if REFUSED:
        print("NNPACK refused (ran direct instead): " + ", ".join(f"{a}->{b}" for a, b in sorted(REFUSED)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="*", default=[256], help="whole-model image sides (none: skip)")
    ap.add_argument("--channels", type=int, nargs=4, default=None,
                    help="block_out_channels of the whole-model VAE (default SD size); scales the conv rows too")
    ap.add_argument("--min-channels", type=int, default=None,
                    help="set vae_core.winograd.MIN_CHANNELS for the whole-model rows (to try other thresholds)")
    args = ap.parse_args(argv)

    import torch

    from vae_core import winograd

    from sd_size import SD_CONFIG  # benchmarks/ is on sys.path when a script runs

    torch.set_num_threads(args.threads)  # before the first NNPACK call: its thread pool is sized then
    if not torch._nnpack_available():
        print("NNPACK is not available in this torch build (or on this CPU)")
        return 1
    config = dict(SD_CONFIG)
    shapes = CONV_SHAPES
    if args.channels:
        config["block_out_channels"] = tuple(args.channels)
        scale = args.channels[0] / SD_CONFIG["block_out_channels"][0]
        shapes = tuple((max(1, int(a * scale)), max(1, int(b * scale)), max(8, int(s * scale))) for a, b, s in shapes)
    if args.min_channels is not None:
        winograd.MIN_CHANNELS = args.min_channels
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, best of {args.repeats} warm calls")
    conv_rows(shapes, args.repeats)
    if args.sizes:
        model_rows(config, args.sizes, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
