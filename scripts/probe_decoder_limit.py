"""How much of a model's reconstruction error is its encoder's, and how much its decoder's.

For each photo: reconstruct through the encoder's posterior mean, then optimise the latent itself
(Adam on the L1 reconstruction loss, decoder fixed) and reconstruct from that. The optimised latent
is the best this decoder does for the photo (within the steps given): a colour shift that it
removes was the encoder's; a PSNR that it cannot raise is the decoder's limit.

    .venv/bin/python scripts/probe_decoder_limit.py                       # the demo VAE, held-out photos
    .venv/bin/python scripts/probe_decoder_limit.py --images chelsea --steps 300

Needs the Debian photos unpacked for the Debian names (`python scripts/images.py --fetch-debian`).
Minutes per photo on one CPU thread; not a test.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import images  # noqa: E402
import train_small_vae as tsv  # noqa: E402  (its image conversions and metrics, as the card uses them)
from vae_core import AutoencoderKL  # noqa: E402


def load(name: str, max_side: int) -> np.ndarray:
    from PIL import Image

    a = images.load_rgb(name)
    h, w = a.shape[:2]
    s = max_side / max(h, w)
    if s < 1:
        a = np.asarray(Image.fromarray(a).resize((round(w * s), round(h * s)), Image.LANCZOS))
    return images.center_crop_multiple(a)


def score(y: torch.Tensor, a: np.ndarray) -> str:
    rec = tsv.to_uint8(y.detach()[0])
    shift = ", ".join(f"{v:+.2f}" for v in tsv.colour_shift(a, rec))
    return f"{tsv.psnr(a, rec):.2f} dB, mean shift R, G, B {shift}"


def probe(model: AutoencoderKL, x: torch.Tensor, steps: int, lr: float):
    """(reconstruction from the posterior mean, reconstruction from the optimised latent, their L1 losses)."""
    with torch.no_grad():
        z0 = model.encode(x).latent_dist.mean
        y0 = model.decode(z0).sample
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        loss = (model.decode(z).sample - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        y = model.decode(z).sample
    return y0, y, (y0 - x).abs().mean().item(), (y - x).abs().mean().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "vae" / "autoencoderkl-demo-f8.safetensors")
    ap.add_argument("--images", nargs="+", default=None, help="image names (default: the held-out set)")
    ap.add_argument("--max-side", type=int, default=512, help="longer side the photos are read at (as the card)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoencoderKL.from_single_file(str(args.model)).eval().requires_grad_(False)
    for name in args.images or images.names("test"):
        a = load(name, args.max_side)
        x = tsv.to_tensor(a)[None]
        t = time.monotonic()
        y0, y, _, _ = probe(model, x, args.steps, args.lr)
        print(f"{name} {a.shape[1]}x{a.shape[0]}: encoder's latent {score(y0, a)}; optimised latent "
              f"({args.steps} steps, {time.monotonic() - t:.0f} s) {score(y, a)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
