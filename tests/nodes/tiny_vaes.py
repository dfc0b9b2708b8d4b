"""Tiny random VAEs for the node tests (a few thousand parameters, SD layout)."""
from __future__ import annotations

import torch

# Tiny KL-VAE: 4 levels (f = 8) like SD, a few thousand parameters. 8 groups: the only group
# count a shape-only reader (the host's VAESave -> our loader) can recover for these widths.
TINY = dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def make_tiny(pack, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = {**TINY, **overrides}
    model = pack.vae_core.AutoencoderKL(**cfg).eval()
    # random init leaves GroupNorm at identity and biases near 0; perturb so outputs are not trivial
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model
