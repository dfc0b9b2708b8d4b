"""One 4096x4096 decode of an SD-size VAE (random weights, fp32, CPU) through the memory planner.

Untiled this needs ~48 GiB by the planner's estimate (the host's decode ~100 GB), so the planner must
choose exact tiling. Prints the plan, progress, wall time, the process's peak RSS and the longest time between two progress
calls (how long a Cancel can take to land).

    python benchmarks/bench_4096.py [--size 4096]
"""
from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vae_core import AutoencoderKL, planner  # noqa: E402

from sd_size import SD_CONFIG  # noqa: E402  (benchmarks/ is on sys.path when a script runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(0)
    model = AutoencoderKL(**SD_CONFIG).eval()
    z = torch.randn(1, 4, args.size // 8, args.size // 8)
    plan = planner.plan_decode(model, z)
    print(f"plan: {plan}", flush=True)
    t0 = time.perf_counter()
    last = [t0, 0.0]  # time of the previous progress call, longest gap between two

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        last[1] = max(last[1], now - last[0])
        last[0] = now
        print(f"  {done}/{total} steps, {now - t0:.0f} s", flush=True)

    out, report = planner.run_decode(model, z, callback=progress)
    seconds = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    finite = bool(torch.isfinite(out).all())
    print(f"decode {args.size}x{args.size}: {seconds:.0f} s, peak RSS {peak_gib:.2f} GiB, output {tuple(out.shape)}, "
          f"finite={finite}; longest gap between progress calls (cancel latency) {last[1]:.1f} s; report {report}",
          flush=True)


if __name__ == "__main__":
    main()
