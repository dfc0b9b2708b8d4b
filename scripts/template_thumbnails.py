"""Make each template's thumbnail from its own output: run example_workflows/api/NAME.api.json
through a real ComfyUI server (the pinned host, `scripts/setup.sh`) and write the image its
SaveImage node saved, on a square card with a caption, as example_workflows/NAME.jpg: the file
the editor's Templates dialog shows (square, centre-cropped). Not a test: tests/web/test_browser.py
runs the same templates from the dialog.

    .venv/bin/python scripts/template_thumbnails.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import pack_without_host  # noqa: E402  (scripts/pack_without_host.py)
from tests.e2e.comfy_server import ComfyServer  # noqa: E402

WORKFLOWS = ROOT / "example_workflows"
LOG_DIR = ROOT / "outputs" / "logs"
CARD = 360  # px, square like the dialog's cards
JPEG_QUALITY = 88
TITLES = {"akl_round_trip": "Round trip", "akl_tiled_round_trip": "Tiled round trip",
          "akl_attention_processor": "Sliced attention"}


def _grid():
    return pack_without_host.load("nodes.grid")


def run_template(srv: ComfyServer, name: str) -> Image.Image:
    prompt = json.loads((WORKFLOWS / "api" / f"{name}.api.json").read_text())
    entry = srv.wait_for(srv.post_prompt(prompt)["prompt_id"], timeout=900)
    if entry.get("status", {}).get("status_str") != "success":
        raise SystemExit(f"{name}: the template failed: {json.dumps(entry.get('status'))[:2000]}\n{srv.log_tail()}")
    images = [im for out in entry["outputs"].values() for im in out.get("images", [])]
    if len(images) != 1:
        raise SystemExit(f"{name}: expected one saved image, got {images}")
    im = images[0]
    return Image.open(srv.output_dir / im.get("subfolder", "") / im["filename"]).convert("RGB")


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def caption(name: str, prompt: dict, image: Image.Image, untiled: Image.Image) -> str:
    """One line saying what the output shows, from the template's own settings and results."""
    nodes = {n["class_type"]: n["inputs"] for n in prompt.values()}
    if "AutoencoderKLDecodeTiled" in nodes:
        t = nodes["AutoencoderKLDecodeTiled"]
        g = _grid().tile_grid(image.height, image.width, t["tile_size"], t["overlap"], t["method"])
        return (f"{g['rows']} x {g['cols']} tiles of {t['tile_size']} px, {t['method']}: "
                f"max |diff| vs untiled {max_diff(image, untiled)}/255")
    if "AutoencoderKLSetAttentionProcessor" in nodes:
        p = nodes["AutoencoderKLSetAttentionProcessor"]["processor"]
        return f"attention '{p}': max |diff| vs default {max_diff(image, untiled)}/255"
    return f"encode -> decode with the demo VAE, {image.width} x {image.height} px"


def card(title: str, line: str, image: Image.Image) -> Image.Image:
    sheet = Image.new("RGB", (CARD, CARD), (30, 30, 30))
    shown = image.resize((CARD, round(image.height * CARD / image.width)), Image.LANCZOS)
    sheet.paste(shown, (0, 0))
    draw = ImageDraw.Draw(sheet)
    y = shown.height + 14
    draw.text((12, y), title, fill=(240, 240, 240), font=ImageFont.load_default(size=24))
    draw.text((12, y + 36), line, fill=(190, 190, 190), font=ImageFont.load_default(size=13))
    return sheet


def main() -> None:
    names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    with ComfyServer(log_dir=LOG_DIR) as srv:
        outputs = {name: run_template(srv, name) for name in names}
    untiled = outputs["akl_round_trip"]
    for name in names:
        prompt = json.loads((WORKFLOWS / "api" / f"{name}.api.json").read_text())
        line = caption(name, prompt, outputs[name], untiled)
        target = WORKFLOWS / f"{name}.jpg"
        card(TITLES.get(name, name), line, outputs[name]).save(target, "JPEG", quality=JPEG_QUALITY, optimize=True)
        print(f"wrote {target.relative_to(ROOT)} ({target.stat().st_size} bytes): {line}")


if __name__ == "__main__":
    main()
