"""Encoder, Decoder and AutoencoderKL: the KL-regularised autoencoder of Stable Diffusion, SDXL, SD3 and FLUX.1.

The public surface mirrors diffusers' `AutoencoderKL` (config, encode/decode outputs, slicing,
tiling, attention processors, state-dict names). File formats live in `loading.py`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from . import tiling
from .attention import Attention, AttnProcessor2_0, AttnProcessorBase, make_attn_processor
from .config import AutoencoderKLConfig
from .distribution import DiagonalGaussianDistribution, Generator
from .layers import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D, get_activation, group_norm

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class AutoencoderKLOutput:
    latent_dist: DiagonalGaussianDistribution

    def __getitem__(self, i: int):
        return (self.latent_dist,)[i]


@dataclasses.dataclass
class DecoderOutput:
    sample: torch.Tensor

    def __getitem__(self, i: int):
        return (self.sample,)[i]


# -- encoder / decoder ---------------------------------------------------------------


def _like_weights(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Give the input the conv weights' memory format, so the whole network runs in one layout."""
    if conv.weight.is_contiguous(memory_format=torch.channels_last):
        return x.contiguous(memory_format=torch.channels_last)
    return x


class Encoder(nn.Module):
    """x (B, in, H, W) in [-1, 1] -> moments (B, 2*latent, H/f, W/f), f = 2**(levels-1)."""

    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(
                ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, cfg.norm_num_groups, cfg.act_fn,
                add_downsample=i < len(ch) - 1,
            )
            for i in range(len(ch))
        )
        self.mid_block = UNetMidBlock2D(ch[-1], cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention)
        self.conv_norm_out = group_norm(ch[-1], cfg.norm_num_groups)
        self.conv_act = get_activation(cfg.act_fn)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(_like_weights(x, self.conv_in))
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """z (B, latent, h, w) -> x (B, out, h*f, w*f), roughly in [-1, 1] (not clamped)."""

    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        ch = tuple(reversed(cfg.block_out_channels))
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], kernel_size=3, padding=1)
        self.mid_block = UNetMidBlock2D(ch[0], cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(
                ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, cfg.norm_num_groups, cfg.act_fn,
                add_upsample=i < len(ch) - 1,
            )
            for i in range(len(ch))
        )
        self.conv_norm_out = group_norm(ch[-1], cfg.norm_num_groups)
        self.conv_act = get_activation(cfg.act_fn)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(_like_weights(z, self.conv_in))
        h = self.mid_block(h)
        # diffusers runs the up blocks in their parameter dtype (they may differ when upcast)
        h = h.to(next(iter(self.up_blocks.parameters())).dtype)
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


# -- the model -----------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    """A KL-VAE with diffusers' `AutoencoderKL` API.

    `encode(x)` takes pixels (B, C, H, W) in [-1, 1] and returns `.latent_dist`, a
    DiagonalGaussianDistribution over raw (unscaled) latents; `decode(z)` returns `.sample`
    in roughly [-1, 1]. Diffusion models see `(z - shift_factor) * scaling_factor`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: Tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        force_upcast: bool = True,
        shift_factor: Optional[float] = None,
        latents_mean: Optional[Tuple[float, ...]] = None,
        latents_std: Optional[Tuple[float, ...]] = None,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        cfg = AutoencoderKLConfig(
            in_channels=in_channels, out_channels=out_channels, down_block_types=down_block_types,
            up_block_types=up_block_types, block_out_channels=block_out_channels,
            layers_per_block=layers_per_block, act_fn=act_fn, latent_channels=latent_channels,
            norm_num_groups=norm_num_groups, sample_size=sample_size, scaling_factor=scaling_factor,
            force_upcast=force_upcast, shift_factor=shift_factor, latents_mean=latents_mean,
            latents_std=latents_std, use_quant_conv=use_quant_conv, use_post_quant_conv=use_post_quant_conv,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

        self.use_slicing = False
        self.use_tiling = False
        self.tiling_method = "blend"
        sample = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_sample_min_size = int(sample)
        self.tile_latent_min_size = int(sample / cfg.downscale_factor)
        self.tile_overlap_factor = 0.25
        # Extra keywords for the exact tiler (halo, ...), set by enable_tiling(method="exact", ...)
        self.tiling_options: Dict[str, Any] = {}
        # Metadata set by the loaders: family, file format, source path (informational).
        self.info: Dict[str, Any] = {}
        # Conv weights in channels_last: oneDNN and cuDNN run NHWC convs 15-55% faster than NCHW
        # (measured here on this CPU); activations follow the weights' format. Values are unchanged.
        self.to(memory_format=torch.channels_last)

    # -- construction helpers ------------------------------------------------------

    @classmethod
    def from_config(cls, config: Union[AutoencoderKLConfig, dict], **overrides) -> "AutoencoderKL":
        if isinstance(config, AutoencoderKLConfig):
            data = config.to_dict()
        else:
            data = AutoencoderKLConfig.from_dict(dict(config)).to_dict()
        data.update(overrides)
        return cls(**data)

    @classmethod
    def from_pretrained(cls, path, subfolder: Optional[str] = None, torch_dtype: Optional[torch.dtype] = None,
                        variant: Optional[str] = None, **kwargs) -> "AutoencoderKL":
        """Load a diffusers folder (config.json + weights), or a pipeline folder with a `vae/` subfolder."""
        from .loading import load_pretrained

        return load_pretrained(cls, path, subfolder=subfolder, torch_dtype=torch_dtype, variant=variant, **kwargs)

    @classmethod
    def from_single_file(cls, path, config: Optional[Union[dict, str]] = None, family: Optional[str] = None,
                         torch_dtype: Optional[torch.dtype] = None, **kwargs) -> "AutoencoderKL":
        """Load an LDM/CompVis-layout (or diffusers-layout) single file; the config is inferred from shapes."""
        from .loading import load_single_file

        return load_single_file(cls, path, config=config, family=family, torch_dtype=torch_dtype, **kwargs)

    def save_pretrained(self, folder, safe_serialization: bool = True, variant: Optional[str] = None, **kwargs) -> None:
        from .loading import save_pretrained

        save_pretrained(self, folder, safe_serialization=safe_serialization, variant=variant)

    def save_single_file(self, path) -> None:
        """Write the LDM layout (encoder.down.0.block.0..., 1x1-conv attention) to .safetensors."""
        from .loading import save_single_file

        save_single_file(self, path)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- slicing and tiling switches -----------------------------------------------

    def enable_slicing(self) -> None:
        """Encode/decode a batch one item at a time (peak memory of batch size 1)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, use_tiling: bool = True, method: str = "blend",
                      tile_sample_min_size: Optional[int] = None, tile_overlap_factor: Optional[float] = None,
                      **options) -> None:
        """Tile inputs larger than one tile. "blend" is diffusers' cross-fade tiling; "exact" pools
        GroupNorm statistics over the whole image and gives the untiled result (see exact_tiling.py)."""
        if method not in ("blend", "exact"):
            raise ValueError(f"tiling method {method!r} is unknown; choose 'blend' or 'exact'")
        self.use_tiling = use_tiling
        self.tiling_method = method
        if tile_sample_min_size is not None:
            if int(tile_sample_min_size) < self.config.downscale_factor:
                raise ValueError(
                    f"tile_sample_min_size={tile_sample_min_size} is smaller than one latent pixel "
                    f"({self.config.downscale_factor} px)"
                )
            self.tile_sample_min_size = int(tile_sample_min_size)
            self.tile_latent_min_size = int(tile_sample_min_size) // self.config.downscale_factor
        if tile_overlap_factor is not None:
            if not 0.0 <= tile_overlap_factor < 1.0:
                raise ValueError(f"tile_overlap_factor must be in [0, 1), got {tile_overlap_factor}")
            self.tile_overlap_factor = float(tile_overlap_factor)
        self.tiling_options = dict(options)

    def disable_tiling(self) -> None:
        self.use_tiling = False

    # -- attention processors --------------------------------------------------------

    def _attention_modules(self) -> Dict[str, Attention]:
        return {name: m for name, m in self.named_modules() if isinstance(m, Attention)}

    @property
    def attn_processors(self) -> Dict[str, AttnProcessorBase]:
        """Module path + ".processor" -> processor, as diffusers names them."""
        return {f"{name}.processor": m.processor for name, m in self._attention_modules().items()}

    def set_attn_processor(self, processor: Union[str, AttnProcessorBase, Dict[str, Any]], **kwargs) -> None:
        """Set one processor (object or registered name) everywhere, or a dict keyed by module path."""
        modules = self._attention_modules()
        if isinstance(processor, dict):
            expected = {f"{name}.processor" for name in modules}
            given = set(processor)
            if given != expected:
                raise ValueError(
                    f"set_attn_processor got a dict with keys {sorted(given)}, but this model's attention "
                    f"modules are {sorted(expected)}"
                )
            for name, module in modules.items():
                module.set_processor(self._as_processor(processor[f"{name}.processor"], **kwargs))
            return
        proc = self._as_processor(processor, **kwargs)
        for module in modules.values():
            module.set_processor(proc)

    @staticmethod
    def _as_processor(p: Union[str, AttnProcessorBase], **kwargs) -> AttnProcessorBase:
        if isinstance(p, str):
            return make_attn_processor(p, **kwargs)
        if not callable(p):
            raise TypeError(f"an attention processor must be a name or a callable processor, got {type(p).__name__}")
        return p

    def set_default_attn_processor(self) -> None:
        """Back to torch's scaled_dot_product_attention, the default."""
        self.set_attn_processor(AttnProcessor2_0())

    # -- encode ----------------------------------------------------------------------

    def _is_large_sample(self, x: torch.Tensor) -> bool:
        return x.shape[-1] > self.tile_sample_min_size or x.shape[-2] > self.tile_sample_min_size

    def _is_large_latent(self, z: torch.Tensor) -> bool:
        return z.shape[-1] > self.tile_latent_min_size or z.shape[-2] > self.tile_latent_min_size

    def _check_input(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 4:
            raise ValueError(f"{what} must be (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(f"{what} has {x.shape[1]} channels, this VAE expects {channels}")

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        """Untiled encoder + quant_conv: the (B, 2C, h, w) posterior parameters."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h.contiguous()  # callers expect NCHW-contiguous results, as from diffusers

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and self._is_large_sample(x):
            return self._tiled_moments(x, self.tiling_method)
        return self._moments(x)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Pixels (B, C, H, W) in [-1, 1] -> posterior over raw latents (B, latent, H/f, W/f)."""
        self._check_input(x, self.config.in_channels, "encode input")
        if self.use_slicing and x.shape[0] > 1:
            h = torch.cat([self._encode(s) for s in x.split(1)])
        else:
            h = self._encode(x)
        posterior = DiagonalGaussianDistribution(h)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    # -- decode ----------------------------------------------------------------------

    def _pixels(self, z: torch.Tensor) -> torch.Tensor:
        """Untiled post_quant_conv + decoder."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).contiguous()

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and self._is_large_latent(z):
            return self._tiled_pixels(z, self.tiling_method)
        return self._pixels(z)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """Raw latents (B, latent, h, w) -> pixels (B, out, h*f, w*f), roughly in [-1, 1]."""
        self._check_input(z, self.config.latent_channels, "decode input (latent)")
        if self.use_slicing and z.shape[0] > 1:
            dec = torch.cat([self._decode(s) for s in z.split(1)])
        else:
            dec = self._decode(z)
        if not return_dict:
            return (dec,)
        return DecoderOutput(sample=dec)

    # -- tiled paths -----------------------------------------------------------------

    def _tiled_moments(self, x: torch.Tensor, method: str, callback: tiling.ProgressCallback = None) -> torch.Tensor:
        if method == "exact":
            from .exact_tiling import exact_tiled_encode

            return exact_tiled_encode(self, x, tile_size=self.tile_sample_min_size, callback=callback,
                                      **self.tiling_options)
        if method != "blend":
            raise ValueError(f"tiling method {method!r} is unknown; choose 'blend' or 'exact'")
        overlap_size = int(self.tile_sample_min_size * (1 - self.tile_overlap_factor))
        blend_extent = int(self.tile_latent_min_size * self.tile_overlap_factor)
        row_limit = self.tile_latent_min_size - blend_extent
        return tiling.blend_tiled(self._moments, x, self.tile_sample_min_size, overlap_size, blend_extent,
                                  row_limit, callback)

    def _tiled_pixels(self, z: torch.Tensor, method: str, callback: tiling.ProgressCallback = None) -> torch.Tensor:
        if method == "exact":
            from .exact_tiling import exact_tiled_decode

            return exact_tiled_decode(self, z, tile_size=self.tile_sample_min_size, callback=callback,
                                      **self.tiling_options)
        if method != "blend":
            raise ValueError(f"tiling method {method!r} is unknown; choose 'blend' or 'exact'")
        overlap_size = int(self.tile_latent_min_size * (1 - self.tile_overlap_factor))
        blend_extent = int(self.tile_sample_min_size * self.tile_overlap_factor)
        row_limit = self.tile_sample_min_size - blend_extent
        return tiling.blend_tiled(self._pixels, z, self.tile_latent_min_size, overlap_size, blend_extent,
                                  row_limit, callback)

    def tiled_encode(self, x: torch.Tensor, return_dict: bool = True, method: Optional[str] = None,
                     callback: tiling.ProgressCallback = None):
        """Encode tile by tile (see enable_tiling for the settings); returns the posterior like encode()."""
        self._check_input(x, self.config.in_channels, "encode input")
        moments = self._tiled_moments(x, method or self.tiling_method, callback)
        posterior = DiagonalGaussianDistribution(moments)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True, method: Optional[str] = None,
                     callback: tiling.ProgressCallback = None):
        """Decode tile by tile (see enable_tiling for the settings)."""
        self._check_input(z, self.config.latent_channels, "decode input (latent)")
        dec = self._tiled_pixels(z, method or self.tiling_method, callback)
        if not return_dict:
            return (dec,)
        return DecoderOutput(sample=dec)

    # -- forward ---------------------------------------------------------------------

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: Generator = None):
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        dec = self.decode(z).sample
        if not return_dict:
            return (dec,)
        return DecoderOutput(sample=dec)
