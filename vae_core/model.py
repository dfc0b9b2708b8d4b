"""Encoder, Decoder and AutoencoderKL: the KL-regularised autoencoder of Stable Diffusion, SDXL, SD3 and FLUX.1.

The public surface mirrors diffusers' `AutoencoderKL` (config, encode/decode outputs, slicing,
tiling, attention processors, state-dict names). File formats live in `loading.py`.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from . import tiling
from .attention import Attention, AttnProcessor, AttnProcessorBase, make_attn_processor
from .config import AutoencoderKLConfig
from .distribution import DiagonalGaussianDistribution, Generator
from .cpu_half import Conv2d
from .layers import (DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D, checkpointed, get_activation,
                     group_norm, no_hooks, norm_, run_owned)
from .outputs import AutoencoderKLOutput, DecoderOutput

__all__ = ["AutoencoderKL", "AutoencoderKLOutput", "Decoder", "DecoderOutput", "Encoder"]

logger = logging.getLogger(__name__)


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
        self.conv_in = Conv2d(cfg.in_channels, ch[0], kernel_size=3, padding=1)
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
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False  # set by AutoencoderKL.enable_gradient_checkpointing
        self._gradient_checkpointing_func: Optional[Callable] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = run_owned(self, self.down_blocks, [self.conv_in(_like_weights(x, self.conv_in))])
        h = checkpointed(self, self.mid_block, h)
        h = norm_(self.conv_norm_out, h) if no_hooks(self) else self.conv_norm_out(h)  # h is dead after it
        return self.conv_out(self.conv_act(h))


class Decoder(nn.Module):
    """z (B, latent, h, w) -> x (B, out, h*f, w*f), roughly in [-1, 1] (not clamped)."""

    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        ch = tuple(reversed(cfg.block_out_channels))
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], kernel_size=3, padding=1)
        # up_blocks registered before mid_block, as in diffusers, so parameters() come in its order
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(
                ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, cfg.norm_num_groups, cfg.act_fn,
                add_upsample=i < len(ch) - 1,
            )
            for i in range(len(ch))
        )
        self.mid_block = UNetMidBlock2D(ch[0], cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention)
        self.conv_norm_out = group_norm(ch[-1], cfg.norm_num_groups)
        self.conv_act = get_activation(cfg.act_fn)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False  # set by AutoencoderKL.enable_gradient_checkpointing
        self._gradient_checkpointing_func: Optional[Callable] = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(_like_weights(z, self.conv_in))
        h = checkpointed(self, self.mid_block, h)
        # diffusers runs the up blocks in their parameter dtype (they may differ when upcast)
        box = [h.to(self.up_blocks[0].resnets[0].norm1.weight.dtype)]  # their first parameter
        del h  # run_owned holds the only reference, so the blocks can free it early
        h = run_owned(self, self.up_blocks, box)
        h = norm_(self.conv_norm_out, h) if no_hooks(self) else self.conv_norm_out(h)  # h is dead after it
        return self.conv_out(self.conv_act(h))


# -- the model -----------------------------------------------------------------------

_CONFIG_KEYS = frozenset(AutoencoderKLConfig().keys())
_PRETRAINED_KWARGS = ("subfolder", "torch_dtype", "dtype", "variant", "family", "use_safetensors",
                      "low_cpu_mem_usage", "local_files_only", "output_loading_info", "<any config key>")
# diffusers options that a local, CPU-loading, accelerate-free core does not implement
_DIFFUSERS_ONLY = {
    "device_map": "load, then call .to(device)",
    "max_memory": "load, then call .to(device)",
    "offload_folder": "offloading is not implemented",
    "offload_state_dict": "offloading is not implemented",
    "quantization_config": "quantization is not implemented",
    "cache_dir": "vae_core reads local folders only; download the folder first",
    "revision": "vae_core reads local folders only; download that revision first",
    "token": "vae_core reads local folders only",
    "force_download": "vae_core reads local folders only",
    "proxies": "vae_core reads local folders only",
    "push_to_hub": "vae_core does not upload",
}


def _reject_unknown(where: str, kwargs: Dict[str, Any], accepted) -> None:
    """Raise TypeError naming every keyword that `where` does not take (never swallow them silently)."""
    if not kwargs:
        return
    names = sorted(kwargs)
    hints = "; ".join(f"{k}: {_DIFFUSERS_ONLY[k]}" for k in names if k in _DIFFUSERS_ONLY)
    raise TypeError(f"AutoencoderKL.{where}() got unexpected keyword argument(s) {names}"
                    + (f" ({hints})" if hints else "")
                    + (f"; it accepts {', '.join(accepted)}" if accepted else ""))


def _dtype_alias(torch_dtype: Optional[torch.dtype], kwargs: Dict[str, Any]) -> Optional[torch.dtype]:
    """diffusers accepts `dtype=` as an alias of `torch_dtype=`."""
    dtype = kwargs.pop("dtype", None)
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise TypeError(f"got torch_dtype={torch_dtype} and dtype={dtype}; pass one of them")
    torch_dtype = torch_dtype if torch_dtype is not None else dtype
    if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
        raise TypeError(f"torch_dtype must be a torch.dtype such as torch.float16, got {torch_dtype!r}")
    return torch_dtype


def _contiguous_state_dict(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata) -> None:
    """state_dict post-hook: channels_last weights are handed out NCHW-contiguous (a copy of those only)."""
    for key, value in state_dict.items():
        if (key.startswith(prefix) and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
                and not value.is_contiguous()):
            state_dict[key] = value.contiguous()


def _checkpoint(module: nn.Module, *args):
    """The default gradient_checkpointing_func (torch's non-reentrant checkpoint, as diffusers)."""
    import torch.utils.checkpoint

    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


class AutoencoderKL(nn.Module):
    """A KL-VAE with diffusers' `AutoencoderKL` API.

    `encode(x)` takes pixels (B, C, H, W) in [-1, 1] and returns `.latent_dist`, a
    DiagonalGaussianDistribution over raw (unscaled) latents; `decode(z)` returns `.sample`
    in roughly [-1, 1]. Diffusion models see `(z - shift_factor) * scaling_factor`.
    """

    # Class attributes diffusers' ModelMixin declares and its shared tests and pipelines read.
    config_name = "config.json"
    _supports_gradient_checkpointing = True
    _keep_in_fp32_modules = None  # no module must stay fp32: torch_dtype= applies to every weight
    _no_split_modules = ["BasicTransformerBlock", "ResnetBlock2D"]  # diffusers' value (accelerate hint)
    _supports_group_offloading = False  # diffusers' group offloading hooks are not implemented

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
        self.quant_conv = Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

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
        # ...but state_dict() hands out NCHW-contiguous tensors, as diffusers' does, so that
        # safetensors.save_file(vae.state_dict()) works (it refuses non-contiguous tensors).
        self.register_state_dict_post_hook(_contiguous_state_dict)

    def __getattr__(self, name: str) -> Any:
        """Submodules and parameters as nn.Module; then config keys, with diffusers' FutureWarning
        (`vae.scaling_factor` works but `vae.config.scaling_factor` is the spelling to use)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        config = self.__dict__.get("config")
        if config is not None and not name.startswith("__") and name in config:
            warnings.warn(f"Accessing config attribute `{name}` directly via '{type(self).__name__}' object is "
                          f"deprecated (as in diffusers); use `{type(self).__name__.lower()}.config.{name}`",
                          FutureWarning, stacklevel=2)
            return config[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    # -- construction helpers ------------------------------------------------------

    @classmethod
    def from_config(cls, config: Union[AutoencoderKLConfig, dict], **overrides) -> "AutoencoderKL":
        """Build an untrained model from a config (ours, diffusers' FrozenDict or a plain dict)."""
        if isinstance(config, AutoencoderKLConfig):
            data = config.to_dict()
        else:
            data = AutoencoderKLConfig.from_dict(dict(config)).to_dict()
        fields = set(AutoencoderKLConfig().keys())
        data = {k: v for k, v in data.items() if k in fields}  # registered extras are not arguments
        data.update(overrides)
        return cls(**data)

    @classmethod
    def load_config(cls, path, subfolder: Optional[str] = None, **kwargs) -> Dict[str, Any]:
        """The config.json of a diffusers folder (or a pipeline's vae/), as a dict, like diffusers'."""
        from .loading import CONFIG_NAME, find_pretrained_folder

        _reject_unknown("load_config", kwargs, ())
        p = Path(path)
        file = p if p.is_file() else find_pretrained_folder(p, subfolder) / CONFIG_NAME
        return json.loads(file.read_text())

    def save_config(self, folder, **kwargs) -> None:
        """Write config.json into `folder` (created if needed)."""
        from .loading import CONFIG_NAME

        _reject_unknown("save_config", kwargs, ())
        out = Path(folder)
        if out.is_file():
            raise ValueError(f"save_config: {out} is a file; give a folder to write {CONFIG_NAME} into")
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(self.config.to_json() + "\n")

    def register_to_config(self, **kwargs) -> None:
        """Add or change config keys, as diffusers' ConfigMixin does (extras are saved, not used)."""
        self.config.register(**kwargs)

    @classmethod
    def from_pretrained(cls, path, subfolder: Optional[str] = None, torch_dtype: Optional[torch.dtype] = None,
                        variant: Optional[str] = None, **kwargs):
        """Load a diffusers folder (config.json + weights, single or sharded safetensors, or .bin), or a
        pipeline folder with a `vae/` subfolder. Accepts diffusers' `dtype` (alias of `torch_dtype`),
        `use_safetensors`, `low_cpu_mem_usage` (always on), `output_loading_info`, `family`, and config
        overrides (`sample_size=64`); any other keyword raises TypeError."""
        from .loading import load_pretrained

        torch_dtype = _dtype_alias(torch_dtype, kwargs)
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_KEYS}
        family = kwargs.pop("family", None)
        use_safetensors = kwargs.pop("use_safetensors", None)
        output_loading_info = bool(kwargs.pop("output_loading_info", False))
        kwargs.pop("low_cpu_mem_usage", None)  # weights are always loaded into a meta-built skeleton
        kwargs.pop("local_files_only", None)  # always: vae_core never downloads
        _reject_unknown("from_pretrained", kwargs, _PRETRAINED_KWARGS)
        model = load_pretrained(cls, path, subfolder=subfolder, torch_dtype=torch_dtype, variant=variant,
                                family=family, config_overrides=overrides, use_safetensors=use_safetensors)
        if output_loading_info:  # loading is strict: anything missing or unexpected has raised already
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model

    @classmethod
    def from_single_file(cls, path, config: Optional[Union[dict, str]] = None, family: Optional[str] = None,
                         torch_dtype: Optional[torch.dtype] = None, **kwargs) -> "AutoencoderKL":
        """Load an LDM/CompVis-layout (or diffusers-layout) single file; the config is inferred from shapes.
        Accepts `dtype` (alias of `torch_dtype`) and `low_cpu_mem_usage`; any other keyword raises TypeError."""
        from .loading import load_single_file

        torch_dtype = _dtype_alias(torch_dtype, kwargs)
        kwargs.pop("low_cpu_mem_usage", None)
        _reject_unknown("from_single_file", kwargs, ("config", "family", "torch_dtype", "dtype", "low_cpu_mem_usage"))
        return load_single_file(cls, path, config=config, family=family, torch_dtype=torch_dtype)

    def save_pretrained(self, folder, safe_serialization: bool = True, variant: Optional[str] = None,
                        max_shard_size: Union[int, str, None] = None, **kwargs) -> None:
        """Write config.json and the weights in diffusers' layout; `max_shard_size` (bytes, or "10GB",
        "500MB", "64KiB", ...) splits safetensors weights into shards with an index file, as diffusers does.
        `is_main_process`/`push_to_hub` are diffusers' options: the first is honoured, the second refused."""
        from .loading import save_pretrained

        if not kwargs.pop("is_main_process", True):
            return
        _reject_unknown("save_pretrained", kwargs, ("safe_serialization", "variant", "max_shard_size",
                                                    "is_main_process"))
        save_pretrained(self, folder, safe_serialization=safe_serialization, variant=variant,
                        max_shard_size=max_shard_size)

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
        """The plain math processor, diffusers' choice here (a new model starts on SDPA, as in diffusers)."""
        self.set_attn_processor(AttnProcessor())

    def fuse_qkv_projections(self) -> None:
        """Fuse each attention block's query/key/value projections into one linear (diffusers' API; see
        Attention.fuse_projections). The processors stay as they are: all of ours read the fused form."""
        for module in self._attention_modules().values():
            module.fuse_projections(fuse=True)

    def unfuse_qkv_projections(self) -> None:
        """Back to separate to_q/to_k/to_v (the fused copies are dropped, so state_dict() has diffusers' keys)."""
        for module in self._attention_modules().values():
            module.fuse_projections(fuse=False)

    # -- gradient checkpointing ------------------------------------------------------

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Optional[Callable] = None) -> None:
        """Recompute the encoder/decoder blocks' activations in backward instead of storing them (less
        memory for training; no effect without autograd). The default is torch.utils.checkpoint, non-reentrant."""
        self._set_gradient_checkpointing(True, gradient_checkpointing_func or _checkpoint)

    def disable_gradient_checkpointing(self) -> None:
        self._set_gradient_checkpointing(False, None)

    def _set_gradient_checkpointing(self, enable: bool, func: Optional[Callable]) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = enable
                module._gradient_checkpointing_func = func

    # -- diffusers bridge --------------------------------------------------------------

    def to_diffusers(self):
        """A diffusers `AutoencoderKL` that shares this model's weights (needs diffusers installed);
        use it wherever diffusers wants its own class, e.g. StableDiffusionPipeline(vae=...)."""
        from .bridge import to_diffusers

        return to_diffusers(self)

    @classmethod
    def from_diffusers(cls, model) -> "AutoencoderKL":
        """The reverse of to_diffusers: ours, sharing the weights of a diffusers AutoencoderKL."""
        from .bridge import from_diffusers

        return from_diffusers(cls, model)

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
