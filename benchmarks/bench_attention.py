"""The VAE's mid-block attention alone, on the CPU: AttnProcessor2_0 as the core runs it against torch's
SDPA kernel, per dtype and token count, with each one's error against a float64 reference.

    python benchmarks/bench_attention.py                       # 1,024 / 4,096 / 16,384 positions, C=512
    python benchmarks/bench_attention.py --tokens 1024 --threads 1
    python benchmarks/bench_attention.py --tokens 16384 --decode-size 512 1024   # and whole bf16 decodes

A 256² image is 1,024 positions at the mid block (f8), 512² is 4,096, 1024² is 16,384. In bf16 on a
CPU with AVX512-BF16 but no AMX the core runs matmul attention over query chunks (`attention._cpu_bf16_attention`)
instead of SDPA; in fp32 it is SDPA itself, so the fp32 rows time the same kernel twice (a check of
the noise). Ratio: ours / SDPA (below 1: ours is faster).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def decode_rows(sizes, repeats: int) -> None:
    """Whole bf16 decodes of the SD-size VAE, the core's CPU attention path on and off, in one process,
    each against the same weights' fp32 decode."""
    import torch

    from sd_size import SD_CONFIG  # benchmarks/ is on sys.path when a script runs
    from vae_core import AutoencoderKL, attention

    torch.manual_seed(0)
    vae32 = AutoencoderKL(**SD_CONFIG).eval()
    vae = AutoencoderKL.from_config(vae32.config)
    vae.load_state_dict(vae32.state_dict())
    vae = vae.eval().to(torch.bfloat16)
    print()
    print("| decode | bf16 | with SDPA s | ours s | ours / SDPA | SDPA max err vs fp32 | ours max err vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    native = attention._cpu_bf16_matmul

    def forced_sdpa() -> bool:
        return False

    with torch.inference_mode():
        for size in sizes:
            z32 = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(2))
            ref = vae32.decode(z32).sample
            z = z32.to(torch.bfloat16)
            attention._cpu_bf16_matmul = forced_sdpa
            try:
                t_sdpa = best_of(lambda: vae.decode(z).sample, repeats)
                out_sdpa = vae.decode(z).sample
            finally:
                attention._cpu_bf16_matmul = native
            t_ours = best_of(lambda: vae.decode(z).sample, repeats)
            err_sdpa = (out_sdpa.float() - ref).abs().max().item()
            err_ours = (vae.decode(z).sample.float() - ref).abs().max().item()
            print(f"| {size} | bf16 | {t_sdpa:.2f} | {t_ours:.2f} | {t_ours / t_sdpa:.2f} | {err_sdpa:.2e} | {err_ours:.2e} |",
                  flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-size", type=int, nargs="*", default=[],
                    help="also decode the SD-size VAE (random weights) to these sizes in bf16, with the CPU path "
                         "and with SDPA forced, and print both times and errors against the fp32 decode")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from vae_core import attention

    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    attn = attention.Attention(args.channels, 32)
    proc = attention.AttnProcessor2_0()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, C={args.channels}, best of {args.repeats}; "
          f"bf16 matmul path (AVX512-BF16 without AMX) on this CPU: {attention._cpu_bf16_matmul()}")
    print("| tokens | dtype | SDPA ms | ours ms | ours / SDPA | SDPA max err | ours max err |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for n in args.tokens:
            gen = torch.Generator().manual_seed(n)
            q, k, v = (torch.randn(1, n, args.channels, generator=gen) for _ in range(3))
            ref = attention._math_attention(q.double(), k.double(), v.double(), attn.scale)
            for name in args.dtypes:
                qd, kd, vd = (t.to(dtypes[name]) for t in (q, k, v))
                sdpa = lambda: F.scaled_dot_product_attention(qd[:, None], kd[:, None], vd[:, None])[:, 0]
                ours = lambda: proc.attend(attn, qd, kd, vd)
                t_sdpa, t_ours = best_of(sdpa, args.repeats), best_of(ours, args.repeats)
                e_sdpa = (sdpa().double() - ref).abs().max().item()
                e_ours = (ours().double() - ref).abs().max().item()
                print(f"| {n} | {name} | {t_sdpa * 1e3:.3f} | {t_ours * 1e3:.3f} | {t_ours / t_sdpa:.2f} | {e_sdpa:.1e} | {e_ours:.1e} |",
                      flush=True)
    if args.decode_size:
        decode_rows(args.decode_size, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
