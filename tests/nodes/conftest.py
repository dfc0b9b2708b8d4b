"""Fixtures for contract tests of the nodes: the host imported in-process (CPU), the pack loaded
the way the host loads custom nodes, and tiny random VAEs in a temporary vae folder."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from tiny_vaes import make_tiny  # noqa: E402


@pytest.fixture(scope="session")
def vae_dir(registered_vae_folder):
    return registered_vae_folder("vae")


@pytest.fixture(scope="session")
def tiny_file(pack, vae_dir):
    """'akl_tiny.safetensors' in the vae folder: a tiny random VAE in the LDM layout."""
    path = vae_dir / "akl_tiny.safetensors"
    make_tiny(pack).save_single_file(path)
    return path


@pytest.fixture(scope="session")
def tiny16_file(pack, vae_dir):
    """A tiny 16-latent-channel VAE (SD3/FLUX-like channel count)."""
    path = vae_dir / "akl_tiny16.safetensors"
    make_tiny(pack, seed=1, latent_channels=16).save_single_file(path)
    return path


@pytest.fixture(scope="session")
def tiny_diffusers_dir(pack, vae_dir):
    path = vae_dir / "akl_tiny_diffusers"
    make_tiny(pack, seed=2).save_pretrained(path)
    return path


@pytest.fixture()
def image():
    """Two 72x88 RGBA images (not multiples of 8: exercises the crop), smooth, in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(2, 9, 11, 4, generator=g)
    img = torch.nn.functional.interpolate(base.movedim(-1, 1), size=(72, 88), mode="bilinear",
                                          align_corners=False).movedim(1, -1)
    return img.clamp(0, 1).contiguous()


@pytest.fixture()
def loader(pack, tiny_file):
    """Load VAE (AutoencoderKL) applied to the tiny file: returns our VAE object."""
    node = pack.nodes.node_classes.AutoencoderKLLoader()
    return node.load("akl_tiny.safetensors")["result"][0]
