"""vae_core.flax: the Flax (JAX) twin of vae_core's AutoencoderKL, loading the same files.

Optional: needs jax and flax, and is never imported by `vae_core` or the nodes. torch is used only
to read files (through the torch core's loaders); the Flax forward pass runs no torch.
"""
try:
    import flax  # noqa: F401
    import jax  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised where JAX is absent
    raise ImportError(
        f"vae_core.flax needs jax and flax ({err}); install them, e.g. "
        "`pip install jax==0.10.2 jaxlib==0.10.2 flax==0.12.8` (the versions requirements-test.txt pins)"
    ) from err

from .model import (  # noqa: E402
    FlaxAutoencoderKL,
    FlaxAutoencoderKLOutput,
    FlaxDecoderOutput,
    FlaxDiagonalGaussianDistribution,
)

__all__ = [
    "FlaxAutoencoderKL",
    "FlaxAutoencoderKLOutput",
    "FlaxDecoderOutput",
    "FlaxDiagonalGaussianDistribution",
]
