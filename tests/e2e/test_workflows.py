"""End to end: a real ComfyUI server with this pack in custom_nodes runs the example workflows
(API twins) and graphs that mix the host's VAE nodes with ours, reports progress on the
websocket, and rejects a bad prompt with a clear error while staying up."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from comfy_server import PromptRejected

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "example_workflows"
DEMO_VAE = REPO / "models" / "vae" / "autoencoderkl-demo-f8.safetensors"
OUR_NODES = {"AutoencoderKLLoader", "AutoencoderKLEncode", "AutoencoderKLDecode", "AutoencoderKLEncodeTiled",
             "AutoencoderKLDecodeTiled", "AutoencoderKLSetAttentionProcessor"}
TIMEOUT = 240


def _vae_core():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import vae_core

    return vae_core


@pytest.fixture(scope="module")
def server(comfy_server):
    """The session's server, with the demo image in its input folder and small VAEs in its vae folder."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(8, 10, 3), dtype=np.uint8)
    Image.fromarray(small).resize((160, 128), Image.BICUBIC).save(comfy_server.input_dir / "akl_demo.png")

    vc = _vae_core()
    torch.manual_seed(0)
    tiny = vc.AutoencoderKL(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    tiny.save_single_file(comfy_server.vae_dir / "akl_e2e_tiny.safetensors")
    return comfy_server


@pytest.fixture(scope="module")
def sd_vae(server):
    """Random SD-size weights (LDM layout, fp16 to halve the file): the host's VAELoader can build these."""
    import torch

    vc = _vae_core()
    torch.manual_seed(1)
    model = vc.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    model.to(torch.float16).save_single_file(server.vae_dir / "akl_e2e_sd.safetensors")
    return "akl_e2e_sd.safetensors"


def _vae_name() -> str:
    """The shipped demo VAE when present (the workflows name it), else the tiny test VAE."""
    return DEMO_VAE.name if DEMO_VAE.is_file() else "akl_e2e_tiny.safetensors"


def _load_api(name: str) -> dict:
    graph = json.loads((WORKFLOWS / "api" / f"{name}.api.json").read_text())
    for node in graph.values():
        if node["class_type"] == "AutoencoderKLLoader":
            node["inputs"]["vae_name"] = _vae_name()
    return graph


def _run(server, graph: dict, ws=None) -> dict:
    pid = server.post_prompt(graph)["prompt_id"]
    entry = server.wait_for(pid, timeout=TIMEOUT)
    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status["messages"], indent=1)[:4000]
    entry["prompt_id"] = pid
    return entry


def _saved_images(server, entry: dict) -> list:
    from PIL import Image

    images = []
    for out in entry["outputs"].values():
        for im in out.get("images", []):
            path = server.output_dir / im.get("subfolder", "") / im["filename"]
            images.append(np.asarray(Image.open(path)))
    return images


# -- the pack is installed ---------------------------------------------------------------------


def test_server_lists_our_nodes_with_labels(server):
    info = server.object_info()
    assert OUR_NODES <= set(info)
    enc = info["AutoencoderKLEncodeTiled"]
    assert enc["display_name"] == "VAE Encode Tiled (AutoencoderKL)"
    assert set(enc["input"]["required"]) == {"pixels", "vae", "tile_size", "overlap"}
    assert enc["category"] == "latent/AutoencoderKL" and enc["description"]
    assert all(spec[1].get("tooltip") for spec in enc["input"]["required"].values())
    names = info["AutoencoderKLLoader"]["input"]["required"]["vae_name"][0]
    assert "akl_e2e_tiny.safetensors" in names


def test_templates_listed_without_api_twins(server):
    templates = server.get_json("/workflow_templates")
    ours = [v for k, v in templates.items() if "AutoencoderKL" in k]
    assert ours, templates
    assert set(ours[0]) == {"akl_round_trip", "akl_tiled_round_trip", "akl_attention_processor"}


def test_ui_workflows_match_their_api_twins():
    """Each template's nodes and widget values are the ones its API twin posts."""
    for ui_path in sorted(WORKFLOWS.glob("*.json")):
        ui = json.loads(ui_path.read_text())
        api = json.loads((WORKFLOWS / "api" / f"{ui_path.stem}.api.json").read_text())
        ui_nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] != "Note"}
        assert set(ui_nodes) == set(api), ui_path.name
        for nid, node in api.items():
            assert ui_nodes[nid]["type"] == node["class_type"]
            widgets = [v for v in node["inputs"].values() if not isinstance(v, list)]
            assert ui_nodes[nid]["widgets_values"][: len(widgets)] == widgets, (ui_path.name, nid)


# -- example workflows -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["akl_round_trip", "akl_tiled_round_trip", "akl_attention_processor"])
def test_example_workflow_runs(server, name):
    entry = _run(server, _load_api(name))
    images = _saved_images(server, entry)
    # the templates read the pack's sample photo (451 x 300), which Encode crops to multiples of 8
    assert len(images) == 1 and images[0].shape == (296, 448, 3)
    uis = {k: v for k, v in entry["outputs"].items()}
    # our UI payloads reach the history (the web extension reads them from "executed" events)
    flat = json.dumps(uis)
    assert "akl_run" in flat
    # the loader's card comes with its first run; later prompts reuse the host's cached output
    loader_id = next(k for k, v in _load_api(name).items() if v["class_type"] == "AutoencoderKLLoader")
    if loader_id in uis:
        # the demo model's own channel count (its card's config), or the tiny test VAE's 4
        demo = json.loads((REPO / "models" / "metrics.json").read_text())["config"]["latent_channels"]
        assert uis[loader_id]["akl_card"][0]["latent_channels"] == (demo if DEMO_VAE.is_file() else 4)
    if name == "akl_tiled_round_trip":
        assert "akl_grid" in flat


# -- host and pack mixed ---------------------------------------------------------------------


def test_our_vae_in_the_hosts_nodes(server):
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "akl_demo.png"}},
        "2": {"class_type": "AutoencoderKLLoader", "inputs": {"vae_name": "akl_e2e_tiny.safetensors"}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "AutoencoderKLDecode", "inputs": {"samples": ["3", 0], "vae": ["2", 0]}},
        "5": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["3", 0], "vae": ["2", 0], "tile_size": 64,
                                                         "overlap": 16, "temporal_size": 64, "temporal_overlap": 8}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "akl_mix_a"}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "akl_mix_b"}},
        # the rest of the host's VAE nodes: tiled encode, plain decode, inpaint encode, VAESave
        "8": {"class_type": "VAEEncodeTiled", "inputs": {"pixels": ["1", 0], "vae": ["2", 0], "tile_size": 64,
                                                         "overlap": 16, "temporal_size": 64, "temporal_overlap": 8}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["2", 0]}},
        "10": {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["1", 0], "vae": ["2", 0], "mask": ["1", 1],
                                                              "grow_mask_by": 6}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["2", 0]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "akl_mix_c"}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "akl_mix_d"}},
        "14": {"class_type": "VAESave", "inputs": {"vae": ["2", 0], "filename_prefix": "vae/akl_mix_saved"}},
    }
    images = _saved_images(server, _run(server, g))
    assert len(images) == 4 and all(im.shape == (128, 160, 3) for im in images)
    saved = sorted((server.output_dir / "vae").glob("akl_mix_saved*.safetensors"))
    assert saved and _vae_core().AutoencoderKL.from_single_file(saved[-1]).config.latent_channels == 4


def test_hosts_vae_in_our_nodes(server, sd_vae):
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "akl_demo.png"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": 64,
                                                    "height": 64, "crop": "center"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": sd_vae}},
        "4": {"class_type": "AutoencoderKLEncode", "inputs": {"pixels": ["2", 0], "vae": ["3", 0]}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["3", 0]}},
        "6": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["3", 0]}},
        "7": {"class_type": "AutoencoderKLDecode", "inputs": {"samples": ["6", 0], "vae": ["3", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "akl_host_a"}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "akl_host_b"}},
    }
    a, b = _saved_images(server, _run(server, g))
    assert a.shape == b.shape == (64, 64, 3)
    # same weights, fp32 on the CPU: host encode + our decode vs our encode + host decode
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


# -- progress, errors ---------------------------------------------------------------------------


def test_tiled_nodes_send_progress_events(server):
    g = _load_api("akl_tiled_round_trip")
    g["1"] = {"class_type": "LoadImage", "inputs": {"image": "akl_demo.png"}}  # 160 x 128
    g["2"]["inputs"]["vae_name"] = "akl_e2e_tiny.safetensors"
    for nid in ("3", "4"):
        # blend: a fixed tile geometry (exact, the default, counts one step per tile and pass)
        g[nid]["inputs"].update(tile_size=64, overlap=16, method="blend")
    g["5"]["inputs"]["filename_prefix"] = "akl_progress"
    with server.collect_ws_events() as ws:
        entry = _run(server, g)
        ws.wait_for_event(lambda e: e.get("type") == "executing" and e["data"].get("node") is None
                          and e["data"].get("prompt_id") == entry["prompt_id"], timeout=30)
        progress = ws.events_for(entry["prompt_id"], types=["progress"])
        executed = ws.events_for(entry["prompt_id"], types=["executed"])
    by_node = {}
    for ev in progress:
        by_node.setdefault(ev["data"]["node"], []).append((ev["data"]["value"], ev["data"]["max"]))
    # 160 x 128 pixels in 64 px tiles every 48 px: 3 rows x 4 columns, one update per tile. A host
    # whose ProgressBar throttles (one update per 100 ms; the first and the last are always sent)
    # sends a subset: rising values ending at 12 of 12. That our tiler makes one update per tile is
    # checked before any throttle in tests/nodes/test_newest_host_contract.py.
    for node in ("3", "4"):
        values = [v for v, m in by_node[node] if m == 12]
        assert len(values) == len(by_node[node]) and values[-1] == 12, by_node[node]
        assert values == sorted(set(values)) and set(values) <= set(range(1, 13)), values
    assert len(by_node["3"]) >= 2  # the first and the last, even throttled
    grids = [e["data"]["output"]["akl_grid"][0] for e in executed if "akl_grid" in (e["data"]["output"] or {})]
    assert grids and grids[0]["rows"] == 3 and grids[0]["cols"] == 4


def test_bad_prompt_is_rejected_clearly_and_the_server_keeps_serving(server):
    g = _load_api("akl_tiled_round_trip")
    bad = copy.deepcopy(g)
    bad["3"]["inputs"]["overlap"] = 12
    with pytest.raises(PromptRejected) as err:
        server.post_prompt(bad)
    body = json.dumps(err.value.body)
    assert "overlap=12 is not a multiple of 8" in body
    mismatch = {
        "1": {"class_type": "AutoencoderKLLoader", "inputs": {"vae_name": "no_such_vae.safetensors"}},
    }
    with pytest.raises(PromptRejected):
        server.post_prompt(mismatch)
    g["5"]["inputs"]["filename_prefix"] = "akl_after_error"
    g["2"]["inputs"]["vae_name"] = "akl_e2e_tiny.safetensors"
    assert len(_saved_images(server, _run(server, g))) == 1


def test_a_latent_from_another_family_fails_with_a_clear_message(server):
    g = {
        "1": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "AutoencoderKLLoader", "inputs": {"vae_name": "akl_e2e_tiny.safetensors"}},
        "3": {"class_type": "AutoencoderKLDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    pid = server.post_prompt(g)["prompt_id"]
    entry = server.wait_for(pid, timeout=TIMEOUT)
    assert entry["status"]["status_str"] == "error"
    msg = json.dumps(entry["status"]["messages"])
    assert "16-channel latent (SD3/FLUX" in msg and "4-channel VAE" in msg
    assert server.object_info("AutoencoderKLDecode")  # still serving
