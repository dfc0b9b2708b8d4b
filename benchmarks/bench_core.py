"""Encode/decode time and peak memory of vae_core against diffusers on the same random SD-size weights.

Each measurement runs in a fresh subprocess; peak memory is read from /proc (VmHWM after a reset).
Prints ratios ours/diffusers; below 1.0 is better. CPU, fp32, same attention kind (SDPA) on both sides.

    python benchmarks/bench_core.py --sizes 256 512 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from sd_size import SD_CONFIG  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

# One measurement: build the model (weights seeded identically for both implementations), warm up
# once, time `repeats` runs, report the best time and the first run's peak resident memory growth.
_CHILD = textwrap.dedent(
    r"""
    import json, sys, time
    sys.path.insert(0, {root!r})
    import torch
    torch.set_num_threads({threads})
    impl, op, size, repeats, cfg = {impl!r}, {op!r}, {size}, {repeats}, {cfg!r}
    torch.manual_seed(0)
    if impl == "diffusers":
        import diffusers
        model = diffusers.AutoencoderKL(**cfg).eval()
        model.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())
    else:
        from vae_core import AutoencoderKL
        model = AutoencoderKL(**cfg).eval()
    x = torch.rand(1, 3, size, size) * 2 - 1
    z = torch.randn(1, 4, size // 8, size // 8)
    def run():
        with torch.inference_mode():
            if op == "encode":
                return model.encode(x).latent_dist.mean
            return model.decode(z).sample
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # MiB
    # peak of the first (cold) run over the resident size with the model loaded: reset the
    # high-water mark (clear_refs 5), run once, read VmHWM
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    run()
    peak_mib = status("VmHWM") - base
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - t); cpu.append(time.process_time() - c)
    print(json.dumps(dict(seconds=min(times), cpu_seconds=min(cpu), peak_mib=peak_mib)))
    """
)


def measure(impl: str, op: str, size: int, repeats: int, threads: int) -> dict:
    code = _CHILD.format(root=ROOT, impl=impl, op=op, size=size, repeats=repeats, cfg=SD_CONFIG, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} {op} {size}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--ops", nargs="+", default=["encode", "decode"], choices=["encode", "decode"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {args.threads} threads, fp32, SDPA attention, best of {args.repeats}")
    print("peak = VmHWM - VmRSS over the first (cold) run, after loading the model (Linux clear_refs)")
    print("time = best wall seconds; cpu = best process CPU seconds (robust when other work shares the cores)")
    header = (f"{'op':7} {'size':>5} {'diffusers s':>12} {'ours s':>8} {'time ratio':>10} {'cpu ratio':>9} "
              f"{'diffusers MiB':>14} {'ours MiB':>9} {'mem ratio':>9}")
    print(header)
    for op in args.ops:
        for size in args.sizes:
            ref = measure("diffusers", op, size, args.repeats, args.threads)
            ours = measure("ours", op, size, args.repeats, args.threads)
            print(f"{op:7} {size:>5} {ref['seconds']:>12.3f} {ours['seconds']:>8.3f} "
                  f"{ours['seconds'] / ref['seconds']:>10.2f} {ours['cpu_seconds'] / ref['cpu_seconds']:>9.2f} "
                  f"{ref['peak_mib']:>14.0f} {ours['peak_mib']:>9.0f} "
                  f"{ours['peak_mib'] / max(ref['peak_mib'], 1e-9):>9.2f}", flush=True)


if __name__ == "__main__":
    main()
