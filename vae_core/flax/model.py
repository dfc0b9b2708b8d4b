"""FlaxAutoencoderKL: the KL-VAE of Stable Diffusion, SDXL, SD3 and FLUX.1 as a Flax Linen module.

The API and the params names are those of diffusers 0.39's FlaxAutoencoderKL (NCHW pixels in,
a channels-last posterior out); the config is the torch core's. Files are read in `loading.py`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import AutoencoderKLConfig

# GroupNorm epsilon of every SD-family VAE (diffusers' resnet_eps, LDM's Normalize), as in the torch core.
NORM_EPS = 1e-6

# Name -> activation: the names the torch core's act_fn accepts, with torch's definitions
# (exact erf GELU, as torch.nn.functional.gelu; jax's default is the tanh approximation).
ACTIVATIONS: Dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.swish,
    "swish": nn.swish,
    "mish": lambda h: h * jnp.tanh(jax.nn.softplus(h)),
    "gelu": lambda h: nn.gelu(h, approximate=False),
    "relu": nn.relu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"act_fn {name!r} is not supported; choose one of {sorted(ACTIVATIONS)}") from None


# -- the posterior and the outputs ------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class FlaxDiagonalGaussianDistribution:
    """N(mean, exp(logvar)) per latent element; `parameters` is channels-last (B, h, w, 2C) = [mean | logvar].

    A pytree (mean, logvar, std, var), so a jitted encode can return it.
    """

    def __init__(self, parameters: jax.Array, deterministic: bool = False):
        mean, logvar = jnp.split(parameters, 2, axis=-1)
        # the clamp keeps exp() finite: the same bounds as LDM, diffusers and the torch core
        logvar = jnp.clip(logvar, -30.0, 20.0)
        std, var = jnp.exp(0.5 * logvar), jnp.exp(logvar)
        if deterministic:
            std = var = jnp.zeros_like(mean)
        self._set(mean, logvar, std, var, deterministic)

    def _set(self, mean, logvar, std, var, deterministic: bool) -> None:
        self.mean, self.logvar, self.std, self.var = mean, logvar, std, var
        self.deterministic = deterministic

    def tree_flatten(self):
        return (self.mean, self.logvar, self.std, self.var), self.deterministic

    @classmethod
    def tree_unflatten(cls, deterministic, leaves):
        obj = object.__new__(cls)
        obj._set(*leaves, deterministic)
        return obj

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std * eps, eps = jax.random.normal(key, mean.shape) (float32, as diffusers draws it)."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: Optional["FlaxDiagonalGaussianDistribution"] = None) -> jax.Array:
        """KL(self || other), or KL(self || N(0, I)) without `other`; summed per batch item."""
        if self.deterministic:
            return jnp.array([0.0])
        if other is None:
            return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))
        return 0.5 * jnp.sum(
            jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            axis=(1, 2, 3),
        )

    def nll(self, sample: jax.Array, axis: Tuple[int, ...] = (1, 2, 3)) -> jax.Array:
        """Negative log-likelihood of `sample` (channels-last, like `mean`) summed over `axis`."""
        if self.deterministic:
            return jnp.array([0.0])
        return 0.5 * jnp.sum(math.log(2.0 * math.pi) + self.logvar + jnp.square(sample - self.mean) / self.var,
                             axis=tuple(axis))


@flax.struct.dataclass
class FlaxAutoencoderKLOutput:
    """encode()'s result; `latent_dist` is channels-last (B, h, w, C), as in diffusers' Flax class."""

    latent_dist: FlaxDiagonalGaussianDistribution

    def __getitem__(self, i: int):
        return (self.latent_dist,)[i]


@flax.struct.dataclass
class FlaxDecoderOutput:
    """decode()'s result: pixels (B, C, H, W), roughly in [-1, 1] (not clamped)."""

    sample: jax.Array

    def __getitem__(self, i: int):
        return (self.sample,)[i]


# -- layers (NHWC inside) -----------------------------------------------------------------


def _group_norm(groups: int, name: str) -> nn.GroupNorm:
    # No dtype: the result takes the promoted dtype of input and fp32 scale, as diffusers' Flax
    # class did, so a bf16 model keeps its normalised activations in fp32. Statistics are in fp32.
    return nn.GroupNorm(num_groups=groups, epsilon=NORM_EPS, name=name)


def _conv(features: int, k: int, dtype, name: str, stride: int = 1, pad: Union[int, str] = 1) -> nn.Conv:
    padding = "VALID" if pad == "VALID" or pad == 0 else ((pad, pad), (pad, pad))
    return nn.Conv(features, kernel_size=(k, k), strides=(stride, stride), padding=padding, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """norm -> act -> conv3x3 -> norm -> act -> conv3x3, plus a (1x1-projected) skip."""

    out_channels: int
    groups: int
    act_fn: str = "silu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = get_activation(self.act_fn)
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(act(_group_norm(self.groups, "norm1")(x)))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(act(_group_norm(self.groups, "norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut", pad="VALID")(x)
        return h + x


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after one zero row/column at the bottom/right (LDM's asymmetric pad)."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, self.dtype, "conv", stride=2, pad="VALID")(x)


# Row taps of a 3x3 kernel after nearest-2x upsampling: output row 2i reads low-res rows
# (i-1, i, i), row 2i+1 reads (i, i, i+1); folding them gives a 2-tap kernel per phase.
_PHASE_FOLD = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


class _FoldedConv(nn.Module):
    """The conv after nearest-2x upsampling, with nn.Conv's params (`kernel` (3, 3, C, C), `bias`) and
    initialisers, computed in sub-pixel form (see `subpixel_upsample_conv`)."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.channels), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.channels,), jnp.float32)
        return subpixel_upsample_conv(x, kernel, bias, self.dtype)


def subpixel_upsample_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype=None) -> jax.Array:
    """conv3x3(nearest2x(x)) from a (3, 3, Cin, Cout) kernel: (B, n, m, Cin) -> (B, 2n, 2m, Cout).

    The 3x3 kernel is folded into one 2x2 kernel with 4x the outputs, applied to the low-res input:
    16 instead of 36 multiply-adds per low-res pixel and channel pair; the values differ from the
    plain form only by summation order. The fold is linear, so gradients flow through it.
    """
    b, n, m, _ = x.shape
    c = kernel.shape[-1]
    fold = jnp.asarray(_PHASE_FOLD, dtype=jnp.float32)  # (phase, 2 taps, 3 taps)
    k = jnp.einsum("apk,klio,bql->pqiabo", fold, kernel.astype(jnp.float32), fold)  # (2, 2, Cin, 2, 2, Cout)
    k = k.reshape(2, 2, kernel.shape[2], 4 * c)  # outputs ordered (row phase, col phase, Cout)
    x, k, bias4 = nn.dtypes.promote_dtype(x, k, jnp.tile(bias, 4), dtype=dtype)
    y = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = (y + bias4).reshape(b, n + 1, m + 1, 2, 2, c)  # (B, n+1, m+1, row phase, col phase, C)
    rows = [jnp.stack([y[:, a:a + n, e:e + m, a, e] for e in range(2)], axis=3) for a in range(2)]
    return jnp.stack(rows, axis=2).reshape(b, 2 * n, 2 * m, c)  # (B, n, 2, m, 2, C) -> (B, 2n, 2m, C)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv (in sub-pixel form)."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _FoldedConv(self.channels, self.dtype, name="conv")(x)


class AttentionBlock(nn.Module):
    """GroupNorm, one-head self-attention over all H*W positions, residual add."""

    channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = _group_norm(self.groups, "group_norm")(x).reshape(b, h * w, c)  # (B, HW, C)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(tokens) for n in ("query", "key", "value"))
        # q and k scaled by C^-1/4 each: the logits are q.k / sqrt(C) without an overflow-prone product
        s = c ** -0.25
        weights = nn.softmax(jnp.einsum("bqc,bkc->bqk", q * s, k * s), axis=-1)  # (B, HW, HW)
        out = jnp.einsum("bqk,bkc->bqc", weights, v)  # (B, HW, C)
        out = nn.Dense(c, dtype=self.dtype, name="proj_attn")(out)
        return out.reshape(b, h, w, c) + x


class LevelBlock(nn.Module):
    """One encoder or decoder level: `num_layers` resnets, then an optional down- or upsample."""

    out_channels: int
    num_layers: int
    groups: int
    act_fn: str
    resample: Optional[str]  # None, "down" or "up"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.act_fn, self.dtype, name=f"resnets_{j}")(x)
        if self.resample == "down":
            x = Downsample2D(self.out_channels, self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class MidBlock2D(nn.Module):
    """resnet -> (attention) -> resnet at the lowest resolution."""

    channels: int
    groups: int
    act_fn: str
    add_attention: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock2D(self.channels, self.groups, self.act_fn, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = AttentionBlock(self.channels, self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(self.channels, self.groups, self.act_fn, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
    """x (B, H, W, in) -> moments (B, H/f, W/f, 2*latent), f = 2**(levels-1)."""

    cfg: AutoencoderKLConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, ch = self.cfg, self.cfg.block_out_channels
        h = _conv(ch[0], 3, self.dtype, "conv_in")(x)
        for i, width in enumerate(ch):
            h = LevelBlock(width, cfg.layers_per_block, cfg.norm_num_groups, cfg.act_fn,
                           "down" if i < len(ch) - 1 else None, self.dtype, name=f"down_blocks_{i}")(h)
        h = MidBlock2D(ch[-1], cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention, self.dtype,
                       name="mid_block")(h)
        h = get_activation(cfg.act_fn)(_group_norm(cfg.norm_num_groups, "conv_norm_out")(h))
        return _conv(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
    """z (B, h, w, latent) -> x (B, h*f, w*f, out), roughly in [-1, 1]."""

    cfg: AutoencoderKLConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, ch = self.cfg, tuple(reversed(self.cfg.block_out_channels))
        h = _conv(ch[0], 3, self.dtype, "conv_in")(z)
        h = MidBlock2D(ch[0], cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention, self.dtype,
                       name="mid_block")(h)
        for i, width in enumerate(ch):
            h = LevelBlock(width, cfg.layers_per_block + 1, cfg.norm_num_groups, cfg.act_fn,
                           "up" if i < len(ch) - 1 else None, self.dtype, name=f"up_blocks_{i}")(h)
        h = get_activation(cfg.act_fn)(_group_norm(cfg.norm_num_groups, "conv_norm_out")(h))
        return _conv(cfg.out_channels, 3, self.dtype, "conv_out")(h)


# -- the model -------------------------------------------------------------------------------

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(AutoencoderKLConfig))


class FlaxAutoencoderKL(nn.Module):
    """A KL-VAE as a Flax Linen module, with diffusers' FlaxAutoencoderKL API and params names.

    The fields are the torch core's `AutoencoderKLConfig` (same names and defaults), plus `dtype`,
    the computation dtype (params stay float32). `encode(x)` takes pixels (B, C, H, W) in [-1, 1] and
    returns `.latent_dist` over raw latents, channels-last (B, h, w, C) as diffusers' Flax class gave
    it; `decode(z)` takes latents (B, C, h, w) or (B, h, w, C) and returns `.sample` (B, C, H, W).
    Use it like any Linen module: `model.apply({"params": params}, x, method=model.encode)`.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: Tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Union[int, Tuple[int, ...]] = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    shift_factor: Optional[float] = None
    latents_mean: Optional[Tuple[float, ...]] = None
    latents_std: Optional[Tuple[float, ...]] = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32

    @property
    def config(self) -> AutoencoderKLConfig:
        """The torch core's config object (validated): `model.config.scaling_factor` etc."""
        return AutoencoderKLConfig(**{name: getattr(self, name) for name in _CONFIG_FIELDS})

    def setup(self) -> None:
        cfg = self.config  # validates: a bad field raises ValueError here, naming it
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        c = cfg.latent_channels
        self.quant_conv = _conv(2 * c, 1, self.dtype, "quant_conv", pad="VALID") if cfg.use_quant_conv else None
        self.post_quant_conv = (_conv(c, 1, self.dtype, "post_quant_conv", pad="VALID")
                                if cfg.use_post_quant_conv else None)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Union[AutoencoderKLConfig, Dict[str, Any]], dtype: Any = jnp.float32,
                    **overrides) -> "FlaxAutoencoderKL":
        if isinstance(config, AutoencoderKLConfig):
            data = config.to_dict()
        else:
            data = AutoencoderKLConfig.from_dict(
                {k: v for k, v in dict(config).items() if k not in ("_class_name", "dtype")}).to_dict()
        data.update(overrides)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}, dtype=dtype)

    def init_weights(self, rng: jax.Array) -> Dict[str, Any]:
        """Random params (Linen's default initialisers) for this config, from one PRNG key."""
        size = self.sample_size
        h, w = (size, size) if isinstance(size, int) else (size[0], size[-1])
        sample = jnp.zeros((1, self.in_channels, h, w), dtype=jnp.float32)
        params_rng, dropout_rng, gaussian_rng = jax.random.split(rng, 3)
        rngs = {"params": params_rng, "dropout": dropout_rng, "gaussian": gaussian_rng}
        return self.init(rngs, sample)["params"]

    @classmethod
    def from_pretrained(cls, path, subfolder: Optional[str] = None, dtype: Any = jnp.float32, **kwargs):
        """(model, params) from a diffusers folder: Flax weights (diffusion_flax_model.msgpack) or,
        through the torch core's loader, torch weights (diffusion_pytorch_model.safetensors/.bin)."""
        from .loading import load_pretrained

        return load_pretrained(cls, path, subfolder=subfolder, dtype=dtype, **kwargs)

    @classmethod
    def from_single_file(cls, path, config=None, family: Optional[str] = None, dtype: Any = jnp.float32, **kwargs):
        """(model, params) from an LDM/diffusers single file or a full checkpoint, via the torch core's loader."""
        from .loading import load_single_file

        return load_single_file(cls, path, config=config, family=family, dtype=dtype, **kwargs)

    @classmethod
    def from_torch(cls, vae, dtype: Any = jnp.float32):
        """(model, params) with the weights of a torch AutoencoderKL (ours or diffusers')."""
        from .loading import from_torch

        return from_torch(cls, vae, dtype=dtype)

    def save_pretrained(self, folder, params, format: str = "flax") -> None:
        """Write config.json plus diffusion_flax_model.msgpack (format="flax", diffusers' Flax layout),
        or diffusion_pytorch_model.safetensors (format="safetensors", what the torch core loads)."""
        from .loading import save_pretrained

        save_pretrained(self, folder, params, format=format)

    # -- encode / decode ----------------------------------------------------------------------

    def _check(self, x: jax.Array, channels: int, what: str) -> None:
        if x.ndim != 4:
            raise ValueError(f"{what} must be 4-d (B, C, H, W), got shape {tuple(x.shape)}")
        if channels not in (x.shape[1], x.shape[-1]):
            raise ValueError(f"{what} has shape {tuple(x.shape)}: this VAE expects {channels} channels")

    def encode(self, sample: jax.Array, deterministic: bool = True, return_dict: bool = True):
        """Pixels (B, C, H, W) in [-1, 1] -> posterior over raw latents, channels-last (B, H/f, W/f, latent).

        `deterministic` is accepted for diffusers' signature; these VAEs have no dropout.
        """
        if sample.ndim != 4 or sample.shape[1] != self.in_channels:
            raise ValueError(f"encode input must be (B, {self.in_channels}, H, W) pixels, got shape {tuple(sample.shape)}")
        moments = self.encoder(jnp.transpose(sample, (0, 2, 3, 1)))  # NCHW -> NHWC
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        posterior = FlaxDiagonalGaussianDistribution(moments)
        if not return_dict:
            return (posterior,)
        return FlaxAutoencoderKLOutput(latent_dist=posterior)

    def decode(self, latents: jax.Array, deterministic: bool = True, return_dict: bool = True):
        """Latents (B, C, h, w), or channels-last (B, h, w, C) as encode gives them -> pixels (B, C, H, W).

        The layout is read as diffusers' Flax class read it: channels-last when the last axis has
        `latent_channels` entries, so NCHW latents exactly `latent_channels` wide read as NHWC.
        """
        c = self.latent_channels
        self._check(latents, c, "decode input (latents)")
        if latents.shape[-1] != c:
            latents = jnp.transpose(latents, (0, 2, 3, 1))  # NCHW -> NHWC
        h = latents if self.post_quant_conv is None else self.post_quant_conv(latents)
        out = jnp.transpose(self.decoder(h), (0, 3, 1, 2))  # NHWC -> NCHW
        if not return_dict:
            return (out,)
        return FlaxDecoderOutput(sample=out)

    def __call__(self, sample: jax.Array, sample_posterior: bool = False, deterministic: bool = True,
                 return_dict: bool = True):
        """Encode, take the posterior's mode (or a sample, drawn from the "gaussian" rng), decode."""
        posterior = self.encode(sample, deterministic=deterministic).latent_dist
        z = posterior.sample(self.make_rng("gaussian")) if sample_posterior else posterior.mode()
        out = self.decode(z, deterministic=deterministic).sample
        if not return_dict:
            return (out,)
        return FlaxDecoderOutput(sample=out)
