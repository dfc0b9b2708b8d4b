"""How close encode/decode come to the machine's limit, against diffusers and the host's VAE nodes.

Measures, in one run: the machine's own convolution peak (3x3 convs at the shapes an SD-size VAE
runs, channels_last, per dtype), then encode and decode of the same random SD-size weights through
vae_core, diffusers' AutoencoderKL and the host's VAEEncode/VAEDecode nodes (plus ours through our
own Encode/Decode nodes). Prints times, ratios, and the share of the conv peak that each achieves,
counted in the FLOPs each implementation really executes (torch.utils.flop_counter: convolutions
and matmuls as run, so our sub-pixel upsampling counts its smaller convs). Not a test: no asserts.

    python benchmarks/bench_limits.py --sizes 256 512 --dtypes fp32 bf16
    python benchmarks/bench_limits.py --device cuda --sizes 1024 --dtypes fp32 fp16 bf16 --compile

Every measurement runs in a fresh subprocess; memory is the peak of live tensor bytes over the
first (cold) call: torch.cuda.max_memory_allocated on CUDA; on the CPU the same count from torch's
own allocator events (torch.profiler with profile_memory: every tensor allocation and free, summed
in order), in a second process per case, so the profiler does not touch the times. Resident-set
peaks (VmHWM) are not used: a cold call may reuse heap that building the weights left free, or not,
and on 2026-12-01 they differed by up to 2.5x between implementations for the same live bytes.

On a CPU without native bf16 (or fp16) the conv peak of that dtype is the core's path for it (fp32
products, `vae_core/cpu_half.py`), and diffusers' and the host's rows in that dtype are not run but
named: torch's own fallback takes ~100x fp32's time there (`bench_cpu_half.py` times it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = os.environ.get("AKL_HOST_DIR", os.path.join(ROOT, ".host", "ComfyUI"))

from live_bytes import live_peak_bytes  # noqa: E402
from sd_size import SD_CONFIG  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
IMPLS = ("ours", "diffusers", "host", "ours-node")

# The 3x3 convolutions an SD-size decoder runs at output size S: (channels, side) pairs, widest
# first: 512 ch at S/8 and S/4, 512 at S/2, 256 at S, 128 at S (the encoder mirrors them).
def _conv_shapes(size: int):
    return [(512, size // 8), (512, size // 4), (512, size // 2), (256, size), (128, size)]


# -- child processes -----------------------------------------------------------------------

_PEAK_CHILD = textwrap.dedent(
    r"""
    import json, sys, time, torch
    sys.path.insert(0, {root!r})
    from vae_core import cpu_half  # F.conv2d, or on CPUs without native bf16/fp16 the fp32 path the core runs
    dev, dt, shapes, repeats = {device!r}, getattr(torch, {dtype!r}), {shapes!r}, {repeats}
    torch.set_num_threads({threads})
    best = 0.0
    rows = []
    for c, s in shapes:
        x = torch.randn(1, c, s, s, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(c, c, 3, 3, device=dev, dtype=dt) * 0.02).contiguous(memory_format=torch.channels_last)
        b = torch.zeros(c, device=dev, dtype=dt)
        flops = 2 * c * c * 9 * s * s
        with torch.inference_mode():
            cpu_half.conv2d(x, w, b, padding=1)
            times = []
            for _ in range(repeats):
                if dev == "cuda": torch.cuda.synchronize()
                t = time.perf_counter(); cpu_half.conv2d(x, w, b, padding=1)
                if dev == "cuda": torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        g = flops / min(times) / 1e9
        rows.append([c, s, g]); best = max(best, g)
    print(json.dumps(dict(peak_gflops=best, rows=rows)))
    """
)

def child_main(spec: dict) -> None:
    """One implementation in this (fresh) process: every case in `spec["cases"]`, one JSON line out.

    A case is [op, size, dtype, compiled]. The weights are the same seeded random SD-size weights
    for every implementation; the host's and our nodes get them as the host's VAE would.
    """
    import time

    sys.path.insert(0, ROOT)
    import torch

    impl, device = spec["impl"], spec["device"]
    torch.set_num_threads(spec["threads"])
    from vae_core import AutoencoderKL, convert

    torch.manual_seed(0)
    ours = AutoencoderKL(**SD_CONFIG).eval()
    if impl in ("host", "ours-node"):
        sys.path.insert(0, HOST)
        from comfy.cli_args import args as host_args

        host_args.cpu = device == "cpu"
        import nodes as host_nodes  # noqa: F401  (the host's node module; sets up folder_paths)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    models = {}

    def model_for(dtype_name: str):
        if dtype_name in models:
            return models[dtype_name]
        dt = dtypes[dtype_name]
        if impl == "ours":
            m = AutoencoderKL.from_config(ours.config)
            m.load_state_dict(ours.state_dict())
            m = m.eval().to(device=device, dtype=dt)
        elif impl == "diffusers":
            import diffusers

            m = diffusers.AutoencoderKL(**SD_CONFIG).eval()
            m.load_state_dict(ours.state_dict())
            m.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())
            m = m.to(device=device, dtype=dt)
        elif impl == "host":
            import comfy.sd

            m = comfy.sd.VAE(sd=convert.diffusers_to_ldm(ours.state_dict()), dtype=dt)
        else:  # ours through our own nodes, the way the host runs them
            import importlib.util

            spec_ = importlib.util.spec_from_file_location("akl_pack", os.path.join(ROOT, "__init__.py"),
                                                           submodule_search_locations=[ROOT])
            pack = importlib.util.module_from_spec(spec_)
            sys.modules["akl_pack"] = pack
            spec_.loader.exec_module(pack)
            from akl_pack.nodes import vae_object

            core = AutoencoderKL.from_config(ours.config)
            core.load_state_dict(ours.state_dict())
            m = vae_object.AutoencoderKLVAE(core, name="bench", dtype=dt)
        models[dtype_name] = m
        return m

    def call(op: str, size: int, dtype_name: str):
        m, dt = model_for(dtype_name), dtypes[dtype_name]
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
        z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(2))
        if impl in ("ours", "diffusers"):
            x, z = x.to(device, dt), z.to(device, dt)
            return (lambda: m.encode(x).latent_dist.mean) if op == "encode" else (lambda: m.decode(z).sample)
        image = ((x + 1) / 2).movedim(1, -1).contiguous()
        if impl == "host":
            import nodes as host_nodes

            if op == "encode":
                return lambda: host_nodes.VAEEncode().encode(m, image)[0]["samples"]
            return lambda: host_nodes.VAEDecode().decode(m, {"samples": z})[0]
        from akl_pack.nodes import node_classes

        if op == "encode":
            return lambda: node_classes.AutoencoderKLEncode().encode(image, m)["result"][0]["samples"]
        return lambda: node_classes.AutoencoderKLDecode().decode({"samples": z}, m)["result"][0]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    results = []
    for op, size, dtype_name, compiled in spec["cases"]:
        res = dict(op=op, size=size, dtype=dtype_name, compiled=compiled)
        try:
            fn = call(op, size, dtype_name)
            if compiled:
                fn = torch.compile(fn)
            with torch.inference_mode():
                if spec.get("memory_only"):  # the CPU's memory figure, in its own process
                    res["peak_bytes"] = live_peak_bytes(fn)
                    results.append(res)
                    continue
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                sync()
                t = time.perf_counter()
                out = fn()
                sync()
                res["first_seconds"] = time.perf_counter() - t
                if device == "cuda":
                    res["peak_bytes"] = int(torch.cuda.max_memory_allocated() - base)
                times = []
                for _ in range(spec["repeats"]):
                    sync()
                    t = time.perf_counter()
                    out = fn()
                    sync()
                    times.append(time.perf_counter() - t)
                res["seconds"] = min(times)
                res["flops"] = None
                if not compiled:
                    from torch.utils.flop_counter import FlopCounterMode

                    counter = FlopCounterMode(display=False)
                    with counter:
                        fn()
                    res["flops"] = counter.get_total_flops()
            out = out.float().cpu()
            res["finite"] = bool(torch.isfinite(out).all())
            res["output_path"] = os.path.join(spec["outdir"], f"{impl}_{op}_{size}_{dtype_name}_{int(compiled)}.pt")
            torch.save(out, res["output_path"])
        except Exception as err:  # one failing case must not hide the others: report it in its row
            res["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        results.append(res)
    print(json.dumps(results))


def _child(args: List[str], timeout: Optional[float] = None, env: Optional[Dict[str, str]] = None) -> Any:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        return {"error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The implementations whose half-precision convs are torch's own (diffusers, the host's VAE): on a CPU
# without native bf16/fp16 they take torch's emulated fallback, ~100x fp32's time.
TORCH_FALLBACK_IMPLS = ("diffusers", "host")


def slow_half_dtypes(device: str, dtypes: Sequence[str]) -> List[str]:
    """The half dtypes among `dtypes` that this CPU has no native convolutions for (none on CUDA)."""
    if device != "cpu":
        return []
    sys.path.insert(0, ROOT)
    import torch

    from vae_core import cpu_half

    names = {"bf16": torch.bfloat16, "fp16": torch.float16}
    return [d for d in dtypes if d in names and not cpu_half.NATIVE[names[d]]]


def conv_peak(dtype: str, device: str, size: int, threads: int, repeats: int = 3) -> dict:
    """The best GFLOP/s of one 3x3 conv over the VAE's shapes at image size `size`."""
    torch_dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
    code = _PEAK_CHILD.format(root=ROOT, device=device, dtype=torch_dtype, shapes=_conv_shapes(size), repeats=repeats,
                              threads=threads)
    return _child(["-c", code])


def measure(impl: str, cases: List[Tuple[str, int, str, bool]], device: str, repeats: int, threads: int,
            outdir: str) -> Dict[Tuple[str, int, str, bool], dict]:
    """Run `cases` ([op, size, dtype, compiled]) for one implementation in fresh processes: one per
    case on the CPU, where a process's resident-memory peak is only honest for its first run (freed
    heap is reused without growing RSS); one for all cases on CUDA, whose allocator counts exactly."""
    groups = [list(cases)] if device == "cuda" else [[c] for c in cases]
    results = {}
    for group in groups:
        spec = dict(impl=impl, cases=[list(c) for c in group], device=device, repeats=repeats, threads=threads,
                    outdir=outdir)
        out = _child([os.path.abspath(__file__), "--child", json.dumps(spec)])
        if isinstance(out, dict):  # the whole process failed
            results.update({tuple(c): dict(out) for c in group})
            continue
        results.update({(r["op"], r["size"], r["dtype"], r["compiled"]): r for r in out})
        if device == "cpu":
            # the memory figure: the same cold call where every allocation is its own mapping
            mem = _child([os.path.abspath(__file__), "--child", json.dumps({**spec, "memory_only": True})])
            for r in mem if isinstance(mem, list) else []:
                key = (r["op"], r["size"], r["dtype"], r["compiled"])
                if key in results and "peak_bytes" in r and "error" not in results[key]:
                    results[key]["peak_bytes"] = r["peak_bytes"]
    return results


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def run(sizes: List[int], dtypes: List[str], ops: List[str], impls: List[str], device: str, repeats: int,
        threads: int, compile_dtypes: Sequence[str] = ()) -> Dict[Tuple[str, str, int, str, bool], dict]:
    """Measure and print the table. Returns {(impl, op, size, dtype, compiled): result}."""
    import torch

    print(f"torch {torch.__version__}, device {device}, {threads} threads, best of {repeats} warm calls "
          f"(first = the cold first call), SD-size random weights (128/256/512/512)")
    peaks = {}
    for dtype in dtypes:
        p = conv_peak(dtype, device, max(sizes), threads)
        peaks[dtype] = p.get("peak_gflops")
        detail = ", ".join(f"{c} ch at {s}²: {g:.0f}" for c, s, g in p.get("rows", []))
        print(f"conv peak {dtype}: {_fmt(peaks[dtype], '.0f')} GFLOP/s (one 3x3 conv, channels_last; "
              f"{detail or p.get('error')})")
    results = {}
    slow = slow_half_dtypes(device, dtypes)
    not_run = set()  # (impl, op, size, dtype, compiled): torch's fallback on this CPU, named in the table
    with tempfile.TemporaryDirectory() as outdir:
        for impl in impls:
            cases = [(op, size, dtype, False) for op in ops for size in sizes for dtype in dtypes]
            if impl in ("ours", "diffusers"):
                cases += [(op, size, dtype, True) for op in ops for size in sizes for dtype in compile_dtypes]
            if impl in TORCH_FALLBACK_IMPLS:
                not_run.update((impl,) + c for c in cases if c[2] in slow)
                cases = [c for c in cases if c[2] not in slow]
            for key, r in measure(impl, cases, device, repeats, threads, outdir).items():
                results[(impl,) + key] = r
        # each case's error against the same implementation's eager fp32 output
        for (impl, op, size, dtype, compiled), r in results.items():
            ref = results.get((impl, op, size, "fp32", False), {})
            if "output_path" in r and "output_path" in ref:
                a, b = torch.load(r["output_path"]), torch.load(ref["output_path"])
                if a.shape == b.shape:
                    r["max_err_vs_fp32"] = float((a - b).abs().max())
    print("share = executed FLOPs / best time / conv peak of that dtype. peak MiB: the cold call's peak of live "
          "tensor bytes (on the CPU from torch's allocator events; see the module docstring). "
          "Ratio columns are ours / this row "
          "(below 1.0: ours is faster or smaller); on the ours-node row they are our node / the host's node.")
    header = ("| op | size | dtype | impl | first s | best s | GFLOP executed | GFLOP/s | share of peak | "
              "peak MiB | max err vs fp32 | ours/this time | ours/this mem |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for op in ops:
        for size in sizes:
            for dtype in dtypes:
                for compiled in (False, True):
                    ref_impl = ("ours", op, size, dtype, compiled)
                    for impl in impls:
                        r = results.get((impl, op, size, dtype, compiled))
                        if (impl, op, size, dtype, compiled) in not_run:
                            name = impl + (" compiled" if compiled else "")
                            print(f"| {op} | {size} | {dtype} | {name} | not run: this CPU has no native {dtype}, "
                                  f"where torch's fallback takes ~100x fp32's time (benchmarks/bench_cpu_half.py "
                                  f"times it) |")
                        if r is None:
                            continue
                        name = impl + (" compiled" if compiled else "")
                        if "error" in r:
                            print(f"| {op} | {size} | {dtype} | {name} | failed: {r['error']} |")
                            continue
                        gflops = None if r.get("flops") is None else r["flops"] / r["seconds"] / 1e9
                        share = None if gflops is None or not peaks.get(dtype) else gflops / peaks[dtype]
                        base = results.get(ref_impl, {})
                        if impl == "ours-node":
                            base, r_cmp = r, results.get(("host", op, size, dtype, compiled), {})
                        else:
                            r_cmp = r
                        t_ratio = (base["seconds"] / r_cmp["seconds"]) if impl != "ours" and "seconds" in base \
                            and "seconds" in r_cmp else None
                        m_ratio = (base["peak_bytes"] / max(1, r_cmp["peak_bytes"])) if impl != "ours" \
                            and "peak_bytes" in base and "peak_bytes" in r_cmp else None
                        print(f"| {op} | {size} | {dtype} | {name} | {r['first_seconds']:.3f} | {r['seconds']:.3f} | "
                              f"{_fmt(None if r.get('flops') is None else r['flops'] / 1e9, '.1f')} | "
                              f"{_fmt(gflops, '.0f')} | {_fmt(share, '.2f')} | {_fmt(None if 'peak_bytes' not in r else r['peak_bytes'] / 2**20, '.0f')} | "
                              f"{_fmt(r.get('max_err_vs_fp32'), '.2e')} | {_fmt(t_ratio, '.2f')} | "
                              f"{_fmt(m_ratio, '.2f')} |", flush=True)
            a = results.get(("ours", op, size, "fp32", False), {})
            for dtype in dtypes:
                b = results.get(("ours", op, size, dtype, False), {})
                if dtype != "fp32" and "seconds" in a and "seconds" in b:
                    print(f"| {op} | {size} | {dtype} | speed-up of ours {dtype} over ours fp32: "
                          f"{a['seconds'] / b['seconds']:.2f}x, max err {_fmt(b.get('max_err_vs_fp32'), '.2e')} |")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--ops", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--compile", nargs="*", default=[], choices=["fp32", "fp16", "bf16"],
                    help="also time torch.compile'd core models (ours, diffusers) in these dtypes")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return
    run(args.sizes, args.dtypes, args.ops, args.impls, args.device, args.repeats, args.threads, args.compile)


if __name__ == "__main__":
    main()
