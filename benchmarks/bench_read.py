"""What reading weights with plain reads (vae_core.safe_read, no mmap) costs against safetensors'
mmap reader, on an SD-size VAE file (~335 MB fp32, random weights, LDM layout); and what the node
cache's content signature adds per load. Each reader runs in a fresh process (peak RSS is per process).

    python benchmarks/bench_read.py [--file /tmp/sd_vae.safetensors] [--repeats 3]

Not a test: timings on a shared machine are noisy; compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sd_size import SD_CONFIG  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

# Run in a child: read the file one way, print seconds and peak RSS (MiB) as JSON.
CHILD = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
import torch
from vae_core import AutoencoderKL, safe_read
path, how = {path!r}, {how!r}

def status(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":")) / 1024

open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS, after the imports
base = status("VmRSS")
t0 = time.perf_counter()
if how == "mmap (safe_open + get_tensor, the old reader)":
    from safetensors import safe_open
    with safe_open(path, framework="pt", device="cpu") as f:
        sd = {{k: f.get_tensor(k) for k in f.keys()}}
elif how == "plain reads (safe_read.read_safetensors)":
    sd, _ = safe_read.read_safetensors(path)
elif how == "whole file, then safetensors.torch.load(bytes)":
    from safetensors.torch import load
    with open(path, "rb") as f:
        sd = load(f.read())
else:
    sd = AutoencoderKL.from_single_file(path).state_dict()
seconds = time.perf_counter() - t0
peak = status("VmHWM")
print(json.dumps({{"seconds": seconds, "peak_mib": peak, "growth_mib": peak - base,
                  "mb": sum(v.numel() * v.element_size() for v in sd.values()) / 1e6}}))
"""

HOWS = ("mmap (safe_open + get_tensor, the old reader)", "plain reads (safe_read.read_safetensors)",
        "whole file, then safetensors.torch.load(bytes)", "full load (AutoencoderKL.from_single_file)")
OLD = "full load, older tree (--old-tree)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default="/tmp/sd_vae_bench.safetensors")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old-tree", help="a checkout from before safe_read (e.g. `git archive 2d26bec vae_core | "
                        "tar -x -C /tmp/old`): its full load is timed too, for the before/after ratio")
    args = parser.parse_args()
    path = Path(args.file)
    if not path.exists():
        import torch

        from vae_core import AutoencoderKL

        torch.manual_seed(0)
        AutoencoderKL(**SD_CONFIG).save_single_file(path)
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB")
    path.read_bytes()  # warm the page cache once, so every reader starts alike
    for how in HOWS + ((OLD,) if args.old_tree else ()):
        runs = []
        for _ in range(args.repeats):
            repo = args.old_tree if how == OLD else str(REPO)
            code = CHILD.format(repo=repo, path=str(path), how=how)
            if how == OLD:
                code = code.replace("from vae_core import AutoencoderKL, safe_read", "from vae_core import AutoencoderKL")
            out = subprocess.run([sys.executable, "-c", code],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        best = min(runs, key=lambda r: r["seconds"])
        print(f"{how:52s} best of {args.repeats}: {best['seconds']:.3f} s, peak RSS growth {best['growth_mib']:.0f} MiB "
              f"(peak {best['peak_mib']:.0f} MiB) for {best['mb']:.0f} MB of tensors")
    if args.old_tree:  # the before/after pair again, alternating, so both see the same machine load
        pair = {"full load (AutoencoderKL.from_single_file)": (str(REPO), []), OLD: (args.old_tree, [])}
        for _ in range(5):
            for how, (repo, runs) in pair.items():
                code = CHILD.format(repo=repo, path=str(path), how=how)
                if how == OLD:
                    code = code.replace("from vae_core import AutoencoderKL, safe_read", "from vae_core import AutoencoderKL")
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
        for how, (_repo, runs) in pair.items():
            print(f"{how:52s} interleaved x5: median {sorted(runs)[2]:.2f} s ({', '.join(f'{r:.2f}' for r in runs)})")
    sys.path.insert(0, str(REPO / "nodes"))
    from cache import file_signature  # nodes/cache.py imports nothing from the host

    times = []
    for _ in range(args.repeats * 3):
        t0 = time.perf_counter()
        file_signature(str(path))
        times.append(time.perf_counter() - t0)
    print(f"{'cache content signature (nodes/cache.py)':52s} best of {len(times)}: {min(times) * 1e3:.1f} ms "
          f"(median {sorted(times)[len(times) // 2] * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
