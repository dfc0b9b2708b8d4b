"""Fixtures for the hostile tests: the host imported in-process (CPU), the pack loaded as the host
loads a custom node folder, and a temporary vae folder searched first. Same setup as tests/nodes
(the pack module is shared when both run in one session)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
COMFY_DIR = REPO / ".host" / "ComfyUI"
PACK_NAME = "comfyui_autoencoderkl_under_test"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session")
def host():
    if not (COMFY_DIR / "nodes.py").is_file():
        pytest.skip(f"ComfyUI host not installed at {COMFY_DIR} (run scripts/setup.sh)")
    if str(COMFY_DIR) not in sys.path:
        sys.path.insert(0, str(COMFY_DIR))
    from comfy.cli_args import args

    args.cpu = True
    import nodes as host_nodes

    return host_nodes


@pytest.fixture(scope="session")
def pack(host):
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def hostile_vae_dir(host, tmp_path_factory):
    """A temporary folder registered first among the host's 'vae' model folders."""
    import folder_paths

    d = tmp_path_factory.mktemp("hostile_vae")
    folder_paths.add_model_folder_path("vae", str(d), is_default=True)
    return d


@pytest.fixture()
def nc(pack):
    return pack.nodes.node_classes


@pytest.fixture(scope="session")
def good_vae(pack, hostile_vae_dir):
    """Our VAE object for a good tiny file in the hostile vae folder."""
    from hostile_files import write_good

    write_good(hostile_vae_dir / "akl_hostile_good.safetensors", seed=3)
    return pack.nodes.node_classes.AutoencoderKLLoader().load("akl_hostile_good.safetensors")["result"][0]
