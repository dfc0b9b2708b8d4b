"""The web extension's pure logic (web/akl_lib.js): its node --test unit tests, and parity of its
tile grid maths with nodes/grid.py (whose memory figure is vae_core/memory.py's) on the same cases
(no browser, no server)."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import types
from pathlib import Path

WEB_TESTS = Path(__file__).resolve().parent
REPO_ROOT = WEB_TESTS.parents[1]


def _grid_module():
    if str(REPO_ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import pack_without_host  # scripts/pack_without_host.py

    return pack_without_host.load("nodes.grid")


def test_node_unit_tests(node_bin):
    proc = subprocess.run([node_bin, "--test", str(WEB_TESTS / "unit")], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 0, f"node --test failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


def _cases():
    sizes = [(64, 64), (512, 512), (513, 511), (768, 1024), (1080, 1920), (2048, 800), (4096, 4096), (8, 3000)]
    tiles = [(64, 0), (256, 32), (512, 64), (512, 256), (1024, 128), (256, 136), (500, 64), (32, 0), (256, 12)]
    cases = []
    for (h, w), (t, o), method in itertools.product(sizes, tiles, ["blend", "exact"]):
        cases.append({"image_h": h, "image_w": w, "tile_size": t, "overlap": o, "method": method, "width": 128,
                      "dtype_bytes": 4, "batch": 1, "direction": "decode"})
    # model width, dtype size, batch and direction enter the estimate only
    for width, dsize, batch, direction in itertools.product([32, 128, 512], [2, 4], [1, 3], ["encode", "decode"]):
        cases.append({"image_h": 1080, "image_w": 1920, "tile_size": 512, "overlap": 64, "method": "blend",
                      "width": width, "dtype_bytes": dsize, "batch": batch, "direction": direction})
    # real configs as the nodes send them (model_summary): depth, widths, channels, attention
    models = [
        {"block_out_channels": [8, 16], "latent_channels": 4, "in_channels": 3, "out_channels": 3,
         "mid_block_add_attention": True},
        {"block_out_channels": [8, 16, 32, 32], "latent_channels": 4, "in_channels": 3, "out_channels": 3,
         "mid_block_add_attention": False},
        {"block_out_channels": [128, 256, 512, 512], "latent_channels": 16, "in_channels": 3, "out_channels": 3,
         "mid_block_add_attention": True},
        {"block_out_channels": [64, 128, 256, 256, 512], "latent_channels": 32, "in_channels": 4, "out_channels": 4,
         "mid_block_add_attention": True},
    ]
    for model, (h, w), tile, direction in itertools.product(models, [(64, 64), (1080, 1920), (4096, 4096)],
                                                           [64, 512, 4096], ["encode", "decode"]):
        cases.append({"image_h": h, "image_w": w, "tile_size": tile, "overlap": 0, "method": "exact", "width": 0,
                      "dtype_bytes": 4, "batch": 2, "direction": direction, "model": model})
    return cases


def test_js_grid_matches_nodes_grid(node_bin):
    grid = _grid_module()
    cases = _cases()
    proc = subprocess.run([node_bin, str(WEB_TESTS / "grid_eval.mjs")], input=json.dumps(cases),
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    js = json.loads(proc.stdout)
    assert len(js) == len(cases)
    n_errors = n_tiled = 0
    for case, got in zip(cases, js):
        err = grid.check_tile_params(case["tile_size"], case["overlap"])
        if err:
            n_errors += 1
            assert got == {"error": err}, case
            continue
        want = grid.tile_grid(case["image_h"], case["image_w"], case["tile_size"], case["overlap"], case["method"],
                              4, case["width"], case["dtype_bytes"], case["batch"], case["direction"],
                              model=case.get("model"))
        assert got == want, case
        if "model" in case:  # the grid's figure is the memory model's, for the same config
            cfg = types.SimpleNamespace(**case["model"])
            tile_h, tile_w = min(case["tile_size"], case["image_h"]), min(case["tile_size"], case["image_w"])
            assert want["estimated_bytes"] == grid.memory.tile_working_bytes(case["direction"], tile_h, tile_w, cfg,
                                                                              4, case["batch"])
        n_tiled += want["tiles"] > 1
    # the cases cover both bad settings and real multi-tile grids
    assert n_errors >= 10 and n_tiled >= 50, (n_errors, n_tiled)
