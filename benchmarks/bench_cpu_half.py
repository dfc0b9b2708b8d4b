"""Half precision on the CPU: fp32 against bf16 and fp16, ours against diffusers, in one process.

On CPUs without native bf16 (no AVX512 BW/VL/DQ, AVX512-BF16, AMX or AVX-NE-CONVERT: AMD Zen 2/3,
older Intel), and without native fp16 (nearly all), torch runs half-precision convolutions through
an emulated fallback, and oneDNN's fused primitives refuse bf16. The core then runs each such conv
and linear as an fp32 product of the upcast values rounded to the half dtype (`vae_core/cpu_half.py`);
diffusers takes torch's fallback. Where the CPU has native support both run oneDNN's kernels and
this prints the ordinary half-precision speed-up.

    python benchmarks/bench_cpu_half.py                      # quarter-width VAE, 256² decode
    python benchmarks/bench_cpu_half.py --no-diffusers       # ours only (diffusers' can take minutes)
    python benchmarks/bench_cpu_half.py --channels 128 256 512 512 --dtypes bf16

Times are the second of two calls (the first warms caches). Not a test: no asserts.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, nargs=4, default=[32, 64, 128, 128])
    ap.add_argument("--latent", type=int, default=32, help="latent side (the image is 8x that)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    args = ap.parse_args()

    import torch

    from vae_core import AutoencoderKL, cpu_half

    torch.set_num_threads(args.threads)
    cfg = dict(block_out_channels=tuple(args.channels), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32)
    torch.manual_seed(0)
    models = {"ours": AutoencoderKL(**cfg).eval()}
    if not args.no_diffusers:
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL

        models["diffusers"] = DiffusersAutoencoderKL(**cfg).eval()
        models["diffusers"].load_state_dict(models["ours"].state_dict())
    z = torch.randn(1, 4, args.latent, args.latent)
    side = 8 * args.latent
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    native = ", ".join(f"{name} {cpu_half.NATIVE[dtypes[name]]}" for name in args.dtypes)
    print(f"torch {torch.__version__}, {args.threads} thread(s), native convolutions: {native}; "
          f"decode {side}², channels {list(args.channels)}")
    print("| impl | dtype | fp32 s | half s | half / fp32 | max err vs fp32 |")
    print("|---|---|---|---|---|---|")

    def timed(fn):
        fn()
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    with torch.no_grad():
        for name, model in models.items():
            for dname in args.dtypes:
                model.float()
                t32, ref = timed(lambda: model.decode(z).sample)
                model.to(dtypes[dname])
                t16, out = timed(lambda: model.decode(z.to(dtypes[dname])).sample)
                err = (out.float() - ref).abs().max().item()
                print(f"| {name} | {dname} | {t32:.2f} | {t16:.2f} | {t16 / t32:.2f} | {err:.3g} |", flush=True)


if __name__ == "__main__":
    main()
