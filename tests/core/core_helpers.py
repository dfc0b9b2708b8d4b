"""Tiny configs and helpers for the core tests: small enough for a 2-core CPU, same layouts as the real VAEs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DOWN4 = ("DownEncoderBlock2D",) * 4
UP4 = ("UpDecoderBlock2D",) * 4

# Three shapes of the real world, shrunk:
CONFIGS = {
    # SD1/SDXL layout: 4 levels, 2 resnets per level, quant convs, mid attention
    "sd_layout": dict(block_out_channels=(8, 16, 32, 32), down_block_types=DOWN4, up_block_types=UP4,
                      layers_per_block=2, latent_channels=4, norm_num_groups=4, sample_size=32),
    # SD3/FLUX layout: 16 latent channels, no quant convs, a shift factor
    "flux_layout": dict(block_out_channels=(8, 16, 32, 32), down_block_types=DOWN4, up_block_types=UP4,
                        layers_per_block=2, latent_channels=16, norm_num_groups=4, sample_size=32,
                        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                        shift_factor=0.1159),
    # no mid-block attention, one resnet per level, 3 levels
    "no_attention": dict(block_out_channels=(8, 16, 16), down_block_types=DOWN4[:3], up_block_types=UP4[:3],
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
                         mid_block_add_attention=False),
}


def make_pair(name: str, seed: int = 0):
    """(diffusers model, our model) with identical random weights, eval mode, fp32."""
    diffusers = pytest.importorskip("diffusers")
    from vae_core import AutoencoderKL

    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(**CONFIGS[name]).eval()
    # randomise GroupNorm affine too (diffusers initialises it to 1/0, which would hide mistakes)
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.normal_(1.0, 0.2)
                mod.bias.normal_(0.0, 0.2)
    ours = AutoencoderKL(**CONFIGS[name]).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 agreement to ~1e-5 relative to the output's scale.

    Why 1e-5: fp32 has 2^-24 ~ 6e-8 relative rounding; our kernels sum in another order than
    diffusers' (channels_last convolutions, the sub-pixel upsample fold), and a VAE chains ~40
    convolutions, so differences of ~1e-6 of the output scale accumulate (measured: <= 2e-6).
    diffusers itself moves by ~1.5e-6 relative when its input is merely non-contiguous.
    """
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


def tiny_vae(seed: int = 0):
    """A 4-level random-weight VAE (8/16/32/32, 4 groups) with non-trivial GroupNorm affines."""
    from vae_core import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(
        block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, layers_per_block=1, latent_channels=4,
    ).eval()
    # non-trivial GroupNorm affines, so wrong statistics cannot hide behind gamma=1, beta=0
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.data.normal_(1.0, 0.3)
            m.bias.data.normal_(0.0, 0.3)
    return model
