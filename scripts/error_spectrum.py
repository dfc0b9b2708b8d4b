"""Where a model's reconstruction error lies in spatial frequency, on the card's held-out photos.

For each photo it splits the squared error of the reconstruction (uint8, as the card scores it) into
radial frequency bands (Parseval: the bands' shares sum to 1), and prints beside each band the
photo's own energy there and the PSNR the photo would reach if that band's error were gone. A band
whose error is as large as the photo's energy there is one the model does not reproduce at all.

    .venv/bin/python scripts/error_spectrum.py                       # the demo VAE
    .venv/bin/python scripts/error_spectrum.py --optimise 150        # also from the optimised latent

`--optimise STEPS` also scores the reconstruction from a latent optimised for the photo with the
decoder fixed (scripts/probe_decoder_limit.py): error that remains there is the decoder's.
Needs the Debian photos unpacked (`python scripts/images.py --fetch-debian`); not a test.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import train_small_vae as tsv  # noqa: E402  (the card's held-out images, conversions and metrics)
from probe_decoder_limit import probe  # noqa: E402
from vae_core import AutoencoderKL  # noqa: E402

# radial bands in cycles per pixel: an 8x8 latent block spans periods of 8 px, so 1/8 and up is
# detail inside one block, below 1/16 structure across blocks
BANDS: Tuple[Tuple[float, float], ...] = ((0, 1 / 32), (1 / 32, 1 / 16), (1 / 16, 1 / 8), (1 / 8, 1 / 4), (1 / 4, 1.0))


def band_energy(x: np.ndarray, bands: Sequence[Tuple[float, float]] = BANDS) -> List[float]:
    """Mean squared value per pixel and channel of HxWxC `x` carried by each radial band. The bands
    cover every frequency (DC in the first), so they sum to the mean square of `x` (Parseval)."""
    h, w = x.shape[:2]
    radius = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    power = sum(np.abs(np.fft.fft2(x[..., c].astype(np.float64))) ** 2 for c in range(x.shape[2]))
    power = power / (h * w) ** 2 / x.shape[2]
    return [float(power[(radius >= lo) & (radius < hi)].sum()) for lo, hi in bands]


def report(name: str, what: str, a: np.ndarray, rec: np.ndarray, signal: Sequence[float]) -> str:
    """One table row: `rec`'s error against photo `a` per band, beside `signal`, `a`'s own band energy."""
    err = rec.astype(np.float64) - a.astype(np.float64)
    mse = float((err ** 2).mean())
    e = band_energy(err)
    cells = " | ".join(f"{ei:.0f} / {si:.0f} ({10 * np.log10(255 ** 2 / max(mse - ei, 1e-9)):.2f})"
                       for ei, si in zip(e, signal))
    return f"| {name} | {what} | {10 * np.log10(255 ** 2 / mse):.2f} | {cells} |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "vae" / "autoencoderkl-demo-f8.safetensors")
    ap.add_argument("--images", nargs="+", default=None, help="held-out image names (default: all)")
    ap.add_argument("--optimise", type=int, default=0, metavar="STEPS",
                    help="also reconstruct from a latent optimised this many Adam steps (decoder fixed)")
    ap.add_argument("--lr", type=float, default=0.02, help="Adam step size of --optimise")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoencoderKL.from_single_file(str(args.model)).eval().requires_grad_(False)
    heads = " | ".join(f"{lo:.3g}-{hi:.3g}" for lo, hi in BANDS)
    print("Error energy / the photo's energy per band (cycles/px), and in brackets the PSNR without that band's error.")
    print(f"| image | latent | PSNR (dB) | {heads} |")
    print("|---|---|---|" + "---|" * len(BANDS))
    for name, a in tsv.heldout_images().items():
        if args.images and name not in args.images:
            continue
        signal = band_energy(a.astype(np.float64) - a.mean(axis=(0, 1)))  # DC left out: the photo's mean
        print(report(name, "encoder's", a, tsv.reconstruct(model, a), signal), flush=True)
        if args.optimise:
            _, y, _, _ = probe(model, tsv.to_tensor(a)[None], args.optimise, args.lr)
            print(report(name, f"optimised ({args.optimise} steps)", a, tsv.to_uint8(y.detach()[0]), signal), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
