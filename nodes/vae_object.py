"""Our VAE object: a `comfy.sd.VAE` whose first_stage_model runs vae_core's AutoencoderKL.

It is not a second VAE implementation: the maths is vae_core's. The host's own constructor, run on an
empty state dict, gives the object every attribute a host VAE has, with the host's defaults; this
module then sets the few that describe our model, so the object flows through the host's VAE socket
into VAEEncode, VAEDecode, the tiled nodes, VAEEncodeForInpaint and VAESave, and so the host's memory
manager (ModelPatcher + load_models_gpu) moves and offloads its weights.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import weakref
from typing import Any, Dict, Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd

from ..vae_core import AutoencoderKL
from ..vae_core import convert, cpu_half, loading
from ..vae_core.latent_formats import describe_channels

logger = logging.getLogger(__name__)

# The dtypes a KL-VAE works in when the host chooses ("auto"): the host's own list for KL-VAEs.
WORKING_DTYPES = (torch.bfloat16, torch.float32)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class KLRunner(torch.nn.Module):
    """What comfy.sd.VAE calls `first_stage_model`: x (B, C, H, W) in [-1, 1] -> raw latents (the
    posterior mode, as the host encodes) and raw latents -> pixels in roughly [-1, 1]."""

    def __init__(self, core: AutoencoderKL):
        super().__init__()
        self.core = core

    def encode(self, x: torch.Tensor, **_kwargs) -> torch.Tensor:
        return self.core.encode(x).latent_dist.mode()

    def decode(self, z: torch.Tensor, **_vae_options) -> torch.Tensor:
        # vae_options are for the host's video/audio VAEs; a KL image VAE has none
        return self.core.decode(z).sample


def outside_inference_mode():
    """The host runs nodes under torch.inference_mode; weights created or moved there become
    inference tensors, which vae_core's cached kernels cannot key on (no version counter).
    Weights are therefore created and moved inside this context: ordinary tensors, no autograd."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


def latent_mismatch_message(got: int, expected: int, what: str = "latent", vae_family: Optional[str] = None) -> str:
    """The error for a latent of the wrong channel count; the VAE is described by the family its file
    names where its channel count would mislead (the demo VAE shares SD3's and FLUX.1's 16 channels)."""
    return (f"a {got}-channel {what} ({describe_channels(got)}) was given to a {expected}-channel VAE "
            f"({describe_channels(expected, vae_family)}); the latent and the VAE come from different model families. "
            f"Use the VAE that belongs to the model that made this latent.")


# Attributes the host's VAE methods read, for a host whose constructor did not set them (0.3.75 sets
# neither of the last four; the newest host, comfy/sd.py at 35ead008, sets them all). Each is the
# value that means "a plain 2D image VAE": no padding of missing channels, no tiling inside the
# model, no reformatting of encoded latents; audio_sample_rate is read by audio nodes only.
IMAGE_VAE_DEFAULTS: Dict[str, Any] = {
    "latent_dim": 2, "not_video": False, "size": None, "crop_input": True,
    "downscale_index_formula": None, "upscale_index_formula": None, "extra_1d_channel": None,
    "pad_channel_value": None, "handles_tiling": False, "format_encoded": None, "audio_sample_rate": 44100,
}


class _DropMessage(logging.Filter):
    """Drops the host's "No VAE weights detected" warning: we build the host VAE empty on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No VAE weights detected" not in record.getMessage()


def _take_host_defaults(vae: "AutoencoderKLVAE") -> None:
    """Run the host's own VAE constructor on an empty state dict: in every supported host (0.3.75,
    0.8.0 and the newest read, comfy/sd.py at 35ead008) it sets its defaults for every attribute and
    returns before building a network. Per-instance hooks it stores (process_input/process_output,
    memory_used_* as lambdas) are removed so this class's methods answer instead."""
    quiet = _DropMessage()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        comfy.sd.VAE.__init__(vae, sd={})
    except Exception as err:  # a host whose constructor refuses an empty dict: keep our own defaults
        logger.warning("comfy.sd.VAE(sd={}) raised %s: %s; the AutoencoderKL VAE uses its own defaults "
                       "for the host's VAE attributes", type(err).__name__, err)
    finally:
        root.removeFilter(quiet)
    ours = set()
    for cls in type(vae).__mro__:
        if cls is comfy.sd.VAE:
            break
        ours.update(k for k, v in vars(cls).items() if callable(v))
    for name in ours & set(vars(vae)):
        del vae.__dict__[name]
    for name, value in IMAGE_VAE_DEFAULTS.items():
        if not hasattr(vae, name):
            setattr(vae, name, value)


def patcher_for(core: AutoencoderKL, name: str, dtype: torch.dtype, device: Optional[torch.device] = None,
                **_kwargs) -> comfy.model_patcher.ModelPatcher:
    """A fresh ModelPatcher over a copy of `core`'s weights: what the newest host's
    `ModelPatcher.cached_patcher_init` factory must return when it clones a model for another device
    (deepclone_multigpu) or rebuilds a non-dynamic twin (clone(disable_dynamic=True), which passes
    disable_dynamic: ours is never dynamic)."""
    with outside_inference_mode():
        fresh = copy.deepcopy(core)
    return AutoencoderKLVAE(fresh, name=name, dtype=dtype, device=device).patcher


class AutoencoderKLVAE(comfy.sd.VAE):
    """A host VAE backed by vae_core.AutoencoderKL.

    Built by `comfy.sd.VAE.__init__(sd={})` (the host's defaults for every attribute, see
    _take_host_defaults), then our model's attributes. Host methods that are inherited unchanged:
    decode/encode (batching by free memory, OOM fallback to tiling), decode_tiled/encode_tiled,
    vae_encode_crop_pixels, spacial_/temporal_compression_*, model_size, throw_exception_if_invalid.
    """

    def __init__(self, core: AutoencoderKL, name: str = "", dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, card_extra: Optional[Dict[str, Any]] = None):
        _take_host_defaults(self)
        cfg = core.config
        f = int(cfg.downscale_factor)
        self.name = name
        self.downscale_ratio = f
        self.upscale_ratio = f
        self.latent_channels = int(cfg.latent_channels)
        self.latent_dim = 2
        self.output_channels = int(cfg.out_channels)
        self.input_channels = int(cfg.in_channels)
        self.working_dtypes = list(WORKING_DTYPES)
        # Our layers are plain torch modules, which the host cannot run partly offloaded
        # ("lowvram") or stream weight by weight (dynamic VRAM); a full load on every call keeps
        # host-driven calls safe, and the newest host gives such a VAE a plain ModelPatcher too.
        self.disable_offload = True
        self.handles_tiling = False  # the host's tilers tile us; first_stage_model has no decode_tiled
        self.format_encoded = None  # encode returns raw latents as they are
        self.size = None

        self.device = device if device is not None else mm.vae_device()
        offload_device = mm.vae_offload_device()
        self.vae_dtype = dtype if dtype is not None else mm.vae_dtype(self.device, self.working_dtypes)
        if torch.device(self.device).type == "cpu" and not cpu_half.NATIVE.get(self.vae_dtype, True):
            logger.info("%(d)s on this CPU: it has no native %(d)s convolutions, so they run as fp32 products of "
                        "the %(d)s values (fp32's speed, half its memory between layers)",
                        {"d": DTYPE_NAMES[self.vae_dtype]})
        with outside_inference_mode():
            core = core.eval().to(self.vae_dtype)
        self.core = core
        self.first_stage_model = KLRunner(core).eval()
        self.output_device = mm.intermediate_device()
        # The weights' bytes, counted without state_dict(): the core hands out NCHW copies of its
        # channels_last conv weights there (diffusers' contract), so the host's module_size() would
        # copy every weight (+300 MiB for an SD VAE, on each first load) just to count them.
        self.size = sum(t.numel() * t.element_size()
                        for t in self.first_stage_model.state_dict(keep_vars=True).values())
        self.patcher = comfy.model_patcher.ModelPatcher(self.first_stage_model, load_device=self.device,
                                                        offload_device=offload_device, size=self.size)
        if hasattr(self.patcher, "cached_patcher_init"):  # the newest host clones for other devices with it
            self.patcher.cached_patcher_init = (patcher_for, (core, name, self.vae_dtype, self.device))
        # The attention processors this object runs with; applied before every call because
        # copies made by with_attention() share the modules (and the weights).
        self.attn_processors = dict(core.attn_processors)
        self.attn_processor_name = "default"
        self.card_extra = dict(card_extra or {})
        self.model_size()

    # -- host hooks ----------------------------------------------------------------------

    def process_input(self, image: torch.Tensor, **_kwargs) -> torch.Tensor:
        """[0, 1] -> [-1, 1], a new tensor: the host passes views of a node's IMAGE input (cropped,
        moved), which other nodes still read, so this one hook must never write in place."""
        return image * 2.0 - 1.0

    def process_output(self, x: torch.Tensor, **_kwargs) -> torch.Tensor:
        """Roughly [-1, 1] -> [0, 1], clamped, IN PLACE, and returns x: the newest host calls it on
        slices of its output buffer and discards the result; older hosts use the result."""
        # an inference tensor (made by a host node) can only be written inside inference mode
        ctx = torch.inference_mode() if x.is_inference() and not torch.is_inference_mode_enabled() \
            else contextlib.nullcontext()
        with ctx:
            return x.add_(1.0).div_(2.0).clamp_(0.0, 1.0)

    def vae_output_dtype(self) -> torch.dtype:
        """The dtype of IMAGE/LATENT outputs: the host's intermediate_dtype() where it has one
        (fp16 with --fp16-intermediates), float32 otherwise, as older hosts' VAEs return."""
        fn = getattr(mm, "intermediate_dtype", None)
        return fn() if fn is not None else torch.float32

    def memory_used_encode(self, shape, dtype, **_kwargs) -> float:
        """Bytes to encode ONE image of pixel shape (B, C, H, W) (the host divides free memory by it to
        split a batch, as its own KL-VAE lambdas ignore B), from vae_core.memory."""
        return self._memory_used("encode", shape, dtype)

    def memory_used_decode(self, shape, dtype, **_kwargs) -> float:
        """Bytes to decode ONE latent of shape (B, C, h, w); see memory_used_encode."""
        return self._memory_used("decode", shape, dtype)

    def _memory_used(self, kind: str, shape, dtype) -> int:
        from ..vae_core.attention import score_rows
        from ..vae_core.memory import estimate_bytes

        rows = max((score_rows(p) for p in self.attn_processors.values()), default=0)
        return estimate_bytes(kind, (1,) + tuple(shape[1:]), dtype, self.core.config, rows)

    def get_sd(self) -> Dict[str, torch.Tensor]:
        """The weights in the LDM layout the host (and VAESave -> VAELoader) uses."""
        # contiguous: the core may keep conv weights channels_last, and safetensors saves only dense tensors
        return convert.diffusers_to_ldm({k: v.detach().contiguous() for k, v in self.core.state_dict().items()})

    def check_latent(self, samples: torch.Tensor) -> None:
        if samples.ndim != 4:
            raise ValueError(f"expected a latent of shape [B, C, H, W], got {list(samples.shape)}; "
                             "this VAE handles images, not video or audio latents")
        if samples.shape[1] != self.latent_channels:
            family = (getattr(self.core, "info", None) or {}).get("family")
            raise ValueError(latent_mismatch_message(samples.shape[1], self.latent_channels, vae_family=family))

    def use_own_attention(self) -> None:
        """Put this object's attention processors on the (possibly shared) modules."""
        if self.attn_processors:
            self.core.set_attn_processor(self.attn_processors)

    def decode(self, samples_in, *args, **kwargs):
        self.check_latent(samples_in)
        self._prepare(self.memory_used_decode(samples_in.shape, self.vae_dtype))
        return super().decode(samples_in, *args, **kwargs)

    def decode_tiled(self, samples, *args, **kwargs):
        self.check_latent(samples)
        self._prepare(self.memory_used_decode(samples.shape, self.vae_dtype))
        return super().decode_tiled(samples, *args, **kwargs)

    def encode(self, pixel_samples, *args, **kwargs):
        self._prepare(self.memory_used_encode(pixel_samples.movedim(-1, 1).shape, self.vae_dtype))
        return super().encode(pixel_samples[..., : self.input_channels], *args, **kwargs)

    def encode_tiled(self, pixel_samples, *args, **kwargs):
        self._prepare(self.memory_used_encode(pixel_samples.movedim(-1, 1).shape, self.vae_dtype))
        return super().encode_tiled(pixel_samples[..., : self.input_channels], *args, **kwargs)

    def _prepare(self, memory_required: float) -> None:
        """Before a host-driven call: load the weights our way (see outside_inference_mode), so the
        host's own load_models_gpu finds them in place, and set this object's attention."""
        self.load_to_device(memory_required)
        self.use_own_attention()

    # -- our additions ---------------------------------------------------------------------

    def load_to_device(self, memory_required: float = 0) -> None:
        """Bring the weights onto self.device through the host's memory manager (full load)."""
        with outside_inference_mode():
            mm.load_models_gpu([self.patcher], memory_required=memory_required, force_full_load=True)

    def with_attention(self, name: str, **kwargs) -> "AutoencoderKLVAE":
        """A new VAE sharing these weights (a clone of the ModelPatcher), running attention with
        the named processor; this object is unchanged."""
        proc = self.core._as_processor(name, **kwargs)  # raises ValueError naming the choices
        new = copy.copy(self)
        new.patcher = self.patcher.clone()
        new.attn_processors = {k: proc for k in self.attn_processors}
        new.attn_processor_name = name + (f" (slice_size={kwargs['slice_size']})" if "slice_size" in kwargs else "")
        new.card_extra = dict(self.card_extra)
        return new

    def card(self) -> Dict[str, Any]:
        """A JSON-able summary for the UI (the web extension reads it from the loader's ui output)."""
        cfg = self.core.config
        info = getattr(self.core, "info", None) or {}
        card = {
            "name": self.name,
            "family": info.get("family"),
            "family_reason": info.get("family_reason"),
            "description": info.get("description"),  # what the file says it is (vae_core.description)
            "latent_channels": int(cfg.latent_channels),
            "scaling_factor": float(cfg.scaling_factor),
            "shift_factor": None if cfg.shift_factor is None else float(cfg.shift_factor),
            "downscale_factor": int(cfg.downscale_factor),
            "block_out_channels": [int(c) for c in cfg.block_out_channels],
            "dtype": DTYPE_NAMES.get(self.vae_dtype, str(self.vae_dtype)),
            "device": str(self.device),
            "parameters": int(sum(p.numel() for p in self.core.parameters())),
            "format": info.get("container"),
            "layout": info.get("layout"),
            "attention": self.attn_processor_name,
        }
        card.update(self.card_extra)
        return card


def build(core: AutoencoderKL, name: str, dtype: str = "auto", card_extra=None) -> AutoencoderKLVAE:
    """Wrap a freshly loaded core model. dtype: auto|fp32|fp16|bf16 ("auto": the host's choice
    for its VAE device, fp32 on the CPU)."""
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"dtype={dtype!r} is not one of auto, fp32, fp16, bf16")
    return AutoencoderKLVAE(core, name=name, dtype=None if dtype == "auto" else DTYPES[dtype], card_extra=card_extra)


# Host VAEs (VAELoader, CheckpointLoaderSimple) converted once per object; weak keys so a VAE the
# host drops is not kept alive by us.
_FROM_HOST: "weakref.WeakKeyDictionary[Any, AutoencoderKLVAE]" = weakref.WeakKeyDictionary()


def as_akl(vae: Any) -> AutoencoderKLVAE:
    """Our VAE object for any VAE on the socket: ours as is, a host comfy.sd.VAE rebuilt (once)
    from its weights in its dtype and device."""
    if isinstance(vae, AutoencoderKLVAE):
        return vae
    if vae is None or not hasattr(vae, "get_sd"):
        raise TypeError(f"expected a VAE (from a VAE or checkpoint loader), got {type(vae).__name__}")
    cached = _FROM_HOST.get(vae)
    if cached is not None:
        return cached
    if hasattr(vae, "throw_exception_if_invalid"):
        vae.throw_exception_if_invalid()
    kind = type(getattr(vae, "first_stage_model", None)).__name__
    try:
        with outside_inference_mode():
            sd = {k: v.detach().to("cpu").clone() for k, v in vae.get_sd().items()}
            core = loading.from_state_dict(AutoencoderKL, sd, source=f"the connected VAE ({kind})")
    except loading.VAELoadError as err:
        raise ValueError(f"{err}. The AutoencoderKL nodes only run KL-VAEs (SD1/SDXL/SD3/FLUX style); "
                         f"for this VAE use the host's VAE Encode/Decode nodes.") from None
    core.info.setdefault("container", "host VAE")
    dtype = getattr(vae, "vae_dtype", None)
    wrapped = AutoencoderKLVAE(core, name=f"host VAE ({kind})", dtype=dtype, device=getattr(vae, "device", None))
    _FROM_HOST[vae] = wrapped
    return wrapped
