"""The exact tiler's leanest plan (store_budget=0) against the untiled run: time and peak memory.

Issue 16's target: at 1024² and 2048², the lean plan within 1.3x the untiled time at no more than
1/3 of its peak memory. Times are best-of wall clock in this process; memory is the peak of live
tensor bytes (`live_bytes.py`), measured in separate calls. "planned MACs" is the plan's conv
multiply-adds over the untiled model's (`exact_tiling.planned_work`, halos aside): the part of the
time ratio that recomputation alone explains; the rest is per-tile overhead (copies, GroupNorm
on tiles, halos). Not a test: no asserts.

    python benchmarks/bench_lean.py --sizes 1024 2048 --tile 256
    python benchmarks/bench_lean.py --channels 128 256 512 512   # the SD-size VAE (slow on a CPU)
    python benchmarks/bench_lean.py --sizes 1024 --tile 128 --store-budget 300   # memory spent on checkpoints
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from live_bytes import live_peak_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="output sides in pixels")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--channels", type=int, nargs=4, default=[64, 128, 256, 256],
                    help="block_out_channels (default: a quarter-width SD VAE, so that 2048² fits a CI box)")
    ap.add_argument("--ops", nargs="+", default=["decode"], choices=["decode", "encode"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--store-budget", type=float, default=0.0,
                    help="MiB the tiler's checkpoints may peak at (0: the leanest plan, the issue's target)")
    args = ap.parse_args()

    import torch

    from vae_core import AutoencoderKL
    from vae_core.exact_tiling import exact_tiled_decode, exact_tiled_encode, planned_work

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoencoderKL(block_out_channels=tuple(args.channels), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                          norm_num_groups=32).eval()
    budget = int(args.store_budget * 2**20)
    print(f"torch {torch.__version__}, {args.threads} threads, channels {args.channels}, tile {args.tile}, "
          f"store_budget {args.store_budget:g} MiB, best of {args.repeats}; memory = peak live tensor bytes of the call")
    print("| op | size | untiled s | lean s | time ratio | untiled MiB | lean MiB | memory ratio | max abs diff "
          "| planned MACs |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def best(fn):
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    g = torch.Generator().manual_seed(1)
    for op in args.ops:
        for size in args.sizes:
            if op == "decode":
                inp = torch.randn(1, 4, size // 8, size // 8, generator=g)
                untiled = lambda: model.decode(inp).sample  # noqa: E731
                lean = lambda: exact_tiled_decode(model, inp, tile_size=args.tile, store_budget=budget)  # noqa: E731
            else:
                small = torch.rand(1, 3, size // 16, size // 16, generator=g) * 2 - 1
                inp = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear")
                untiled = lambda: model._moments(inp)  # noqa: E731
                lean = lambda: exact_tiled_encode(model, inp, tile_size=args.tile, store_budget=budget)  # noqa: E731
            with torch.inference_mode():
                ref, out = untiled(), lean()
                diff = (ref.float() - out.float()).abs().max().item()
                del ref, out
                tu, tl = best(untiled), best(lean)
                mu, ml = live_peak_bytes(untiled), live_peak_bytes(lean)
            work = planned_work(op, model, inp, tile_size=args.tile, store_budget=budget)
            print(f"| {op} | {size} | {tu:.2f} | {tl:.2f} | {tl / tu:.2f} | {mu / 2**20:.0f} | {ml / 2**20:.0f} | "
                  f"{ml / mu:.2f} | {diff:.1e} | {work:.3f} |", flush=True)


if __name__ == "__main__":
    main()
