"""vae_core: a self-contained KL-VAE (AutoencoderKL) in plain PyTorch with diffusers' API.

Depends on torch, safetensors and numpy only; never on ComfyUI.
"""
__version__ = "0.1.0"

from .attention import (  # noqa: E402
    AttnProcessor,
    AttnProcessor2_0,
    AttnProcessorBase,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
    available_attn_processors,
    make_attn_processor,
    register_attn_processor,
)
from .config import AutoencoderKLConfig  # noqa: E402
from .distribution import DiagonalGaussianDistribution  # noqa: E402
from .model import AutoencoderKL, AutoencoderKLOutput, Decoder, DecoderOutput, Encoder  # noqa: E402

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "AutoencoderKLOutput",
    "DecoderOutput",
    "DiagonalGaussianDistribution",
    "Encoder",
    "Decoder",
    "AttnProcessor",
    "AttnProcessor2_0",
    "AttnProcessorBase",
    "SlicedAttnProcessor",
    "XFormersAttnProcessor",
    "available_attn_processors",
    "make_attn_processor",
    "register_attn_processor",
]
