"""The web extension in a real browser: a ComfyUI server (the pinned host, --disable-api-nodes)
with this pack, driven by headless Chromium (/usr/bin/chromium through playwright-core).

browser_test.mjs does the clicking and prints what it saw as JSON; these tests assert on it.
Needs `scripts/setup_browser.sh` (chromium + tests/web/node_modules) and `scripts/setup.sh`.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WEB_TESTS = Path(__file__).resolve().parent
REPO_ROOT = WEB_TESTS.parents[1]
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
DEMO_VAE = REPO_ROOT / "models" / "vae" / "autoencoderkl-demo-f8.safetensors"
TILED_WORKFLOW = REPO_ROOT / "example_workflows" / "akl_tiled_round_trip.json"
ATTENTION_WORKFLOW = REPO_ROOT / "example_workflows" / "akl_attention_processor.json"
# The demo image: 640 x 384 px, so 256 px tiles with 32 px overlap make a 2 x 3 grid.
IMAGE_H, IMAGE_W = 384, 640
NEW_TILE = 512
SETUP_HINT = "run scripts/setup_browser.sh"
OUR_NODES = ("AutoencoderKLLoader", "AutoencoderKLEncode", "AutoencoderKLDecode", "AutoencoderKLEncodeTiled",
             "AutoencoderKLDecodeTiled", "AutoencoderKLSetAttentionProcessor")
CARD_LABELS = ("Family", "Latent channels", "Scaling factor", "Shift factor", "Dtype", "Parameters", "Format")


def _grid_module():
    from test_js_logic import _grid_module as load  # nodes/grid.py without the host (it imports vae_core)

    return load()


def _comfy_server_module():
    e2e = str(REPO_ROOT / "tests" / "e2e")
    if e2e not in sys.path:
        sys.path.insert(0, e2e)
    import comfy_server

    return comfy_server


@pytest.fixture(scope="module")
def browser_run(node_bin):
    """Start a server, run browser_test.mjs against it once; yields (observations, server, history)."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} missing (Debian package 'chromium'); {SETUP_HINT}")
    if not (WEB_TESTS / "node_modules" / "playwright-core").is_dir():
        pytest.skip(f"tests/web/node_modules/playwright-core missing; {SETUP_HINT}")
    cs = _comfy_server_module()
    if not (cs.COMFY_DIR / "main.py").is_file():
        pytest.skip(f"ComfyUI host not installed at {cs.COMFY_DIR} (run scripts/setup.sh)")

    import numpy as np
    import torch
    from PIL import Image

    server = cs.ComfyServer()
    server.start()
    try:
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8)).resize(
            (IMAGE_W, IMAGE_H), Image.BICUBIC).save(server.input_dir / "akl_demo.png")
        args = []
        if not DEMO_VAE.is_file():
            # No shipped demo VAE yet: a tiny random one (the panels do not care about its quality).
            if str(REPO_ROOT) not in sys.path:
                sys.path.insert(0, str(REPO_ROOT))
            import vae_core

            torch.manual_seed(0)
            tiny = vae_core.AutoencoderKL(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                                          down_block_types=("DownEncoderBlock2D",) * 4,
                                          up_block_types=("UpDecoderBlock2D",) * 4)
            tiny.save_single_file(server.vae_dir / "akl_web_tiny.safetensors")
            args = ["--vae-name", "akl_web_tiny.safetensors"]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        cmd = [node_bin, str(WEB_TESTS / "browser_test.mjs"), "--url", server.url, "--artifacts", str(ARTIFACTS),
               "--workflow", str(TILED_WORKFLOW), "--workflow2", str(ATTENTION_WORKFLOW),
               "--tile-size", str(NEW_TILE), "--timeout", "90", *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
        except subprocess.TimeoutExpired as err:
            pytest.fail(f"browser_test.mjs did not finish in 240 s; stderr:\n{err.stderr}\nserver log:\n"
                        f"{server.log_tail()}")
        try:
            observed = json.loads(proc.stdout)
        except ValueError:
            pytest.fail(f"browser_test.mjs exited {proc.returncode} without JSON; stderr:\n{proc.stderr[-6000:]}\n"
                        f"stdout:\n{proc.stdout[-3000:]}")
        (ARTIFACTS / "web_browser_test.json").write_text(json.dumps(observed, indent=1))
        history = server.get_json("/history")
        yield observed, server, history
    finally:
        server.stop()


def _step(observed, name):
    errors = [e for e in observed["errors"] if e["step"] in (name, "browser")]
    assert not errors, f"browser step {name!r} failed:\n" + "\n".join(e["message"] for e in errors)
    assert name in observed["steps"], f"step {name!r} did not run; errors: {observed['errors']}"
    return observed["steps"][name]


def _panel(panels, node_type):
    found = [p for p in panels.values() if p["type"] == node_type]
    assert len(found) == 1, f"expected one {node_type} panel, got {[p['type'] for p in panels.values()]}"
    return found[0]


def _history_output(history, node_type, key):
    """The UI output `key` of the last run of `node_type` (the server's own record)."""
    for entry in reversed(list(history.values())):
        for node_id, out in entry["outputs"].items():
            if entry["prompt"][2][node_id]["class_type"] == node_type and key in out:
                return out[key][0]
    raise AssertionError(f"no {key} output of {node_type} in the server's history")


def test_extension_loads_without_errors(browser_run):
    observed, _, _ = browser_run
    assert _step(observed, "load_ui")["extensions"] == ["ComfyUI-AutoencoderKL.NodePanels"]
    assert observed["page_errors"] == []
    # Errors from our scripts name their path or the extension (the frontend's own, e.g. blocked
    # calls to api.comfy.org for node info, are not ours).
    ours = [e for e in observed["console_errors"]
            if "/extensions/ComfyUI-AutoencoderKL/" in e or "ComfyUI-AutoencoderKL.NodePanels" in e]
    assert ours == []


def test_nodes_in_library_with_tooltips(browser_run):
    observed, server, _ = browser_run
    lib = _step(observed, "node_library")
    assert lib["listed"] == {n: True for n in OUR_NODES}
    info = server.object_info()
    # Hovering a library entry previews the node with its description.
    assert info["AutoencoderKLEncodeTiled"]["description"] in lib["preview"]
    for node in OUR_NODES:
        d = lib["defs"][node]
        assert d["description"] == info[node]["description"]
        assert d["inputs"] > 0 and d["input_tooltips"] == d["inputs"], (node, d)
        assert d["outputs"] > 0 and d["output_tooltips"] == d["outputs"], (node, d)
    # Hovering the tile_size widget on the canvas shows its tooltip.
    tip = info["AutoencoderKLEncodeTiled"]["input"]["required"]["tile_size"][1]["tooltip"]
    assert _step(observed, "widget_tooltip")["text"] == tip


def test_workflow_loads_and_runs(browser_run):
    observed, _, history = browser_run
    types = {n["type"] for n in _step(observed, "load_workflow")["nodes"]}
    assert {"AutoencoderKLLoader", "AutoencoderKLEncodeTiled", "AutoencoderKLDecodeTiled"} <= types
    assert _step(observed, "queue_and_run")["queued"]
    assert len(history) == 2, "the two queued example workflows"
    assert all(e["status"]["status_str"] == "success" for e in history.values())


def test_panels_wait_for_a_run(browser_run):
    observed, _, _ = browser_run
    before = _step(observed, "panels_before_run")
    assert "model card" in _panel(before, "AutoencoderKLLoader")["text"]
    assert "image size" in _panel(before, "AutoencoderKLEncodeTiled")["text"]


def test_loader_shows_model_card(browser_run):
    observed, _, history = browser_run
    panel = _panel(_step(observed, "panels_after_run"), "AutoencoderKLLoader")
    card = _history_output(history, "AutoencoderKLLoader", "akl_card")
    assert panel["visible"] and panel["card"] == card
    rows = panel["rows"]
    assert set(CARD_LABELS) <= set(rows), rows
    assert rows["Family"] == (card["family"] or "unknown")
    assert rows["Latent channels"] == str(card["latent_channels"])
    assert float(rows["Scaling factor"]) == pytest.approx(card["scaling_factor"], rel=1e-5)
    if card["shift_factor"] is None:
        assert rows["Shift factor"] == "none"
    else:
        assert float(rows["Shift factor"]) == pytest.approx(card["shift_factor"], rel=1e-5)
    assert rows["Dtype"].startswith(card["dtype"])
    assert rows["Format"].startswith(card["format"])
    assert rows["Parameters"]


def test_tiled_nodes_show_grid(browser_run):
    observed, _, history = browser_run
    grid = _grid_module()
    panels = _step(observed, "panels_after_run")
    for node_type, direction in (("AutoencoderKLEncodeTiled", "encode"), ("AutoencoderKLDecodeTiled", "decode")):
        panel = _panel(panels, node_type)
        served = _history_output(history, node_type, "akl_grid")
        assert panel["visible"] and panel["shown_grid"] == served
        want = grid.tile_grid(IMAGE_H, IMAGE_W, 256, 32, "blend")
        assert (served["rows"], served["cols"]) == (want["rows"], want["cols"]) == (2, 3)
        assert panel["rows"]["Grid"] == "2 × 3 (6 tiles)"
        assert panel["rows"]["Tile / overlap"] == "256 px / 32 px"
        assert "per tile" in panel["rows"]["Est. peak memory"]
        assert panel["rows"]["Run"] == f"{direction} 1 × {IMAGE_W} × {IMAGE_H} px"
        assert panel["rows"]["fp32 retry"] == "no"


def test_changing_tile_size_updates_grid(browser_run):
    observed, _, history = browser_run
    grid = _grid_module()
    changed = _step(observed, "change_tile_size")
    assert changed["widget_value"] == NEW_TILE
    panel = _panel(changed["panels"], "AutoencoderKLDecodeTiled")
    card = _history_output(history, "AutoencoderKLLoader", "akl_card")
    dtype_bytes = {"fp32": 4, "fp16": 2, "bf16": 2}[card["dtype"]]
    served = _history_output(history, "AutoencoderKLDecodeTiled", "akl_grid")
    assert served["model"]["block_out_channels"] == card["block_out_channels"]
    want = grid.tile_grid(IMAGE_H, IMAGE_W, NEW_TILE, 32, "blend", dtype_bytes=dtype_bytes, batch=1,
                          direction="decode", model=served["model"])
    assert panel["shown_grid"] == want
    assert panel["rows"]["Grid"] == f"{want['rows']} × {want['cols']} ({want['tiles']} tiles)" == "1 × 2 (2 tiles)"
    # the other tiled node keeps its own settings
    assert _panel(changed["panels"], "AutoencoderKLEncodeTiled")["rows"]["Grid"] == "2 × 3 (6 tiles)"


def test_encode_decode_show_last_run(browser_run):
    observed, _, history = browser_run
    panels = _step(observed, "second_workflow")["panels"]
    for node_type in ("AutoencoderKLEncode", "AutoencoderKLDecode"):
        panel = _panel(panels, node_type)
        report = _history_output(history, node_type, "akl_run")
        assert panel["visible"] and panel["run"] == report
        assert panel["rows"]["Time"].endswith(("ms", " s"))
        assert "est." in panel["rows"]["Peak memory"]
        assert (panel["rows"]["Auto tiling"] == "no") == (not report["tiled"])
        assert panel["rows"]["fp32 retry"].startswith("yes" if report["fp32_retry"] else "no")
    attention = _panel(panels, "AutoencoderKLSetAttentionProcessor")
    assert attention["rows"]["Attention"].startswith("sliced")
    # The loader was cached on this second run (no new output): it shows the card it showed before.
    assert _panel(panels, "AutoencoderKLLoader")["rows"].get("Latent channels")


def test_removing_a_node_removes_its_listeners(browser_run):
    observed, _, _ = browser_run
    removed = _step(observed, "remove_node")
    assert removed["aborted"] and not removed["still_listed"]
    assert removed["after"] == removed["before"] - 1


def test_screenshots_kept(browser_run):
    observed, _, _ = browser_run
    assert _step(observed, "screenshot")["file"]
    for file in observed["artifacts"]:
        path = Path(file)
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000

