"""Benchmark: exact tiling vs blend, diffusers' tiling and the host's VAEDecodeTiled, against untiled.

Prints, per size and tile: PSNR and max error against the untiled output, peak memory and time
ratios, and the planner's memory estimate against the measured peak. Not a test: no assertions.
Methods: exact (checkpoints may use what free memory allows, the default), exact-lean
(store_budget=0, the leanest plan; the planner's tiled estimate is for this one), blend (ours,
diffusers' geometry), diffusers (diffusers' own tiling), host (ComfyUI's VAEDecodeTiled strategy).

Method: every case runs in its own fresh `python` subprocess (same seed, so the same random SD-size
weights). It is timed once, then run again under the profiler for its peak of live tensor bytes
(`live_bytes.py`: what the call itself allocates, not the weights; resident-set peaks, which this
script reported until 2026-12-02, differ by up to 2.5x between calls with the same live tensors).
Errors are measured on outputs clamped to [-1, 1] (decode) or on raw moments (encode);
PSNR uses a peak-to-peak of 2.

    flock /tmp/cpu_heavy.lock .venv/bin/python benchmarks/bench_tiling.py --sizes 1024 --tile 256 --quick
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = os.path.join(ROOT, ".host", "ComfyUI")
from live_bytes import live_peak_bytes  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from sd_size import SD_CONFIG  # noqa: E402


def _config(channels) -> dict:
    return {**SD_CONFIG, "block_out_channels": tuple(channels)} if channels else dict(SD_CONFIG)


def _make_input(kind: str, size: int, batch: int):
    import torch

    g = torch.Generator().manual_seed(1)
    if kind == "decode":
        return torch.randn(batch, 4, size // 8, size // 8, generator=g)
    # smooth-ish image in [-1, 1]: upsampled noise, so encode sees image-like statistics
    small = torch.rand(batch, 3, size // 16, size // 16, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)


def run_case(args) -> None:
    """Child process: build the model, run one case, save the output, print one JSON line."""
    import torch

    sys.path.insert(0, ROOT)
    from vae_core import AutoencoderKL

    torch.manual_seed(0)
    config = _config(args.channels)
    model = AutoencoderKL(**config).eval()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model.to(dtype)
    inp = _make_input(args.kind, args.size, args.batch).to(dtype)
    tile = args.tile
    fn = None
    if args.method == "untiled":
        fn = (lambda: model._pixels(inp)) if args.kind == "decode" else (lambda: model._moments(inp))
    elif args.method in ("exact", "exact-lean", "blend"):
        # exact: checkpoints may use what free memory allows; exact-lean: the leanest plan (store_budget=0)
        options = {"store_budget": 0} if args.method == "exact-lean" else {}
        model.enable_tiling(method=args.method.split("-")[0], tile_sample_min_size=tile, **options)
        fn = ((lambda: model.tiled_decode(inp).sample) if args.kind == "decode"
              else (lambda: model.tiled_encode(inp).latent_dist.parameters))
    elif args.method == "planned":
        from vae_core import planner

        fn = ((lambda: planner.run_decode(model, inp)[0]) if args.kind == "decode"
              else (lambda: planner.run_encode(model, inp)[0]))
    elif args.method == "diffusers":
        from diffusers import AutoencoderKL as DAutoencoderKL

        dm = DAutoencoderKL(**config).eval().to(dtype)
        dm.load_state_dict(model.state_dict())
        del model
        dm.enable_tiling()
        dm.tile_sample_min_size = tile
        dm.tile_latent_min_size = tile // 8
        fn = ((lambda: dm.decode(inp).sample) if args.kind == "decode"
              else (lambda: dm.encode(inp).latent_dist.parameters))
    elif args.method == "host":
        # The host's VAEDecodeTiled/VAEEncodeTiled strategy: comfy.utils.tiled_scale called three times
        # with tiles (t/2, 2t), (2t, t/2), (t, t) and overlap 64 px, averaged (comfy/sd.py decode_tiled_).
        sys.path.insert(0, HOST)
        import comfy.utils

        lat, ov = tile // 8, 64 // 8
        if args.kind == "decode":
            f = lambda a: model._pixels(a).float()  # noqa: E731
            fn = lambda: sum(comfy.utils.tiled_scale(inp, f, tx, ty, ov, upscale_amount=8, out_channels=3)  # noqa: E731
                             for tx, ty in ((lat // 2, lat * 2), (lat * 2, lat // 2), (lat, lat))) / 3.0
        else:
            f = lambda a: model._moments(a).float()  # noqa: E731
            fn = lambda: sum(comfy.utils.tiled_scale(inp, f, tx, ty, 64, upscale_amount=1 / 8, out_channels=8)  # noqa: E731
                             for tx, ty in ((tile, tile), (tile * 2, tile // 2), (tile // 2, tile * 2))) / 3.0
    with torch.no_grad():
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        torch.save(out.float().cpu(), args.save)
        del out
        live = live_peak_bytes(fn)
    print(json.dumps({"seconds": seconds, "live": live}))


def _spawn(kind, method, size, tile, dtype, batch, workdir, channels=None) -> dict:
    save = os.path.join(workdir, f"{kind}_{method}_{size}_{tile}_{dtype}.pt")
    cmd = [sys.executable, os.path.abspath(__file__), "--run-case", "--kind", kind, "--method", method,
           "--size", str(size), "--tile", str(tile), "--dtype", dtype, "--batch", str(batch), "--save", save]
    if channels:
        cmd += ["--channels", *map(str, channels)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc={proc.returncode}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["path"] = save
    return res


def _compare(ref_path, path, kind):
    import torch

    ref, out = torch.load(ref_path), torch.load(path)
    if kind == "decode":
        ref, out = ref.clamp(-1, 1), out.clamp(-1, 1)
    err = (ref - out).abs()
    mse = err.double().pow(2).mean().item()
    psnr = float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)
    return psnr, err.max().item()


def _gib(b):
    return b / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="square image sizes in px")
    ap.add_argument("--tile", type=int, nargs="+", default=[256, 512], help="tile sizes in px")
    ap.add_argument("--kinds", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    ap.add_argument("--methods", nargs="+", default=["exact", "exact-lean", "blend", "diffusers", "host"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--channels", type=int, nargs=4, default=None,
                    help="block_out_channels (default: the SD-size VAE's, 128 256 512 512)")
    ap.add_argument("--quick", action="store_true", help="decode only, first tile size only, skip the host's 3-pass")
    # internal: one case in this process
    ap.add_argument("--run-case", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="decode", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="untiled", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=512, help=argparse.SUPPRESS)
    ap.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_case:
        args.tile = args.tile[0] if isinstance(args.tile, list) else args.tile
        run_case(args)
        return
    if args.quick:
        args.kinds, args.tile = ["decode"], args.tile[:1]
        args.methods = [m for m in args.methods if m != "host"]

    sys.path.insert(0, ROOT)
    import torch

    from vae_core import AutoencoderKLConfig, memory

    cfg = AutoencoderKLConfig(**_config(args.channels))
    print(f"# random-weight VAE {cfg.block_out_channels} (SD-size: 128, 256, 512, 512), {args.dtype}, "
          f"batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("# memory: peak live tensor bytes of the call (live_bytes.py), a fresh subprocess per case")
    print("# host = comfy.utils.tiled_scale x3 averaged, as comfy/sd.py decode_tiled_/encode_tiled_ (overlap 64 px)")
    with tempfile.TemporaryDirectory() as workdir:
        for kind in args.kinds:
            for size in args.sizes:
                ref = _spawn(kind, "untiled", size, 0, args.dtype, args.batch, workdir, args.channels)
                if "error" in ref:
                    print(f"{kind} {size}: untiled failed: {ref['error']}")
                    continue
                shape = (args.batch, 4 if kind == "decode" else 3) + ((size // 8,) * 2 if kind == "decode" else (size,) * 2)
                est = memory.estimate_bytes(kind, shape, {"fp32": torch.float32, "bf16": torch.bfloat16,
                                                           "fp16": torch.float16}[args.dtype], cfg)
                print(f"\n## {kind} {size}x{size}: untiled {ref['seconds']:.1f} s, live peak {_gib(ref['live']):.2f} GiB; "
                      f"planner estimate {_gib(est):.2f} GiB (estimate/live {est / max(1, ref['live']):.2f})")
                torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
                if args.dtype != "fp32":
                    ref32 = _spawn(kind, "untiled", size, 0, "fp32", args.batch, workdir, args.channels)
                    if "error" not in ref32:
                        psnr, maxerr = _compare(ref32["path"], ref["path"], kind)
                        print(f"untiled {args.dtype} against untiled fp32: PSNR {psnr:.1f} dB, max err {maxerr:.2e}, "
                              f"time {ref['seconds']:.1f} s vs {ref32['seconds']:.1f} s "
                              f"(speed-up {ref32['seconds'] / ref['seconds']:.2f}x)")
                print("| method | tile | PSNR dB | max err | live GiB | memory ratio | est/live | time s | time ratio |")
                print("|---|---|---|---|---|---|---|---|---|")
                for tile in args.tile:
                    for method in args.methods:
                        res = _spawn(kind, method, size, tile, args.dtype, args.batch, workdir, args.channels)
                        if "error" in res:
                            print(f"| {method} | {tile} | failed: {res['error']} |")
                            continue
                        psnr, maxerr = _compare(ref["path"], res["path"], kind)
                        live = max(1, res["live"])
                        est_t = (f"{memory.estimate_tiled_bytes(kind, shape, torch_dtype, cfg, tile) / live:.2f}"
                                 if method == "exact-lean" else "")
                        print(f"| {method} | {tile} | {psnr:.1f} | {maxerr:.2e} | {_gib(live):.3f} | "
                              f"{live / max(1, ref['live']):.2f} | {est_t} | "
                              f"{res['seconds']:.1f} | {res['seconds'] / ref['seconds']:.2f} |", flush=True)
                        os.remove(res["path"])


if __name__ == "__main__":
    main()
