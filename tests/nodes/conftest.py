"""Fixtures for contract tests of the nodes: the host imported in-process (CPU), the pack loaded
the way the host loads custom nodes, and tiny random VAEs in a temporary vae folder."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
COMFY_DIR = REPO / ".host" / "ComfyUI"
PACK_NAME = "comfyui_autoencoderkl_under_test"

# Tiny KL-VAE: 4 levels (f = 8) like SD, a few thousand parameters. 8 groups: the only group
# count a shape-only reader (the host's VAESave -> our loader) can recover for these widths.
TINY = dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


@pytest.fixture(scope="session")
def host():
    """The host's modules, imported with --cpu semantics: returns the host's `nodes` module."""
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
def vae_dir(host, tmp_path_factory):
    """A temporary folder registered first among the host's 'vae' model folders."""
    import folder_paths

    d = tmp_path_factory.mktemp("vae")
    folder_paths.add_model_folder_path("vae", str(d), is_default=True)
    return d


def make_tiny(pack, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = {**TINY, **overrides}
    model = pack.vae_core.AutoencoderKL(**cfg).eval()
    # random init leaves GroupNorm at identity and biases near 0; perturb so outputs are not trivial
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


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
