"""A handful of published layouts from the zoo (tests/core/layout_zoo.py) through Load VAE + Decode in the
real server: they load with the family the core gives, the saved image equals diffusers' decode of
the same weights to 8-bit rounding, and refused files fail on the node naming the file while the
server keeps serving. The session's server (tests/e2e/conftest.py): one start for all e2e tests."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

CORE_TESTS = Path(__file__).resolve().parents[1] / "core"
if str(CORE_TESTS) not in sys.path:
    sys.path.insert(0, str(CORE_TESTS))

TIMEOUT = 240
# the headline file, an SD-era Lightning pickle, a renamed container, ComfyUI's scaled fp8, Playground
# v2.5, a pre-0.14 diffusers folder
REPRESENTATIVE = ("vae_ft_mse_ema_ckpt", "kl_f4_lightning_ckpt", "zip_named_safetensors", "float8_scaled_comfy",
                  "playground_v25_single_file", "diffusers_folder_pre014_names")
SIZE = 32  # pixels per side of the image encoded and decoded


@pytest.fixture(scope="module")
def zoo(comfy_server):
    import numpy as np
    from PIL import Image

    from layout_zoo import LAYOUTS

    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)).save(comfy_server.input_dir / IMAGE)
    out = {}
    for name in REPRESENTATIVE:
        sub = comfy_server.vae_dir / f"akl_zoo_{name}"
        sub.mkdir()
        fixture = LAYOUTS[name](sub)
        rel = fixture.path.relative_to(comfy_server.vae_dir).as_posix()
        out[name] = (rel + "/" if fixture.path.is_dir() else rel, fixture)
    return out


IMAGE = "akl_zoo.png"


def _graph(vae_name: str, tag: int) -> dict:
    """LoadImage -> our Encode (the posterior's mode) -> Decode -> SaveImage: the latent has whatever
    channel count the file's VAE has."""
    return {
        "1": {"class_type": "AutoencoderKLLoader", "inputs": {"vae_name": vae_name}},
        "2": {"class_type": "LoadImage", "inputs": {"image": IMAGE}},
        "3": {"class_type": "AutoencoderKLEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": "AutoencoderKLDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": f"akl_zoo_{tag}"}},
    }


def _run(server, graph: dict) -> dict:
    pid = server.post_prompt(graph)["prompt_id"]
    return server.wait_for(pid, timeout=TIMEOUT)


def test_published_layouts_load_and_decode_like_diffusers_in_the_server(comfy_server, zoo):
    import diffusers
    import numpy as np
    import torch
    from PIL import Image

    pixels = np.asarray(Image.open(comfy_server.input_dir / IMAGE).convert("RGB"), dtype=np.float32) / 255
    x_in = torch.from_numpy(pixels).movedim(-1, 0)[None] * 2 - 1  # (1, 3, H, W) in [-1, 1], as the node converts
    for i, name in enumerate(REPRESENTATIVE):
        vae_name, fixture = zoo[name]
        entry = _run(comfy_server, _graph(vae_name, i))
        assert entry["status"]["status_str"] == "success", (name, json.dumps(entry["status"]["messages"])[:2000])
        card = entry["outputs"]["1"]["akl_card"][0]
        assert card["family"] == fixture.family and card["format"] == fixture.container, (name, card)
        saved = entry["outputs"]["5"]["images"][0]
        png = np.asarray(Image.open(comfy_server.output_dir / saved["subfolder"] / saved["filename"]).convert("RGB"))

        ref = diffusers.AutoencoderKL(**fixture.config).eval()
        ref.load_state_dict(fixture.weights, strict=True)
        with torch.no_grad():
            x = ref.decode(ref.encode(x_in).latent_dist.mode()).sample
        expected = ((x[0] + 1) / 2).clamp(0, 1).movedim(0, -1).numpy().astype(np.float64) * 255
        # SaveImage truncates 255 * x to 8 bits (nodes.py: np.clip(i, 0, 255).astype(np.uint8)), so each
        # pixel lies in [0, 1) levels below diffusers' value; 1e-3 of a level allows fp32 noise at the edges
        below = expected - png.astype(np.float64)
        assert below.min() > -1e-3 and below.max() < 1 + 1e-3, (name, below.min(), below.max())


def test_refused_files_fail_on_the_node_naming_the_file_and_the_server_keeps_serving(comfy_server, zoo):
    import torch
    from safetensors.torch import save_file

    from layout_zoo import source_weights
    from vae_core import convert

    ldm = {k: v.contiguous() for k, v in convert.diffusers_to_ldm(source_weights("sd")).items()}
    cases = {
        "akl_zoo_unknown_key.safetensors": ({**ldm, "model_ema.decay": torch.tensor(0.99),
                                             "encoder.down.0.block.0.gamma": torch.zeros(8)},
                                            "unrecognised LDM VAE keys"),
        "akl_zoo_int8.safetensors": ({**ldm, "encoder.conv_in.weight": ldm["encoder.conv_in.weight"].to(torch.int8)},
                                     "floating point"),
    }
    for vae_name, (sd, phrase) in cases.items():
        save_file(sd, str(comfy_server.vae_dir / vae_name))
        entry = _run(comfy_server, _graph(vae_name, 99))
        assert entry["status"]["status_str"] == "error", entry["status"]
        errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert errors and errors[0]["node_id"] == "1", entry["status"]["messages"]
        msg = errors[0]["exception_message"]
        assert vae_name in msg and phrase in msg, msg
    vae_name, _ = zoo["vae_ft_mse_ema_ckpt"]
    assert _run(comfy_server, _graph(vae_name, 100))["status"]["status_str"] == "success"  # still serving
