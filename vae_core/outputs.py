"""The return types of encode/decode/forward: small ordered dicts with attribute access, as diffusers' outputs.

They behave like diffusers' `ModelOutput` where callers touch them (`out.sample`, `out["sample"]`,
`out[0]`, `to_tuple()`, `keys()`, `values()`); they are plain data, not diffusers' class.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Tuple

import torch

from .distribution import DiagonalGaussianDistribution


class ModelOutput(OrderedDict):
    """An ordered dict of named fields. `_fields` lists them in order; a field left at None is absent
    from the dict (as in diffusers) but still reads as None through its attribute."""

    _fields: Tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()
        if len(args) > len(self._fields):
            raise TypeError(f"{type(self).__name__} takes at most {len(self._fields)} positional fields "
                            f"{self._fields}, got {len(args)}")
        values = dict(zip(self._fields, args))
        for key, value in kwargs.items():
            if key not in self._fields:
                raise TypeError(f"{type(self).__name__} has no field {key!r}; its fields are {self._fields}")
            if key in values:
                raise TypeError(f"{type(self).__name__} got field {key!r} twice")
            values[key] = value
        for name in self._fields:
            if values.get(name) is not None:
                super().__setitem__(name, values[name])

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails: a declared field that is None reads as None
        if name in type(self)._fields:
            return self.get(name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self)._fields:
            if value is None:
                self.pop(name, None)
            else:
                super().__setitem__(name, value)
            return
        super().__setattr__(name, value)

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in type(self)._fields:
            raise KeyError(f"{type(self).__name__} has no field {key!r}; its fields are {self._fields}")
        super().__setitem__(key, value)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]  # out[0], out[:1]: the present fields in order

    def __delitem__(self, key: Any) -> None:
        raise TypeError(f"cannot delete field {key!r} of a {type(self).__name__}")

    def to_tuple(self) -> Tuple[Any, ...]:
        """The present (non-None) fields, in declaration order."""
        return tuple(self[k] for k in self.keys())

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.items())
        return f"{type(self).__name__}({inner})"


class AutoencoderKLOutput(ModelOutput):
    """encode(): `latent_dist`, the posterior over raw latents."""

    _fields = ("latent_dist",)
    latent_dist: DiagonalGaussianDistribution


class DecoderOutput(ModelOutput):
    """decode()/forward(): `sample`, pixels (B, C, H, W) roughly in [-1, 1]; `commit_loss` is diffusers'
    VQ field, always None for a KL-VAE."""

    _fields = ("sample", "commit_loss")
    sample: torch.Tensor
