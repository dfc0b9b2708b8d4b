"""The web extension in a real browser: a ComfyUI server (a real host, --disable-api-nodes) with this
pack, driven by headless Chromium (/usr/bin/chromium through playwright-core).

browser_test.mjs does the clicking and prints what it saw as JSON; these tests assert on it. Each
test runs once per host (and so per frontend package that host pins): 0.3.75 (frontend 1.32.9, the
venv's) and 0.8.0 (frontend 1.35.9). Which hosts: AKL_WEB_HOSTS (default "0.3.75,0.8.0"); where the
second one is: AKL_HOST2_DIR (default .host/ComfyUI-0.8.0, from scripts/setup_host2.sh) with its own packages on
AKL_HOST2_PYTHONPATH (default .host/py-0.8.0), put on the server's PYTHONPATH only.
Needs `scripts/setup_browser.sh` (chromium + tests/web/node_modules) and `scripts/setup.sh`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WEB_TESTS = Path(__file__).resolve().parent
REPO_ROOT = WEB_TESTS.parents[1]
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
DEMO_VAE = REPO_ROOT / "models" / "vae" / "autoencoderkl-demo-f8.safetensors"
WORKFLOWS = REPO_ROOT / "example_workflows"
TILED_WORKFLOW = WORKFLOWS / "akl_tiled_round_trip.json"
ATTENTION_WORKFLOW = WORKFLOWS / "akl_attention_processor.json"
TEMPLATES = ("akl_round_trip", "akl_tiled_round_trip", "akl_attention_processor")
SAMPLE = REPO_ROOT / "models" / "samples" / "chelsea.png"
# The templates read the sample photo (451 x 300 px); Encode centre-crops it to multiples of 8.
IMAGE_H, IMAGE_W = 296, 448
TILE, OVERLAP, METHOD = 256, 32, "exact"  # the tiled template's settings
NEW_TILE = 128  # typed into the tiled decoder's widget
VUE_TILE = 160  # set in the Nodes 2.0 step before its run
SETUP_HINT = "run scripts/setup_browser.sh"
OUR_NODES = ("AutoencoderKLLoader", "AutoencoderKLEncode", "AutoencoderKLDecode", "AutoencoderKLEncodeTiled",
             "AutoencoderKLDecodeTiled", "AutoencoderKLSetAttentionProcessor", "AutoencoderKLSampleImage")
CARD_LABELS = ("Family", "Latent channels", "Scaling factor", "Shift factor", "Dtype", "Parameters", "Format")
# A decoded photo, not noise or a blank: the demo VAE gives about 24 dB on it; a random or broken
# decoder gives under 12 dB.
MIN_PSNR_DB = 15.0
# The committed thumbnail shows this output, resized and JPEG-coded: mean |difference| well under 3/255.
THUMBNAIL_MEAN_ABS = 3.0


def _hosts():
    """(id, ComfyUI folder, extra PYTHONPATH or None, extra server args) of each host the browser
    tests run on. "0.3.75-frontend-1.35.9" (not in the default list) is 0.3.75 serving the second
    host's frontend through --front-end-root: the same checks pass on it."""
    second = Path(os.environ.get("AKL_HOST2_DIR", REPO_ROOT / ".host" / "ComfyUI-0.8.0"))
    second_path = os.environ.get("AKL_HOST2_PYTHONPATH", str(REPO_ROOT / ".host" / "py-0.8.0"))
    first = REPO_ROOT / ".host" / "ComfyUI"
    frontend2 = Path(second_path) / "comfyui_frontend_package" / "static"
    known = {"0.3.75": (first, None, ()), "0.8.0": (second, second_path, ()),
             "0.3.75-frontend-1.35.9": (first, None, ("--front-end-root", str(frontend2)))}
    wanted = [h.strip() for h in os.environ.get("AKL_WEB_HOSTS", "0.3.75,0.8.0").split(",") if h.strip()]
    unknown = set(wanted) - set(known)
    if unknown:
        raise ValueError(f"AKL_WEB_HOSTS={os.environ.get('AKL_WEB_HOSTS')!r} names {sorted(unknown)}; "
                         f"use some of {sorted(known)}")
    return [pytest.param((h, *known[h]), id=f"host-{h}") for h in wanted]


def _grid_module():
    from test_js_logic import _grid_module as load  # nodes/grid.py without the host (it imports vae_core)

    return load()


def _comfy_server_module():
    e2e = str(REPO_ROOT / "tests" / "e2e")
    if e2e not in sys.path:
        sys.path.insert(0, e2e)
    import comfy_server

    return comfy_server


@pytest.fixture(scope="module", params=_hosts())
def browser_run(request, node_bin):
    """Start a server on one host, run browser_test.mjs against it once; yields (observations, server, history)."""
    host, comfy_dir, pythonpath, server_args = request.param
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} missing (Debian package 'chromium'); {SETUP_HINT}")
    if not (WEB_TESTS / "node_modules" / "playwright-core").is_dir():
        pytest.skip(f"tests/web/node_modules/playwright-core missing; {SETUP_HINT}")
    if not (Path(comfy_dir) / "main.py").is_file():
        pytest.skip(f"ComfyUI {host} is not installed at {comfy_dir} (scripts/setup.sh installs 0.3.75, "
                    f"scripts/setup_host2.sh the second host; AKL_HOST2_DIR points elsewhere)")
    for i, arg in enumerate(server_args):
        if arg == "--front-end-root" and not (Path(server_args[i + 1]) / "index.html").is_file():
            pytest.skip(f"no frontend at {server_args[i + 1]} (install the second host's packages, see above)")
    if not DEMO_VAE.is_file():
        pytest.fail(f"{DEMO_VAE} missing: the templates name the shipped demo VAE")
    cs = _comfy_server_module()
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    server = cs.ComfyServer(comfy_dir=comfy_dir, env=env, extra_args=server_args)
    server.start()
    try:
        artifacts = ARTIFACTS / f"web-{host}"
        artifacts.mkdir(parents=True, exist_ok=True)
        cmd = [node_bin, str(WEB_TESTS / "browser_test.mjs"), "--url", server.url, "--artifacts", str(artifacts),
               "--workflow", str(TILED_WORKFLOW), "--workflow2", str(ATTENTION_WORKFLOW),
               "--templates", ",".join(TEMPLATES), "--tile-size", str(NEW_TILE), "--vue-tile-size", str(VUE_TILE),
               "--timeout", "180"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=REPO_ROOT)
        except subprocess.TimeoutExpired as err:
            pytest.fail(f"browser_test.mjs did not finish in 1500 s; stderr:\n{err.stderr}\nserver log:\n"
                        f"{server.log_tail()}")
        try:
            observed = json.loads(proc.stdout)
        except ValueError:
            pytest.fail(f"browser_test.mjs exited {proc.returncode} without JSON; stderr:\n{proc.stderr[-6000:]}\n"
                        f"stdout:\n{proc.stdout[-3000:]}")
        (artifacts / "web_browser_test.json").write_text(json.dumps(observed, indent=1))
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


def _history_output(history, node_type, key, prompt_id=None):
    """The UI output `key` of `node_type` in the run `prompt_id` (the server's own record); without
    prompt_id, from the first run that has one (the loader's card: every run here loads the same file,
    and a run that takes the loader from the host's cache records no card)."""
    for pid in ([prompt_id] if prompt_id else list(history)):
        entry = history[pid]
        for node_id, out in entry["outputs"].items():
            if entry["prompt"][2][node_id]["class_type"] == node_type and key in out:
                return out[key][0]
    raise AssertionError(f"no {key} output of {node_type} in run {prompt_id or 'any'} of the server's history")


def _psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _sample_crop():
    from PIL import Image

    img = np.asarray(Image.open(SAMPLE).convert("RGB"))
    h, w = img.shape[:2]
    top, left = (h % 8) // 2, (w % 8) // 2
    return img[top: top + h - h % 8, left: left + w - w % 8]


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
    # the three templates, the two panel workflows, the subgraph and the Nodes 2.0 runs
    assert len(history) == 7, list(history)
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
    run = _step(observed, "queue_and_run")["prompt_id"]
    want = grid.tile_grid(IMAGE_H, IMAGE_W, TILE, OVERLAP, METHOD)
    assert want["tiles"] > 1
    for node_type, direction in (("AutoencoderKLEncodeTiled", "encode"), ("AutoencoderKLDecodeTiled", "decode")):
        panel = _panel(panels, node_type)
        served = _history_output(history, node_type, "akl_grid", run)
        assert panel["visible"] and panel["shown_grid"] == served
        assert (served["rows"], served["cols"]) == (want["rows"], want["cols"])
        assert panel["rows"]["Grid"] == f"{want['rows']} × {want['cols']} ({want['tiles']} tiles)"
        assert panel["rows"]["Tile / overlap"] == f"{TILE} px, exact (no overlap)"
        assert "per tile" in panel["rows"]["Est. peak memory"]
        assert panel["rows"]["Run"] == f"{direction} 1 × {IMAGE_W} × {IMAGE_H} px"
        assert panel["rows"]["fp32 retry"] == "no"


def _card_grid(grid, card, tile, model):
    """The grid the panel should show for `tile`: the card's dtype, the model summary the node served."""
    dtype_bytes = {"fp32": 4, "fp16": 2, "bf16": 2}[card["dtype"]]
    return grid.tile_grid(IMAGE_H, IMAGE_W, tile, OVERLAP, METHOD, dtype_bytes=dtype_bytes, batch=1,
                          direction="decode", model=model)


def test_changing_tile_size_updates_grid(browser_run):
    observed, _, history = browser_run
    grid = _grid_module()
    changed = _step(observed, "change_tile_size")
    assert changed["widget_value"] == NEW_TILE
    panel = _panel(changed["panels"], "AutoencoderKLDecodeTiled")
    card = _history_output(history, "AutoencoderKLLoader", "akl_card")
    served = _history_output(history, "AutoencoderKLDecodeTiled", "akl_grid")
    assert served["model"]["block_out_channels"] == card["block_out_channels"]
    want = _card_grid(grid, card, NEW_TILE, served["model"])
    before = grid.tile_grid(IMAGE_H, IMAGE_W, TILE, OVERLAP, METHOD)
    assert want["tiles"] != before["tiles"]
    assert panel["shown_grid"] == want
    assert panel["rows"]["Grid"] == f"{want['rows']} × {want['cols']} ({want['tiles']} tiles)"
    # the other tiled node keeps its own settings
    assert (_panel(changed["panels"], "AutoencoderKLEncodeTiled")["rows"]["Grid"]
            == f"{before['rows']} × {before['cols']} ({before['tiles']} tiles)")


def test_encode_decode_show_last_run(browser_run):
    observed, _, history = browser_run
    second = _step(observed, "second_workflow")
    panels = second["panels"]
    for node_type in ("AutoencoderKLEncode", "AutoencoderKLDecode"):
        panel = _panel(panels, node_type)
        report = _history_output(history, node_type, "akl_run", second["prompt_id"])
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



# -- the templates, as a new user meets them ---------------------------------------------------


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_runs_as_loaded_from_the_dialog(browser_run, name):
    """Opened from the Templates dialog, Run pressed, nothing copied: the output is the photo."""
    from PIL import Image

    observed, server, history = browser_run
    seen = _step(observed, f"template_{name}")
    # The card shows the committed thumbnail, fetched from the pack's example_workflows folder.
    thumb_url = f"/api/workflow_templates/ComfyUI-AutoencoderKL/{name}.jpg"
    assert any(url.endswith(thumb_url) and status == 200 for url, status in observed["template_requests"]), \
        observed["template_requests"]
    thumb = Image.open(WORKFLOWS / f"{name}.jpg")
    assert (seen["thumbnail"]["width"], seen["thumbnail"]["height"]) == thumb.size
    assert name in seen["card_text"]
    # It loads as saved: the sample node, no LoadImage that would need a file in the input folder.
    assert "AutoencoderKLSampleImage" in seen["nodes"] and "LoadImage" not in seen["nodes"]
    entry = history[seen["prompt_id"]]
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = [im for out in entry["outputs"].values() for im in out.get("images", [])]
    assert len(images) == 1 and images[0]["filename"] in seen["shown"]["src"]
    out = np.asarray(Image.open(server.output_dir / images[0].get("subfolder", "") / images[0]["filename"])
                     .convert("RGB"))
    assert out.shape == (IMAGE_H, IMAGE_W, 3) == (seen["shown"]["height"], seen["shown"]["width"], 3)
    assert _psnr(out, _sample_crop()) > MIN_PSNR_DB
    # The thumbnail is this output (scripts/template_thumbnails.py puts it at the card's top).
    top = np.asarray(thumb.convert("RGB"), dtype=np.float64)
    shown = np.asarray(Image.fromarray(out).resize((thumb.width, round(IMAGE_H * thumb.width / IMAGE_W)),
                                                   Image.LANCZOS), dtype=np.float64)
    diff = np.abs(top[: shown.shape[0]] - shown).mean()
    assert diff <= THUMBNAIL_MEAN_ABS, f"{name}.jpg is not this output (mean diff {diff:.1f}); run " \
                                       "scripts/template_thumbnails.py"


# -- subgraphs and Nodes 2.0 -------------------------------------------------------------------


def test_panels_follow_their_nodes_inside_a_subgraph(browser_run):
    observed, _, history = browser_run
    sub = _step(observed, "subgraph")
    outer = sub["subgraph_node"]
    inner = {cls: f"{outer}:{nid}" for nid, cls in sub["inner"]}
    assert set(inner) == {"AutoencoderKLEncodeTiled", "AutoencoderKLDecodeTiled"}
    # The server names the inner nodes by their path, as the frontend's execution ids do.
    assert sub["progress_ids"] and set(sub["progress_ids"]) <= set(inner.values())
    for cls, execution_id in inner.items():
        panel = _panel(sub["panels"], cls)
        assert panel["in_subgraph"] and panel["execution_id"] == execution_id
        served = _history_output(history, cls, "akl_grid", sub["prompt_id"])
        assert panel["grid"] == served and served["tile_size"] == 192 and served["tiles"] > 1
        assert panel["run"] == _history_output(history, cls, "akl_run", sub["prompt_id"])
        # progress reached the panel while the node ran
        assert panel["statuses"] and all(s.startswith("Running: ") for s in panel["statuses"]), panel["statuses"]


def test_panels_work_in_nodes_2_0(browser_run):
    observed, _, history = browser_run
    grid = _grid_module()
    vue = _step(observed, "vue_nodes")
    assert vue["vue_nodes"] > 0
    # Each panel sits inside its own node's Vue element.
    assert {p["type"] for p in vue["placement"]} >= {"AutoencoderKLLoader", "AutoencoderKLEncodeTiled",
                                                     "AutoencoderKLDecodeTiled"}
    assert all(p["vue_node_id"] == p["node_id"] for p in vue["placement"]), vue["placement"]
    want = grid.tile_grid(IMAGE_H, IMAGE_W, VUE_TILE, OVERLAP, METHOD)
    for cls in ("AutoencoderKLEncodeTiled", "AutoencoderKLDecodeTiled"):
        panel = _panel(vue["panels"], cls)
        assert panel["visible"] and panel["statuses"]
        assert panel["shown_grid"] == _history_output(history, cls, "akl_grid", vue["prompt_id"])
        assert panel["rows"]["Grid"] == f"{want['rows']} × {want['cols']} ({want['tiles']} tiles)"
