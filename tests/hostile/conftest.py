"""Fixtures for the hostile tests: the host imported in-process (CPU), the pack loaded as the host
loads a custom node folder, and a temporary vae folder searched first. Same setup as tests/nodes
(`host` and `pack` come from tests/conftest.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session")
def hostile_vae_dir(registered_vae_folder):
    return registered_vae_folder("hostile_vae")


@pytest.fixture(scope="session")
def good_vae(pack, hostile_vae_dir):
    """Our VAE object for a good tiny file in the hostile vae folder."""
    from hostile_files import write_good

    write_good(hostile_vae_dir / "akl_hostile_good.safetensors", seed=3)
    return pack.nodes.node_classes.AutoencoderKLLoader().load("akl_hostile_good.safetensors")["result"][0]
