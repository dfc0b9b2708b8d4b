"""State-dict layouts: LDM/CompVis <-> diffusers key conversion (table-driven) and config inference from shapes.

Pure functions on dicts of tensors; reading and writing files is `loading.py`'s job.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Dict, List, Optional, Tuple

import torch

from .config import AutoencoderKLConfig

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]

# -- key tables --------------------------------------------------------------------------
# One table serves both directions. Each row pairs an LDM key with its diffusers key; a {field}
# stands for a key segment whose spelling in each layout is given by _FIELDS.

_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP_PARTS = {"conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
# Very old diffusers checkpoints named the attention projections differently.
_OLD_DIFFUSERS_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

_ROWS = [
    ("{side}.{top}.{p}", "{side}.{top}.{p}"),
    ("encoder.down.{n}.block.{n2}.{res}.{p}", "encoder.down_blocks.{n}.resnets.{n2}.{res}.{p}"),
    ("encoder.down.{n}.downsample.conv.{p}", "encoder.down_blocks.{n}.downsamplers.0.conv.{p}"),
    ("decoder.up.{up}.block.{n2}.{res}.{p}", "decoder.up_blocks.{up}.resnets.{n2}.{res}.{p}"),
    ("decoder.up.{up}.upsample.conv.{p}", "decoder.up_blocks.{up}.upsamplers.0.conv.{p}"),
    ("{side}.mid.block_{mid}.{res}.{p}", "{side}.mid_block.resnets.{mid}.{res}.{p}"),
    ("{side}.mid.attn_1.{attn}.{p}", "{side}.mid_block.attentions.0.{attn}.{p}"),
    ("{quant}.{p}", "{quant}.{p}"),
]


def _names(pairs: Dict[str, str]) -> Tuple[Dict[str, str], Dict[str, str]]:
    return dict(pairs), {v: k for k, v in pairs.items()}


_SAME = None  # a field spelt alike in both layouts
# field -> (segment regex in LDM, in diffusers, LDM->diffusers, diffusers->LDM); None maps unchanged.
# "up" is the decoder level, counted from the top in LDM and from the bottom in diffusers; the
# mapping needs the number of levels, so it is a function of it.
_FIELDS = {
    "side": (r"encoder|decoder", r"encoder|decoder", _SAME, _SAME),
    "p": (r"weight|bias", r"weight|bias", _SAME, _SAME),
    "n": (r"\d+", r"\d+", _SAME, _SAME),
    "n2": (r"\d+", r"\d+", _SAME, _SAME),
    "quant": (r"quant_conv|post_quant_conv", r"quant_conv|post_quant_conv", _SAME, _SAME),
    "top": ("|".join(_TOP_PARTS), "|".join(_TOP_PARTS.values()), *_names(_TOP_PARTS)),
    "res": ("|".join(_RESNET_PARTS), "|".join(_RESNET_PARTS.values()), *_names(_RESNET_PARTS)),
    "attn": ("|".join(_ATTN_PARTS), r"group_norm|to_q|to_k|to_v|to_out\.0", *_names(_ATTN_PARTS)),
    "mid": (r"[12]", r"[01]", {"1": "0", "2": "1"}, {"0": "1", "1": "2"}),
    "up": (r"\d+", r"\d+", "reverse", "reverse"),
}


def _compile(template: str, side: int) -> "re.Pattern[str]":
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    rx = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_FIELDS[p][side]})" for i, p in enumerate(parts))
    return re.compile(f"^{rx}$")


# (pattern to match, template to fill) per direction: 0 = LDM -> diffusers, 1 = diffusers -> LDM
_DIRECTIONS = tuple([(_compile(row[d], d), row[1 - d]) for row in _ROWS] for d in (0, 1))

# Prefixes under which full checkpoints store the VAE.
CHECKPOINT_PREFIXES = ("first_stage_model.", "vae.", "model.first_stage_model.")


def _num_up_levels(keys, pattern: str) -> int:
    levels = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(levels) + 1 if levels else 0


def is_ldm_layout(sd: StateDict) -> bool:
    return any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid.")) for k in sd)


def is_diffusers_layout(sd: StateDict) -> bool:
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for k in sd)


def _rename_key(key: str, direction: int, levels: int) -> Optional[Tuple[str, Optional[str]]]:
    """(new key, attention part or None) for `key`, or None when no row matches."""
    for pattern, template in _DIRECTIONS[direction]:
        m = pattern.match(key)
        if not m:
            continue
        values = {}
        for field, seg in m.groupdict().items():
            mapping = _FIELDS[field][2 + direction]
            values[field] = (seg if mapping is _SAME else str(levels - 1 - int(seg)) if mapping == "reverse"
                             else mapping[seg])
        return template.format(**values), values.get("attn")
    return None


def _convert(sd: StateDict, direction: int, levels: int) -> StateDict:
    out: StateDict = {}
    unknown: List[str] = []
    for key, value in sd.items():
        renamed = _rename_key(key, direction, levels)
        if renamed is None:
            unknown.append(key)
            continue
        new, attn = renamed
        if attn is not None and attn not in ("norm", "group_norm") and new.endswith(".weight"):
            # LDM stores the attention projections as 1x1 convs (C, C, 1, 1), diffusers as linears (C, C)
            if direction == 0 and value.ndim == 4:
                value = value[:, :, 0, 0]
            elif direction == 1 and value.ndim == 2:
                value = value[:, :, None, None]
        out[new] = value
    if unknown:
        raise ValueError(f"unrecognised {('LDM', 'diffusers')[direction]} VAE keys: {_first(unknown)}")
    return out


def ldm_to_diffusers(sd: StateDict) -> StateDict:
    """Rename LDM keys to diffusers keys; 1x1-conv attention weights become linear weights.

    Raises ValueError naming the first keys it does not recognise.
    """
    return _convert(sd, 0, _num_up_levels(sd, r"^decoder\.up\.(\d+)\."))


def diffusers_to_ldm(sd: StateDict) -> StateDict:
    """Rename diffusers keys to LDM keys; attention linear weights become (C, C, 1, 1) convs as LDM stores them."""
    sd = upgrade_old_diffusers_keys(sd)
    return _convert(sd, 1, _num_up_levels(sd, r"^decoder\.up_blocks\.(\d+)\."))


def upgrade_old_diffusers_keys(sd: StateDict) -> StateDict:
    """Map pre-0.14 diffusers attention names (query/key/value/proj_attn) to today's."""
    out: StateDict = {}
    for key, value in sd.items():
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(query|key|value|proj_attn)\.(weight|bias)$", key)
        if m:
            key = f"{m.group(1)}.mid_block.attentions.0.{_OLD_DIFFUSERS_ATTN[m.group(2)]}.{m.group(3)}"
            if value.ndim == 4:
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def _first(keys: List[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def fit_problems(expected: Dict[str, tuple], got: Dict[str, tuple], noun: str = "keys") -> List[str]:
    """What keeps weights `got` (name -> shape) from fitting a model's `expected` (name -> shape): the
    first missing and unexpected names and wrong shapes, as message parts; empty when they fit. Shared by
    the torch loader and the Flax twin's params check."""
    label = f" {noun}" if noun else ""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [f"{k} {got[k]} (expected {expected[k]})" for k in expected if k in got and got[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing{label}: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected{label}: {_first(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_first(wrong, 3)}")
    return problems


# -- extracting the VAE from whatever the file holds ---------------------------------------


def strip_vae_prefix(sd: StateDict) -> Tuple[StateDict, Optional[str]]:
    """Return the VAE part of a state dict and the prefix it was under (None for a standalone VAE)."""
    for prefix in CHECKPOINT_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if any(k.startswith(("encoder.", "decoder.")) for k in sub):
            return sub, prefix
    return sd, None


def to_diffusers_layout(sd: StateDict) -> Tuple[StateDict, str]:
    """Bring a VAE state dict (LDM or diffusers keys, no prefix) to diffusers keys; also says which it was."""
    if is_ldm_layout(sd):
        return ldm_to_diffusers(sd), "ldm"
    if is_diffusers_layout(sd):
        return upgrade_old_diffusers_keys(sd), "diffusers"
    raise ValueError(f"no VAE weights found: expected keys like 'encoder.down.0.block.0.conv1.weight' (LDM) or "
                     f"'encoder.down_blocks.0.resnets.0.conv1.weight' (diffusers); first keys: {_first(sorted(sd))}")


# -- what else real VAE files carry ------------------------------------------------------------
# Groups of keys that published VAE files hold beside the weights, found by name and dropped by
# `drop_training_leftovers`; anything else unknown stays an error. Each row: (key prefix or exact
# key, what it is). Seen in: stabilityai/sd-vae-ft-mse-original (model_ema.decay/num_updates, also in
# its .safetensors conversion), CompVis/latent-diffusion kl-f4/kl-f8 model.ckpt (loss.*: LPIPS and
# discriminator with int64 num_batches_tracked buffers), A1111-style .vae.pt files (both).
TRAINING_LEFTOVERS = (
    ("model_ema.", "EMA bookkeeping (model_ema.*)"),
    ("loss.", "training loss networks (loss.*: LPIPS, discriminator)"),
    ("global_step", "training counters (global_step, epoch)"),
    ("epoch", "training counters (global_step, epoch)"),
)


def drop_training_leftovers(sd: StateDict) -> Tuple[StateDict, Dict[str, int]]:
    """The state dict without the TRAINING_LEFTOVERS groups, and how many keys of each group went."""
    kept: StateDict = {}
    dropped: Dict[str, int] = {}
    for key, value in sd.items():
        group = next((what for name, what in TRAINING_LEFTOVERS
                      if key == name or (name.endswith(".") and key.startswith(name))), None)
        if group is None:
            kept[key] = value
        else:
            dropped[group] = dropped.get(group, 0) + 1
    return kept, dropped


FLOAT8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                      if hasattr(torch, n))
# ComfyUI's scaled-fp8 files (comfy/ops.py scaled_fp8_ops, comfy/model_detection.py): a `scaled_fp8`
# marker tensor whose dtype names the format, a per-layer `<layer>.scale_weight` (the weight is
# stored divided by it) and `<layer>.scale_input` (for fp8 matmuls only). Its newer per-layer
# quantisation (comfy/ops.py MixedPrecisionOps) stores `<layer>.weight_scale` / `<layer>.input_scale`.
_WEIGHT_SCALES = (".scale_weight", ".weight_scale")
_INPUT_SCALES = (".scale_input", ".input_scale")
_FP8_MARKER = "scaled_fp8"


def dequantize_float8(sd: StateDict) -> Tuple[StateDict, int]:
    """float8 weights upcast to float32 and every weight with a ComfyUI scale beside it multiplied by it
    (in float32); the scale tensors and the marker are consumed. Returns (state dict, float8 tensors upcast).

    Raises ValueError for a scale that is not one number (block-wise formats are not supported) or a
    scale without its weight."""
    out: StateDict = {}
    scales: Dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == _FP8_MARKER or key.endswith(_INPUT_SCALES):
            continue
        suffix = next((s for s in _WEIGHT_SCALES if key.endswith(s)), None)
        if suffix is not None:
            scales[key[: -len(suffix)] + ".weight"] = value
            continue
        out[key] = value
    upcast = 0
    for key, value in out.items():
        scale = scales.pop(key, None)
        if value.dtype in FLOAT8_DTYPES:
            value = value.to(torch.float32)
            upcast += 1
        if scale is not None:  # ComfyUI computes with weight * scale for every layer that has one
            if scale.numel() != 1:
                raise ValueError(f"{key}: its scale has shape {tuple(scale.shape)}; only one scale per tensor "
                                 "(ComfyUI's scaled fp8) is supported: convert the file to fp16/fp32")
            value = value.to(torch.float32) * scale.to(torch.float32).reshape(())
        out[key] = value
    if scales:
        raise ValueError(f"weight scales without their weight: {_first(sorted(scales))} (a scale must sit beside "
                         "the weight it belongs to)")
    return out, upcast


# -- config inference -------------------------------------------------------------------------


def _shape(sd: StateDict, key: str) -> Tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"missing key {key!r}, needed to infer the VAE architecture")
    return tuple(sd[key].shape)


def infer_config(sd: StateDict, **overrides) -> AutoencoderKLConfig:
    """Read the architecture off a diffusers-layout state dict's tensor shapes.

    norm_num_groups and act_fn leave no trace in shapes: groups is 32 when every width allows it
    (all published SD-family VAEs), otherwise the largest divisor of all widths up to 32; act_fn is silu.
    """
    levels = _num_up_levels(sd, r"^encoder\.down_blocks\.(\d+)\.")
    if levels == 0:
        raise ValueError("no encoder.down_blocks.* keys: cannot infer the number of levels")
    widths = tuple(_shape(sd, f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels))
    layers = len({m.group(1) for k in sd if (m := re.match(r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})
    in_ch = _shape(sd, "encoder.conv_in.weight")[1]
    out_ch = _shape(sd, "decoder.conv_out.weight")[0]
    latent = _shape(sd, "decoder.conv_in.weight")[1]
    enc_out = _shape(sd, "encoder.conv_out.weight")[0]
    if enc_out != 2 * latent:
        raise ValueError(
            f"encoder.conv_out has {enc_out} output channels but the decoder takes {latent}: a KL-VAE's "
            f"encoder outputs mean and log-variance, 2 x {latent} = {2 * latent}"
        )
    g = 0
    for w in widths:
        g = math.gcd(g, w)
    groups = 32 if g % 32 == 0 else max(d for d in range(1, 33) if g % d == 0)
    data = dict(
        in_channels=in_ch,
        out_channels=out_ch,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=widths,
        layers_per_block=layers,
        latent_channels=latent,
        norm_num_groups=groups,
        use_quant_conv="quant_conv.weight" in sd,
        use_post_quant_conv="post_quant_conv.weight" in sd,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in sd,
    )
    data.update(overrides)
    return AutoencoderKLConfig(**data)


# -- family recognition -------------------------------------------------------------------------


# Substrings of `modelspec.architecture` (Stability's model spec; ComfyUI writes e.g.
# "stable-diffusion-xl-v1-base", "stable-diffusion-v3-medium") -> family, first match wins.
MODELSPEC_FAMILIES = (
    ("playground", "playground-v2-5"),
    ("flux", "flux"),
    ("stable-diffusion-v3", "sd3"),  # -v3-medium, -v3.5-large, -v3.5-large-turbo, -v3.5-medium
    ("stable-diffusion-3", "sd3"),
    ("sd3", "sd3"),
    ("stable-diffusion-xl", "sdxl"),
    ("sdxl", "sdxl"),
    ("-xl", "sdxl"),
    ("stable-diffusion-v1", "sd1"),
    ("stable-diffusion-v2", "sd1"),
)
# Top-level keys of Playground v2.5 checkpoints (its EDM latent statistics): diffusers'
# single_file_utils keys "playground-v2-5" on edm_mean, ComfyUI's supported_models.SDXL on both.
PLAYGROUND_KEYS = ("edm_mean", "edm_std")


def detect_family(cfg: AutoencoderKLConfig, full_checkpoint: Optional[StateDict] = None,
                  metadata: Optional[Dict[str, str]] = None) -> Tuple[Optional[str], str]:
    """Guess the model family; returns (family or None, how it was decided).

    Order: our own metadata ("vae_core.family"), Playground's edm_mean/edm_std keys, modelspec
    metadata, the other weights of a full checkpoint (UNet/MMDiT/FLUX key names), then shapes alone.
    Shapes cannot tell SD1 from SDXL or SD3 from FLUX: then the older family of the pair is assumed
    and the reason says so.
    """
    meta = metadata or {}
    if meta.get("vae_core.family"):
        return meta["vae_core.family"], "file metadata (vae_core.family)"
    if full_checkpoint is not None and all(k in full_checkpoint for k in PLAYGROUND_KEYS) \
            and cfg.latent_channels == 4:
        return "playground-v2-5", "Playground v2.5's edm_mean/edm_std beside the weights"
    arch = (meta.get("modelspec.architecture") or "").lower()
    if arch:
        for needle, fam in MODELSPEC_FAMILIES:
            if needle in arch:
                return fam, f"file metadata (modelspec.architecture={arch!r})"
    shape_ok = (tuple(cfg.block_out_channels) == (128, 256, 512, 512) and cfg.in_channels == 3)
    if full_checkpoint is not None:
        keys = full_checkpoint.keys()
        if any(".double_blocks." in k for k in keys):
            return "flux", "FLUX transformer weights in the same checkpoint"
        if any(".joint_blocks." in k for k in keys):
            return "sd3", "SD3 MMDiT weights in the same checkpoint"
        if any(k.startswith("conditioner.embedders.1.") or ".label_emb." in k for k in keys):
            return "sdxl", "SDXL UNet/conditioner weights in the same checkpoint"
        if any(k.startswith("model.diffusion_model.") for k in keys) and cfg.latent_channels == 4:
            return "sd1", "SD1.x/2.x UNet weights in the same checkpoint"
    if not shape_ok:
        return None, "shapes match no published family"
    if cfg.latent_channels == 16 and not cfg.use_quant_conv:
        return "flux", "16 latent channels without quant convs: SD3 and FLUX.1 share this shape; assumed FLUX.1 (pass family='sd3' otherwise)"
    if cfg.latent_channels == 4 and cfg.use_quant_conv:
        return "sd1", "4 latent channels with quant convs: SD1.x/2.x and SDXL share this shape; assumed SD1.x (pass family='sdxl' otherwise)"
    return None, "shapes match no published family"
