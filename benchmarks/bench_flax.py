"""Decode time of the jitted Flax twin (vae_core.flax) against the torch core, same SD-size random weights.

Each measurement runs in a fresh subprocess: build the torch core's model (seeded), convert it with
FlaxAutoencoderKL.from_torch for the Flax side, warm up (the Flax side's first call is the jit
compile, reported apart), then time `repeats` runs and keep the best. Prints flax/torch; below 1.0
means Flax is faster. CPU, both sides with their default thread pools. Not a test: a shared machine
makes single timings noisy, so compare ratios from one run.

    python benchmarks/bench_flax.py --sizes 256 512 --repeats 3 --dtypes float32 bfloat16 [--single-thread]
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

_CHILD = textwrap.dedent(
    r"""
    import json, sys, time
    sys.path.insert(0, {root!r})
    import torch
    impl, dtype_name, size, repeats, cfg = {impl!r}, {dtype!r}, {size}, {repeats}, {cfg!r}
    from vae_core import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(**cfg).eval()
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
    compile_s = None
    if {single!r}:
        torch.set_num_threads(1)
    if impl == "torch":
        dt = getattr(torch, dtype_name)
        vae = vae.to(dt)
        zt = z.to(dt)
        def run():
            with torch.inference_mode():
                return vae.decode(zt).sample
        threads = torch.get_num_threads()
    else:
        import jax, jax.numpy as jnp
        from vae_core.flax import FlaxAutoencoderKL
        model, params = FlaxAutoencoderKL.from_torch(vae, dtype=getattr(jnp, dtype_name))
        del vae
        decode = jax.jit(lambda p, z: model.apply({{"params": p}}, z, method=model.decode).sample)
        zj = jnp.asarray(z.numpy())
        def run():
            return decode(params, zj).block_until_ready()
        t0 = time.perf_counter(); run(); compile_s = time.perf_counter() - t0
        threads = "1 xla" if {single!r} else "xla default, %d cores" % len(__import__("os").sched_getaffinity(0))
    run()  # warm
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter(); run(); best = min(best, time.perf_counter() - t0)
    print(json.dumps({{"best_s": best, "compile_s": compile_s, "threads": str(threads)}}))
    """
)


def measure(impl: str, dtype: str, size: int, repeats: int, single: bool) -> dict:
    code = _CHILD.format(root=ROOT, impl=impl, dtype=dtype, size=size, repeats=repeats, cfg=SD_CONFIG,
                         single=single)
    env = dict(os.environ)
    if single:  # one compute thread on both sides: steadier on a busy machine
        env["OMP_NUM_THREADS"] = "1"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                            " intra_op_parallelism_threads=1").strip()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} {dtype} {size}px failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--single-thread", action="store_true", help="one compute thread on both sides")
    args = ap.parse_args()
    print(f"decode, SD-size VAE (128/256/512/512), batch 1, best of {args.repeats}; load avg "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a shared machine: ratios are noisy)")
    for size in args.sizes:
        for dtype in args.dtypes:
            t = measure("torch", dtype, size, args.repeats, args.single_thread)
            f = measure("flax", dtype, size, args.repeats, args.single_thread)
            print(f"{size}x{size} {dtype:8s}: torch core {t['best_s']:.2f} s ({t['threads']} threads), "
                  f"jitted Flax {f['best_s']:.2f} s (compile {f['compile_s']:.1f} s); "
                  f"flax/torch {f['best_s'] / t['best_s']:.2f}")


if __name__ == "__main__":
    main()
