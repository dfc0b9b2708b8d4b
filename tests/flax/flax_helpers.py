"""Shared pieces of the Flax tests: skip without JAX, tiny random torch VAEs, and jitted encode/decode
compiled once per (config, dtype) for the whole session."""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import pytest
import torch

from core_helpers import CONFIGS, assert_close_fp32

JAX_MISSING = ("JAX/Flax not installed: the Flax twin is optional; "
               "install jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 (requirements-test.txt) to run these tests")


def require_jax():
    pytest.importorskip("jax", reason=JAX_MISSING)
    pytest.importorskip("flax", reason=JAX_MISSING)


def torch_vae(name: str, seed: int = 0):
    """Our torch AutoencoderKL in layout `name`, random weights, GroupNorm affines randomised too."""
    from vae_core import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**CONFIGS[name]).eval()
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return vae


def image(batch: int = 2, h: int = 64, w: int = 48, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=g) * 2 - 1


class Compiled:
    """A Flax model with params from `torch_vae(name)` and its jitted encode (-> the posterior) and decode."""

    def __init__(self, name: str, dtype_name: str = "float32"):
        import jax
        import jax.numpy as jnp

        from vae_core.flax import FlaxAutoencoderKL

        self.name = name
        self.torch = torch_vae(name)
        self.model, self.params = FlaxAutoencoderKL.from_torch(self.torch, dtype=getattr(jnp, dtype_name))
        model = self.model
        self.encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
        self.decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode).sample)
        # encode, then decode a posterior sample drawn from the "gaussian" rng
        self.call_sampled = jax.jit(lambda p, x, key: model.apply({"params": p}, x, sample_posterior=True,
                                                                  rngs={"gaussian": key}).sample)


_CACHE: Dict[Tuple[str, str], Compiled] = {}


def compiled(name: str, dtype_name: str = "float32") -> Compiled:
    key = (name, dtype_name)
    if key not in _CACHE:
        _CACHE[key] = Compiled(name, dtype_name)
    return _CACHE[key]


def nchw(a) -> torch.Tensor:
    """A channels-last jax/numpy array (B, h, w, C) -> a torch tensor (B, C, h, w), float32."""
    return torch.from_numpy(np.asarray(a, dtype=np.float32).transpose(0, 3, 1, 2).copy())


def as_torch(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32).copy())


__all__ = ["CONFIGS", "assert_close_fp32", "require_jax", "torch_vae", "image", "compiled", "nchw", "as_torch"]
