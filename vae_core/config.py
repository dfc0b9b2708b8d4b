"""The AutoencoderKL configuration: diffusers' config fields, defaults and names.

This is data only; the model is built from it in `model.py`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Iterator, Optional, Sequence, Tuple, Union

logger = logging.getLogger(__name__)

# The diffusers release whose config.json format we write and whose AutoencoderKL test file we pass
# (see README, "Drop-in for diffusers"); diffusers reads the key as "written by version X".
DIFFUSERS_FORMAT_VERSION = "0.42.1"

# Sequence fields: kept as the caller gave them (a list from JSON stays a list, as in diffusers' FrozenDict).
_SEQUENCE_FIELDS = ("down_block_types", "up_block_types", "block_out_channels")


@dataclasses.dataclass
class AutoencoderKLConfig:
    """Every field of diffusers' `AutoencoderKL` config, with the same defaults."""

    in_channels: int = 3  # image channels in (RGB)
    out_channels: int = 3  # image channels out
    down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",)  # one per level
    up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",)  # one per level
    block_out_channels: Tuple[int, ...] = (64,)  # width of each level; len() levels
    layers_per_block: int = 1  # resnets per encoder level (decoder uses one more)
    act_fn: str = "silu"  # nonlinearity inside the resnets and before conv_out
    latent_channels: int = 4  # channels of z (4 for SD1/SDXL, 16 for SD3/FLUX)
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    sample_size: Union[int, Tuple[int, ...]] = 32  # default tile size in pixels
    scaling_factor: float = 0.18215  # diffusion models see (z - shift) * scaling
    force_upcast: bool = True  # fp16 is unsafe for this VAE: run it in fp32
    shift_factor: Optional[float] = None  # subtracted before scaling (SD3, FLUX)
    latents_mean: Optional[Tuple[float, ...]] = None  # per-channel stats, if published
    latents_std: Optional[Tuple[float, ...]] = None
    use_quant_conv: bool = True  # 1x1 conv on the moments after the encoder
    use_post_quant_conv: bool = True  # 1x1 conv on z before the decoder
    mid_block_add_attention: bool = True  # single-head attention in both mid blocks

    def __post_init__(self) -> None:
        for name in _SEQUENCE_FIELDS:
            value = getattr(self, name)
            setattr(self, name, list(value) if isinstance(value, list) else tuple(value))
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None:
                floats = [float(v) for v in value]
                setattr(self, name, floats if isinstance(value, list) else tuple(floats))
        # keys added with register() (diffusers' register_to_config of a non-field key)
        object.__setattr__(self, "_extra", {})
        self.validate()

    def validate(self) -> None:
        levels = len(self.block_out_channels)
        if levels == 0:
            raise ValueError("block_out_channels is empty: a VAE needs at least one level")
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError(
                f"down_block_types ({len(self.down_block_types)}) and up_block_types "
                f"({len(self.up_block_types)}) must have one entry per level of "
                f"block_out_channels ({levels})"
            )
        for kind in self.down_block_types:
            if kind != "DownEncoderBlock2D":
                raise ValueError(f"down block type {kind!r} is not supported; expected 'DownEncoderBlock2D'")
        for kind in self.up_block_types:
            if kind != "UpDecoderBlock2D":
                raise ValueError(f"up block type {kind!r} is not supported; expected 'UpDecoderBlock2D'")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels {self.block_out_channels} must all be divisible by "
                    f"norm_num_groups={self.norm_num_groups}"
                )
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")

    # -- derived ----------------------------------------------------------------

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent along each side (8 for every SD-family VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    # -- dict-like access, as diffusers' FrozenDict allows ------------------------

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails: keys added by register()
        extra = self.__dict__.get("_extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def keys(self) -> Sequence[str]:
        return [f.name for f in dataclasses.fields(self)] + list(self.__dict__.get("_extra", {}))

    def values(self) -> list:
        return [self[k] for k in self.keys()]

    def items(self):
        return [(k, self[k]) for k in self.keys()]

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self.keys() else default

    def register(self, **kwargs: Any) -> None:
        """Set config keys, as diffusers' `register_to_config`: fields are validated, other keys are
        kept as extra entries (saved to config.json, ignored when building a model)."""
        fields = {f.name for f in dataclasses.fields(self)}
        updated = dataclasses.replace(self, **{k: v for k, v in kwargs.items() if k in fields})
        for f in fields:
            setattr(self, f, getattr(updated, f))
        self.__dict__["_extra"].update({k: v for k, v in kwargs.items() if k not in fields})

    @property
    def _class_name(self) -> str:
        return "AutoencoderKL"

    @property
    def _diffusers_version(self) -> str:
        return DIFFUSERS_FORMAT_VERSION

    def to_dict(self) -> dict:
        """Plain JSON-ready values (tuples become lists), fields first, then registered extras."""
        out = {}
        for key, value in self.items():
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "AutoencoderKLConfig":
        """Build from a diffusers config dict; unknown keys are logged and ignored, as diffusers does."""
        if data.get("_class_name") not in (None, "AutoencoderKL"):
            raise ValueError(
                f"{source}: _class_name is {data['_class_name']!r}, expected 'AutoencoderKL'"
            )
        known = set(f.name for f in dataclasses.fields(cls))
        unknown = sorted(k for k in data if k not in known and not k.startswith("_"))
        if unknown:
            logger.info("%s: ignoring config keys this model does not use: %s", source, unknown)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise ValueError(f"{source}: invalid AutoencoderKL config: {err}") from err

    def to_json(self) -> str:
        from . import __version__

        payload = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
                   "_vae_core_version": __version__}
        payload.update(self.to_dict())
        return json.dumps(payload, indent=2, sort_keys=False)
