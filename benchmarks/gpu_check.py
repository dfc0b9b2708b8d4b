"""One-command accelerator check: speed, memory, tiling, the out-of-memory retry and a real server.

Prints one table (markdown) with every row this pack's GPU claims rest on:
  1. SD-size decode and encode in fp32/fp16/bf16, eager and torch.compile'd, ours against diffusers
     and the host's VAEDecode/VAEEncode nodes (first call and warm);
  2. exact tiling of a decode at two large sizes, time and peak memory against untiled;
  3. a decode that cannot fit under torch.cuda.set_per_process_memory_fraction, which the planner
     must retry tiled (on the CPU, where running out of memory cannot be caught, the planner is
     given a small free-memory figure instead and must plan tiled);
  4. the round trip through a real ComfyUI server started on the device.
It is not a test (no asserts): rows that fail say so in the table. `benchmarks/gpu_check.sh` runs it.

    benchmarks/gpu_check.sh                       # CUDA, full sizes (about 8 minutes on one GPU)
    benchmarks/gpu_check.sh --device cpu --quick  # CPU, small sizes (what CI runs)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import bench_limits  # noqa: E402

# -- child: exact tiling and the out-of-memory retry ------------------------------------------


def child_tiling(spec: dict) -> None:
    """Decode one latent untiled or exact-tiled (spec["method"]) in this fresh process; print time
    and peak memory (CUDA: max allocated; CPU: peak RSS of the process), save the output."""
    import resource

    import torch

    from vae_core import AutoencoderKL
    from vae_core.exact_tiling import exact_tiled_decode

    device, size = spec["device"], spec["size"]
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec["dtype"]]
    torch.manual_seed(0)
    model = AutoencoderKL(**bench_limits.SD_CONFIG).eval().to(device=device, dtype=dt)
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(2)).to(device, dt)
    if spec["method"] == "exact":
        fn = lambda: exact_tiled_decode(model, z, tile_size=spec["tile"])  # noqa: E731
    else:
        fn = lambda: model.decode(z).sample  # noqa: E731
    with torch.inference_mode():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save(out.float().cpu(), spec["save"])
    print(json.dumps({"seconds": seconds, "peak_bytes": int(peak)}))


def child_oom(spec: dict) -> None:
    """A decode that does not fit: on CUDA under a per-process memory fraction, so the untiled run
    raises out-of-memory and the planner must retry tiled; on the CPU with a small free-memory figure."""
    import torch

    from vae_core import AutoencoderKL, memory, planner

    device, size = spec["device"], spec["size"]
    torch.manual_seed(0)
    model = AutoencoderKL(**bench_limits.SD_CONFIG).eval().to(device)
    z = torch.randn(1, 4, size // 8, size // 8).to(device)
    free_bytes = None
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        limit = memory.estimate_bytes("decode", tuple(z.shape), torch.float32, model.config) // 3 + 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total))
        # the planner reads the device's free memory, which the fraction does not change: it plans
        # untiled, runs out of memory and must retry tiled
    else:
        free_bytes = memory.estimate_bytes("decode", tuple(z.shape), torch.float32, model.config) // 3
    t = time.perf_counter()
    try:
        out, report = planner.run_decode(model, z, free_bytes=free_bytes)
        res = {"seconds": time.perf_counter() - t, "tiled": report["tiled"], "tile_size": report["tile_size"],
               "reason": report["reason"], "finite": bool(torch.isfinite(out).all())}
    except Exception as err:  # reported in the table
        res = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    print(json.dumps(res))


# -- the real server ------------------------------------------------------------------------


def server_round_trip(device: str, size: int) -> dict:
    """Start the host with the pack (on the device unless cpu), run Load VAE -> Encode -> Decode and
    the host's VAEDecode on a random SD-size VAE file, twice (cold, warm). Returns seconds and checks."""
    import tempfile

    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
    from comfy_server import ComfyServer

    from vae_core import AutoencoderKL

    with tempfile.TemporaryDirectory(prefix="akl-gpu-check-") as models_dir:
        os.makedirs(os.path.join(models_dir, "vae"))
        torch.manual_seed(0)
        AutoencoderKL(**bench_limits.SD_CONFIG).to(torch.float16).save_single_file(
            os.path.join(models_dir, "vae", "akl_check_sd.safetensors"))
        log_dir = os.path.join(ROOT, "outputs", "gpu_check")
        server = ComfyServer(models_dir=models_dir, cpu=device == "cpu", log_dir=log_dir)
        t = time.perf_counter()
        server.start()
        res = {"startup_seconds": time.perf_counter() - t}
        try:
            prompt = {
                "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1,
                                                              "color": 0x4080C0}},
                "2": {"class_type": "AutoencoderKLLoader", "inputs": {"vae_name": "akl_check_sd.safetensors"}},
                "3": {"class_type": "AutoencoderKLEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 0]}},
                "4": {"class_type": "AutoencoderKLDecode", "inputs": {"samples": ["3", 0], "vae": ["2", 0]}},
                "5": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["2", 0]}},
                "6": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
                "7": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
            }
            for name in ("cold_seconds", "warm_seconds"):
                prompt["1"]["inputs"]["color"] += 1  # a new input, so the host runs the graph again
                t = time.perf_counter()
                entry = server.wait_for(server.post_prompt(prompt)["prompt_id"], timeout=600)
                res[name] = time.perf_counter() - t
                outputs = entry.get("outputs", {})
                res["ok"] = bool(outputs.get("6", {}).get("images")) and bool(outputs.get("7", {}).get("images"))
        except Exception as err:  # reported in the table
            res["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        finally:
            server.stop()
    return res


# -- the table ------------------------------------------------------------------------------


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="small sizes, fp32/bf16 only, no compile (CPU/CI)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        {"tiling": child_tiling, "oom": child_oom}[spec.pop("kind")](spec)
        return
    import torch

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device is visible (use --device cpu for the CPU form)")
    if args.quick:
        sizes, dtypes, compile_dtypes, tiling = [64], ["fp32", "bf16"], [], [(128, 64)]
        oom_size, server_size, repeats = 128, 64, 1
    else:
        sizes, dtypes, compile_dtypes = [1024], ["fp32", "fp16", "bf16"], ["bf16"]
        tiling, oom_size, server_size, repeats = [(2048, 512), (4096, 1024)], 2048, 1024, 3
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    print(f"# gpu_check on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    started = time.perf_counter()

    print("\n## 1. encode/decode against diffusers and the host's nodes")
    bench_limits.run(sizes, dtypes, ["decode", "encode"], list(bench_limits.IMPLS), device, repeats, args.threads,
                     compile_dtypes)

    print("\n## 2-4. exact tiling, the out-of-memory retry, a real server")
    print("| check | size | detail | seconds | peak MiB | result |")
    print("|---|---|---|---|---|---|")
    tdtype = "bf16" if device == "cuda" else "fp32"
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for size, tile in tiling:
            res = {}
            for method in ("untiled", "exact"):
                spec = dict(kind="tiling", device=device, size=size, tile=tile, dtype=tdtype, method=method,
                            save=os.path.join(tmp, f"{method}_{size}.pt"))
                res[method] = bench_limits._child([os.path.abspath(__file__), "--child", json.dumps(spec)])
            for method, r in res.items():
                detail = f"tile {tile}, {tdtype}" if method == "exact" else tdtype
                if "error" in r:
                    print(f"| {method} decode | {size} | {detail} | | | failed: {r['error']} |")
                    continue
                result = ""
                if method == "exact" and "seconds" in res["untiled"]:
                    a = torch.load(os.path.join(tmp, f"exact_{size}.pt"))
                    b = torch.load(os.path.join(tmp, f"untiled_{size}.pt"))
                    result = (f"max err vs untiled {float((a - b).abs().max()):.2e}; time "
                              f"{r['seconds'] / res['untiled']['seconds']:.2f}x, memory "
                              f"{r['peak_bytes'] / max(1, res['untiled']['peak_bytes']):.2f}x untiled")
                print(f"| {method} decode | {size} | {detail} | {r['seconds']:.2f} | {r['peak_bytes'] / 2**20:.0f} | "
                      f"{result} |", flush=True)
    out = bench_limits._child([os.path.abspath(__file__), "--child",
                               json.dumps(dict(kind="oom", device=device, size=oom_size))])
    how = "memory fraction < estimate" if device == "cuda" else "free memory given as 1/3 of the estimate"
    if "error" in out:
        print(f"| out-of-memory retry | {oom_size} | {how} | | | failed: {out['error']} |")
    else:
        print(f"| out-of-memory retry | {oom_size} | {how} | {out['seconds']:.2f} | | tiled={out['tiled']}, "
              f"tile {out['tile_size']}, finite={out['finite']}: {out['reason']} |", flush=True)
    rt = server_round_trip(device, server_size)
    if "error" in rt:
        print(f"| server round trip | {server_size} | Load VAE -> Encode -> Decode + host VAEDecode | | | "
              f"failed: {rt['error']} |")
    else:
        print(f"| server round trip | {server_size} | Load VAE -> Encode -> Decode + host VAEDecode | "
              f"cold {rt['cold_seconds']:.2f}, warm {rt['warm_seconds']:.2f} | | start-up "
              f"{rt['startup_seconds']:.1f} s, outputs ok={rt['ok']} |")
    print(f"\n# gpu_check done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
