"""The main job, headless: run the example round-trip workflow, plus a tiled decode of the same
latent, on a bundled photo through a real ComfyUI server, then compare.

Writes outputs/demo/: the reconstruction, the tiled reconstruction and comparison.png
(original | reconstruction | tiled | |tiled - untiled| x 32), and the server's log under
outputs/logs/. Prints the reconstruction PSNR and the tiled-vs-untiled difference. The photo comes
from the pack's own sample node (as in the templates); `--image` loads another one through the
host's Load Image instead. `--serve` starts the ComfyUI UI with the pack.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.e2e.comfy_server import ComfyServer  # noqa: E402  (test harness doubles as the demo's client)

DEMO_VAE = "autoencoderkl-demo-f8.safetensors"
INPUT_NAME = "akl_demo.png"  # the name --image is copied to in the demo server's own input folder
LOG_DIR = ROOT / "outputs" / "logs"


def demo_prompt(tile_size: int, overlap: int, method: str, own_image: bool = False) -> dict:
    """The round-trip example workflow, extended with a tiled decode of the same latent.

    With own_image, the sample node is swapped for the host's LoadImage reading INPUT_NAME."""
    prompt = json.loads((ROOT / "example_workflows" / "api" / "akl_round_trip.api.json").read_text())
    by_type = {node["class_type"]: key for key, node in prompt.items()}
    loader, encode = by_type["AutoencoderKLLoader"], by_type["AutoencoderKLEncode"]
    prompt[by_type["SaveImage"]]["inputs"]["filename_prefix"] = "akl_demo_reconstruction"
    prompt[loader]["inputs"]["vae_name"] = DEMO_VAE
    if own_image:
        prompt[by_type["AutoencoderKLSampleImage"]] = {"class_type": "LoadImage", "inputs": {"image": INPUT_NAME}}
    prompt["100"] = {"class_type": "AutoencoderKLDecodeTiled",
                     "inputs": {"samples": [encode, 0], "vae": [loader, 0], "tile_size": tile_size,
                                "overlap": overlap, "method": method}}
    prompt["101"] = {"class_type": "SaveImage",
                     "inputs": {"images": ["100", 0], "filename_prefix": f"akl_demo_tiled_{method}"}}
    return prompt


def shown(path: Path) -> str:
    """A path as printed: relative to the checkout when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def centre_crop8(img: np.ndarray) -> np.ndarray:
    """The crop the Encode node applies: centre, down to a multiple of 8."""
    h, w = img.shape[:2]
    top, left = (h % 8) // 2, (w % 8) // 2
    return img[top : top + h - h % 8, left : left + w - w % 8]


def comparison(panels, labels) -> Image.Image:
    h, w = panels[0].shape[:2]
    pad = 22
    sheet = Image.new("RGB", (w * len(panels), h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (p, label) in enumerate(zip(panels, labels)):
        sheet.paste(Image.fromarray(p), (i * w, pad))
        draw.text((i * w + 4, 4), label, fill="black")
    return sheet


def serve(port: int) -> None:
    cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--disable-api-nodes"]
    try:
        import torch

        if not torch.cuda.is_available():
            cmd.append("--cpu")
    except ImportError:
        pass
    print(f"serving ComfyUI with the pack at http://127.0.0.1:{port} (Ctrl-C stops)")
    subprocess.run(cmd, cwd=ROOT / ".host" / "ComfyUI", check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help="start the ComfyUI UI with the pack instead")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--image", type=Path, default=None,
                        help="your own photo, through the host's Load Image (default: the pack's sample photo)")
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--method", default="exact", choices=["exact", "blend"])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo")
    args = parser.parse_args()
    if args.serve:
        serve(args.port)
        return

    prompt = demo_prompt(args.tile_size, args.overlap, args.method, own_image=args.image is not None)
    if args.image is None:
        sample = next(n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "AutoencoderKLSampleImage")
        photo = ROOT / "models" / "samples" / sample
    else:
        photo = args.image
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ComfyServer(log_dir=LOG_DIR) as srv:
        if args.image is not None:
            shutil.copy(photo, srv.input_dir / INPUT_NAME)  # the demo server's temporary input folder
        print(f"ComfyUI up in {srv.startup_seconds:.1f} s at {srv.url}; photo {shown(photo)}; log {shown(srv.log_path)}")
        prompt_id = srv.post_prompt(prompt)["prompt_id"]
        entry = srv.wait_for(prompt_id, timeout=600)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            raise SystemExit(f"workflow failed: {json.dumps(status)[:2000]}\n{srv.log_tail()}")
        saved = {}
        for node_out in entry["outputs"].values():
            for img in node_out.get("images", []):
                src = srv.output_dir / img.get("subfolder", "") / img["filename"]
                dst = args.out / img["filename"]
                shutil.copy(src, dst)
                saved[img["filename"].split("_0")[0]] = dst
    seconds = time.perf_counter() - t0

    original = centre_crop8(np.asarray(Image.open(photo).convert("RGB")))
    recon = np.asarray(Image.open(saved["akl_demo_reconstruction"]).convert("RGB"))
    tiled = np.asarray(Image.open(saved[f"akl_demo_tiled_{args.method}"]).convert("RGB"))
    diff = np.abs(tiled.astype(np.int16) - recon.astype(np.int16))
    amplified = np.clip(diff * 32, 0, 255).astype(np.uint8)
    sheet = comparison([original, recon, tiled, amplified],
                       ["original", "reconstruction", f"tiled ({args.method}, {args.tile_size}px)",
                        "|tiled - untiled| x 32"])
    sheet.save(args.out / "comparison.png")
    print(f"reconstruction PSNR vs original: {psnr(recon, original):.2f} dB  ({original.shape[1]}x{original.shape[0]})")
    print(f"tiled ({args.method}, tile {args.tile_size}, overlap {args.overlap}) vs untiled: "
          f"max |diff| {int(diff.max())}/255, PSNR {psnr(tiled, recon):.2f} dB")
    print(f"wrote {', '.join(shown(p) for p in saved.values())}, {shown(args.out / 'comparison.png')} "
          f"in {seconds:.1f} s")


if __name__ == "__main__":
    main()
