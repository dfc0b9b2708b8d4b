"""The web extension's pure logic (web/akl_lib.js): its node --test unit tests, and parity of its
tile grid maths with nodes/grid.py on the same cases (no browser, no server)."""
from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
from pathlib import Path

WEB_TESTS = Path(__file__).resolve().parent
REPO_ROOT = WEB_TESTS.parents[1]


def _grid_module():
    # nodes/__init__ imports the host; grid.py alone is host-free, so load it by path.
    spec = importlib.util.spec_from_file_location("akl_grid_under_test", REPO_ROOT / "nodes" / "grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
                              4, case["width"], case["dtype_bytes"], case["batch"], case["direction"])
        assert got == want, case
        n_tiled += want["tiles"] > 1
    # the cases cover both bad settings and real multi-tile grids
    assert n_errors >= 10 and n_tiled >= 50, (n_errors, n_tiled)
