"""Conversion between vae_core's AutoencoderKL and diffusers' AutoencoderKL, sharing the weights.

For handing our model to diffusers pipelines (which want their own class) and back. diffusers is
imported inside the functions only: vae_core never needs it otherwise.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Runtime switches that mean the same thing in both classes (blend tiling and slicing).
_SWITCHES = ("use_slicing", "use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")


def _share_parameters(src: nn.Module, dst: nn.Module) -> None:
    """Make every parameter and buffer of `dst` the very tensor of `src` with the same name."""
    src_params = dict(src.named_parameters())
    src_buffers = dict(src.named_buffers())
    dst_names = {n for n, _ in dst.named_parameters()} | {n for n, _ in dst.named_buffers()}
    missing = sorted(dst_names - set(src_params) - set(src_buffers))
    extra = sorted((set(src_params) | set(src_buffers)) - dst_names)
    if missing or extra:
        raise ValueError(f"cannot share weights between {type(src).__module__}.{type(src).__name__} and "
                         f"{type(dst).__module__}.{type(dst).__name__}: missing {missing[:3]}, unexpected {extra[:3]}")
    for name in dst_names:
        owner_path, _, leaf = name.rpartition(".")
        owner = dst.get_submodule(owner_path) if owner_path else dst
        if name in src_params:
            owner._parameters[leaf] = src_params[name]
        else:
            owner._buffers[leaf] = src_buffers[name]


def _config_fields() -> set:
    from .config import AutoencoderKLConfig

    return set(AutoencoderKLConfig().keys())


def _import_diffusers():
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(f"to_diffusers/from_diffusers need the diffusers package, which is not importable "
                          f"here ({err}); install diffusers, or keep using vae_core's AutoencoderKL") from err
    return diffusers


def to_diffusers(model) -> Any:
    """A diffusers AutoencoderKL with `model`'s config, whose parameters are `model`'s own tensors
    (no copy: training or editing one changes the other). Blend tiling and slicing settings carry over;
    exact tiling and our attention processors do not (diffusers has neither)."""
    diffusers = _import_diffusers()
    fields = {k: v for k, v in model.config.to_dict().items() if k in _config_fields()}
    with torch.device("meta"):
        out = diffusers.AutoencoderKL(**fields)
    _share_parameters(model, out)
    for name in _SWITCHES:
        setattr(out, name, getattr(model, name))
    if model.tiling_method != "blend" and model.use_tiling:
        out.use_tiling = True  # diffusers only has blend tiling: the closest it can do
    out.train(model.training)
    return out


def from_diffusers(cls, model) -> Any:
    """Our AutoencoderKL sharing the parameters of a diffusers AutoencoderKL (the reverse of to_diffusers).
    The shared weights keep diffusers' memory layout (NCHW), which our model runs as well."""
    if type(model).__name__ != "AutoencoderKL" or not hasattr(model, "config"):
        raise TypeError(f"from_diffusers expects a diffusers AutoencoderKL, got {type(model).__module__}."
                        f"{type(model).__name__}")
    fields = {k: v for k, v in dict(model.config).items() if k in _config_fields()}
    with torch.device("meta"):
        out = cls(**fields)
    _share_parameters(model, out)
    for name in _SWITCHES:
        setattr(out, name, getattr(model, name))
    out.train(model.training)
    return out
