"""Load VAE (AutoencoderKL) on every layout of the zoo (tests/core/layout_zoo.py), in-process: the card
says the family and container the core decided, and Decode gives diffusers' decode of the same weights.
Files the loader refuses fail on the node with a message that names the file."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

CORE_TESTS = Path(__file__).resolve().parents[1] / "core"
if str(CORE_TESTS) not in sys.path:
    sys.path.insert(0, str(CORE_TESTS))

from layout_zoo import ARCHS, LAYOUTS, source_weights  # noqa: E402

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def zoo_dir(registered_vae_folder):
    return registered_vae_folder("zoo_vae")


@pytest.fixture(scope="module")
def zoo(zoo_dir):
    """Every layout written once into a vae folder the host searches: name -> (vae_name, fixture)."""
    out = {}
    for name, build in LAYOUTS.items():
        sub = zoo_dir / name  # one sub-folder each: two layouts may use the same file name
        sub.mkdir()
        fixture = build(sub)
        rel = fixture.path.relative_to(zoo_dir).as_posix()
        out[name] = (rel + "/" if fixture.path.is_dir() else rel, fixture)
    return out


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_the_node_loads_each_layout_and_decodes_like_diffusers(nc, zoo, name):
    vae_name, fixture = zoo[name]
    out = nc.AutoencoderKLLoader().load(vae_name)
    card = out["ui"]["akl_card"][0]
    assert card["family"] == fixture.family, card
    assert card["format"] == fixture.container, card
    assert card["latent_channels"] == ARCHS[fixture.arch]["latent_channels"]
    vae = out["result"][0]

    ref = diffusers.AutoencoderKL(**fixture.config).eval()
    ref.load_state_dict(fixture.weights, strict=True)
    z = torch.randn(1, card["latent_channels"], 4, 4, generator=torch.Generator().manual_seed(5))
    image = nc.AutoencoderKLDecode().decode({"samples": z}, vae)["result"][0]  # (B, H, W, C) in [0, 1]
    with torch.no_grad():
        expected = ((ref.decode(z).sample + 1) / 2).clamp(0, 1).movedim(1, -1)
    # fp32 on the CPU ("auto"); 1e-5 as in core_helpers.assert_close_fp32, clamping can only shrink differences
    torch.testing.assert_close(image.float(), expected, rtol=1e-5, atol=1e-5)


def _refused(tmp_dir: Path):
    """Files that must fail on the node: (file name, a phrase its message must hold)."""
    from vae_core import convert

    ldm = {k: v.contiguous() for k, v in convert.diffusers_to_ldm(source_weights("sd")).items()}
    save_file({**ldm, "model_ema.decay": torch.tensor(0.99), "encoder.down.0.block.0.gamma": torch.zeros(8)},
              str(tmp_dir / "akl_zoo_unknown_key.safetensors"))
    save_file({**ldm, "decoder.conv_out.scale_weight": torch.ones(3, 1)}, str(tmp_dir / "akl_zoo_blockwise.safetensors"))
    save_file({"model_ema.decay": torch.tensor(0.99), "loss.logvar": torch.zeros(())},
              str(tmp_dir / "akl_zoo_only_leftovers.safetensors"))
    return [("akl_zoo_unknown_key.safetensors", "unrecognised LDM VAE keys: 'encoder.down.0.block.0.gamma'"),
            ("akl_zoo_blockwise.safetensors", "its scale has shape (3, 1)"),
            ("akl_zoo_only_leftovers.safetensors", "no VAE weights")]


def test_refused_layouts_fail_on_the_node_naming_the_file(nc, zoo_dir):
    for vae_name, phrase in _refused(zoo_dir):
        with pytest.raises(ValueError) as err:
            nc.AutoencoderKLLoader().load(vae_name)
        assert vae_name in str(err.value) and phrase in str(err.value), str(err.value)
