"""The AutoencoderKL configuration: diffusers' config fields, defaults and names.

This is data only; the model is built from it in `model.py`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
from typing import Any, Iterator, Optional, Sequence, Tuple, Union

logger = logging.getLogger(__name__)

# The diffusers release whose config.json format we write and whose AutoencoderKL test file we pass
# (see README, "Drop-in for diffusers"); diffusers reads the key as "written by version X".
DIFFUSERS_FORMAT_VERSION = "0.42.1"

# Sequence fields: kept as the caller gave them (a list from JSON stays a list, as in diffusers' FrozenDict).
_SEQUENCE_FIELDS = ("down_block_types", "up_block_types", "block_out_channels")

# -- validation before anything is built ---------------------------------------------------------
# Every field is checked for its type, finiteness and a generous bound before a module exists, so a
# damaged config fails here by name instead of deep in torch (ZeroDivisionError, a 154 GB allocation)
# or at the first run. The bounds sit far above every published VAE (4 levels of at most 512 channels,
# 2 resnets, 4 or 16 latent channels); the real check on size is `parameter_count` against the file.
MAX_LEVELS = 8
MAX_WIDTH = 8192
MAX_LAYERS_PER_BLOCK = 64
MAX_LATENT_CHANNELS = 1024
MAX_IMAGE_CHANNELS = 64
MAX_SAMPLE_SIZE = 1 << 16
ACT_FNS = ("silu", "swish", "mish", "gelu", "relu")  # layers.ACTIVATIONS' names (tests keep them equal)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:80]}... ({len(text):,} characters)"


def _int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={_shown(value)} must be an integer from {low} to {high}")
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is out of range: expected {low} to {high}")


def _number(name: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={_shown(value)} must be a number")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be finite (NaN and infinity would reach every latent and the UI)")
    if positive and value <= 0:
        raise ValueError(f"{name}={value} must be greater than 0")


def _sequence(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}={_shown(value)} must be a list")
    if not low <= len(value) <= high:
        raise ValueError(f"{name} has {len(value)} entries, expected {low} to {high}")


def check_fields(cfg: "AutoencoderKLConfig") -> None:
    """Raise ValueError naming the first field whose type, value or bound is wrong."""
    _int("in_channels", cfg.in_channels, 1, MAX_IMAGE_CHANNELS)
    _int("out_channels", cfg.out_channels, 1, MAX_IMAGE_CHANNELS)
    _sequence("block_out_channels", cfg.block_out_channels, 1, MAX_LEVELS)
    for i, width in enumerate(cfg.block_out_channels):
        _int(f"block_out_channels[{i}]", width, 1, MAX_WIDTH)
    for name in ("down_block_types", "up_block_types"):
        _sequence(name, getattr(cfg, name), 1, MAX_LEVELS)
        for i, kind in enumerate(getattr(cfg, name)):
            if not isinstance(kind, str):
                raise ValueError(f"{name}[{i}]={_shown(kind)} must be a block type name (a string)")
    _int("layers_per_block", cfg.layers_per_block, 1, MAX_LAYERS_PER_BLOCK)
    if not isinstance(cfg.act_fn, str) or cfg.act_fn.lower() not in ACT_FNS:
        raise ValueError(f"act_fn={_shown(cfg.act_fn)} is not supported; expected one of {list(ACT_FNS)}")
    _int("latent_channels", cfg.latent_channels, 1, MAX_LATENT_CHANNELS)
    _int("norm_num_groups", cfg.norm_num_groups, 1, min(cfg.block_out_channels))
    for i, width in enumerate(cfg.block_out_channels):
        if width % cfg.norm_num_groups:
            raise ValueError(f"block_out_channels[{i}]={width} is not divisible by norm_num_groups="
                             f"{cfg.norm_num_groups}: GroupNorm needs every width to split into equal groups")
    if isinstance(cfg.sample_size, (list, tuple)):
        _sequence("sample_size", cfg.sample_size, 1, 2)
        for i, size in enumerate(cfg.sample_size):
            _int(f"sample_size[{i}]", size, 1, MAX_SAMPLE_SIZE)
    else:
        _int("sample_size", cfg.sample_size, 1, MAX_SAMPLE_SIZE)
    _number("scaling_factor", cfg.scaling_factor, positive=True)
    if cfg.shift_factor is not None:
        _number("shift_factor", cfg.shift_factor)
    for name in ("latents_mean", "latents_std"):
        values = getattr(cfg, name)
        if values is None:
            continue
        _sequence(name, values, cfg.latent_channels, cfg.latent_channels)
        for i, v in enumerate(values):
            _number(f"{name}[{i}]", v, positive=name == "latents_std")
    for name in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name}={_shown(getattr(cfg, name))} must be true or false")


def parameter_count(cfg: "AutoencoderKLConfig") -> int:
    """Parameters of the model `cfg` describes, from the config alone (the architecture of model.py,
    counted; tests compare it with a built model): lets a loader refuse a config that asks for more
    weights than a file holds before a single module is built."""
    def conv(cin: int, cout: int, k: int = 3) -> int:
        return cin * cout * k * k + cout

    def resnet(cin: int, cout: int) -> int:
        return 2 * cin + conv(cin, cout) + 2 * cout + conv(cout, cout) + (conv(cin, cout, 1) if cin != cout else 0)

    def mid(c: int) -> int:
        return 2 * resnet(c, c) + ((2 * c + 4 * (c * c + c)) if cfg.mid_block_add_attention else 0)

    ch, layers, latent = list(cfg.block_out_channels), cfg.layers_per_block, cfg.latent_channels
    total = conv(cfg.in_channels, ch[0]) + mid(ch[-1]) + 2 * ch[-1] + conv(ch[-1], 2 * latent)  # encoder ends
    for i, c in enumerate(ch):
        total += resnet(ch[max(i - 1, 0)], c) + (layers - 1) * resnet(c, c) + (conv(c, c) if i < len(ch) - 1 else 0)
    total += conv(2 * latent, 2 * latent, 1) if cfg.use_quant_conv else 0
    total += conv(latent, latent, 1) if cfg.use_post_quant_conv else 0
    rev = ch[::-1]
    total += conv(latent, rev[0]) + mid(rev[0]) + 2 * ch[0] + conv(ch[0], cfg.out_channels)  # decoder ends
    for i, c in enumerate(rev):
        total += resnet(rev[max(i - 1, 0)], c) + layers * resnet(c, c) + (conv(c, c) if i < len(rev) - 1 else 0)
    return total


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
        check_fields(self)
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
