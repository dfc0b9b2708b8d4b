"""The diagonal Gaussian posterior q(z|x) that the encoder outputs (Kingma & Welling 2014, sec. 2.4)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import numpy as np
import torch

Generator = Union[torch.Generator, List[torch.Generator], None]


def randn_like_diffusers(shape: Sequence[int], generator: Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise drawn the way diffusers' randn_tensor draws it, so seeds give the same numbers.

    A CPU generator draws on the CPU and the noise moves to `device`; a list of generators draws one
    batch item from each.
    """
    gen0 = generator[0] if isinstance(generator, (list, tuple)) else generator
    draw_device = device
    if gen0 is not None and gen0.device.type != torch.device(device).type:
        if gen0.device.type != "cpu":
            raise ValueError(f"a {gen0.device.type} generator cannot draw noise for a tensor on {device}")
        draw_device = torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        one = (1,) + tuple(shape[1:])
        noise = torch.cat([torch.randn(one, generator=g, device=draw_device, dtype=dtype) for g in generator])
    else:
        noise = torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype)
    return noise.to(device)


class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) per latent element; `parameters` is (B, 2C, h, w) = [mean | logvar]."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        # the clamp keeps exp() finite: the same bounds as LDM and diffusers
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if self.deterministic:
            self.var = self.std = torch.zeros_like(self.mean, device=self.parameters.device, dtype=self.parameters.dtype)

    def sample(self, generator: Generator = None) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, I) from `generator` (the reparameterisation trick)."""
        eps = randn_like_diffusers(self.mean.shape, generator, self.parameters.device, self.parameters.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> torch.Tensor:
        """KL(self || other), or KL(self || N(0, I)) without `other`; summed per batch item."""
        if self.deterministic:
            return torch.Tensor([0.0])
        if other is None:
            return 0.5 * torch.sum(torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            torch.pow(self.mean - other.mean, 2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample` under this Gaussian, summed over `dims`."""
        if self.deterministic:
            return torch.Tensor([0.0])
        logtwopi = np.log(2.0 * np.pi)
        return 0.5 * torch.sum(logtwopi + self.logvar + torch.pow(sample - self.mean, 2) / self.var, dim=list(dims))
