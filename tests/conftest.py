"""Session fixtures shared by tests/nodes and tests/hostile: the host imported in-process with CPU
semantics, and this repository imported as a package the way the host imports a custom node folder.
The host is .host/ComfyUI (0.3.75) or the one AKL_HOST_DIR names (one host per process: a second
host runs in a second pytest process, see scripts/test.sh)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_autoencoderkl_under_test"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "tests" / "e2e") not in sys.path:
    sys.path.insert(0, str(REPO / "tests" / "e2e"))

from comfy_server import host_site_dir, missing_host_reason, selected_host_dir  # noqa: E402

COMFY_DIR = selected_host_dir()


@pytest.fixture(scope="session")
def host():
    """The host's `nodes` module (ComfyUI 0.3.75 from scripts/setup.sh, or AKL_HOST_DIR's), imported
    with --cpu."""
    if not (COMFY_DIR / "nodes.py").is_file():
        pytest.skip(missing_host_reason(COMFY_DIR))
    site = host_site_dir(COMFY_DIR)
    for path in (COMFY_DIR, site):
        if path is not None and str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: the CUDA build has no device here
    import nodes as host_nodes

    return host_nodes


@pytest.fixture(scope="session")
def pack(host):
    """This repository imported as a package, as the host imports a custom node folder."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def registered_vae_folder(host, tmp_path_factory):
    """Factory: make(name) returns a new temporary folder registered first among the host's 'vae'
    model folders, so the nodes find the files a test writes there."""
    import folder_paths

    def make(name: str) -> Path:
        d = tmp_path_factory.mktemp(name)
        folder_paths.add_model_folder_path("vae", str(d), is_default=True)
        return d

    return make


@pytest.fixture()
def nc(pack):
    """The pack's node classes module."""
    return pack.nodes.node_classes


def pytest_report_header(config):
    version = COMFY_DIR / "comfyui_version.py"
    found = version.read_text().strip().splitlines()[-1] if version.is_file() else "not installed"
    return f"ComfyUI host: {COMFY_DIR} ({found})"


@pytest.fixture
def score_recorder(monkeypatch):
    """recorder(attention_module) -> a list that receives (batch, queries, keys) of every score
    matrix that module's plain-matmul kernel builds (vae_core.attention, or the pack's copy of it)."""

    def record(attention):
        seen = []
        real = attention._math_attention

        def spy(q, k, v, scale):
            seen.append((q.shape[0], q.shape[1], k.shape[1]))
            return real(q, k, v, scale)

        monkeypatch.setattr(attention, "_math_attention", spy)
        return seen

    return record
