"""Weight layouts: diffusers' torch state dict <-> the Flax params pytree of FlaxAutoencoderKL (table-driven).

Pure numpy on dicts of arrays: no torch, no jax. Reading files is the torch core's `loading.py`.
The Flax names are those diffusers 0.39's FlaxAutoencoderKL used, so params move between the two.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np

# Torch modules kept in a ModuleList are numbered with a dot; Linen names a list's items `<name>_<i>`.
_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers")
# The attention projections: diffusers' torch names -> Flax names.
_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn", "group_norm": "group_norm"}
_ATTN_BACK = {v: k for k, v in _ATTN.items()}
_LIST_RX = re.compile(r"(^|\.)(" + "|".join(_LISTS) + r")\.(\d+)(?=\.)")
_ATTN_RX = re.compile(r"\.attentions_0\.(to_q|to_k|to_v|to_out\.0|group_norm)\.")


def _is_norm(path: str) -> bool:
    """GroupNorm modules: norm1/norm2 in resnets, conv_norm_out, the attention's group_norm."""
    return bool(re.search(r"(^|\.)(norm1|norm2|conv_norm_out|group_norm)$", path))


def _module_to_flax(path: str) -> str:
    """'encoder.down_blocks.0.resnets.1.conv1' -> 'encoder.down_blocks_0.resnets_1.conv1'."""
    path = _LIST_RX.sub(lambda m: f"{m.group(1)}{m.group(2)}_{m.group(3)}", path)
    return _ATTN_RX.sub(lambda m: f".attentions_0.{_ATTN[m.group(1)]}.", path + ".")[:-1]


def _module_to_torch(path: str) -> str:
    path = re.sub(r"(^|\.)(" + "|".join(_LISTS) + r")_(\d+)(?=\.|$)", r"\1\2.\3", path)
    return re.sub(r"\.attentions\.0\.(query|key|value|proj_attn|group_norm)(?=\.|$)",
                  lambda m: f".attentions.0.{_ATTN_BACK[m.group(1)]}", path)


def state_dict_to_params(sd: Mapping[str, Any]) -> Dict[str, Any]:
    """A diffusers-layout torch state dict (numpy arrays, float) -> the nested Flax params dict.

    conv (O, I, kh, kw) -> kernel (kh, kw, I, O); linear (O, I) -> kernel (I, O);
    GroupNorm weight -> scale. Raises ValueError naming the first key it cannot place.
    """
    params: Dict[str, Any] = {}
    for key, value in sd.items():
        module, _, kind = key.rpartition(".")
        if kind not in ("weight", "bias") or not module:
            raise ValueError(f"state dict key {key!r} is not a weight or bias of a VAE module")
        arr = np.asarray(value)
        if kind == "bias":
            leaf, arr = "bias", arr
        elif _is_norm(module):
            leaf = "scale"
        elif arr.ndim == 4:
            leaf, arr = "kernel", arr.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
        elif arr.ndim == 2:
            leaf, arr = "kernel", arr.T  # (O, I) -> (I, O)
        else:
            raise ValueError(f"state dict key {key!r} has shape {arr.shape}: expected a conv (4-d), "
                             "linear (2-d) or GroupNorm (1-d) weight")
        node = params
        for part in _module_to_flax(module).split("."):
            node = node.setdefault(part, {})
        node[leaf] = np.ascontiguousarray(arr)
    return params


def flatten(params: Mapping[str, Any], prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
    """Nested params dict -> {('encoder', 'conv_in', 'kernel'): array, ...}."""
    out: Dict[Tuple[str, ...], Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def params_to_state_dict(params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """The Flax params pytree -> a diffusers-layout state dict of numpy arrays (the inverse of the above)."""
    sd: Dict[str, np.ndarray] = {}
    for path, value in flatten(params).items():
        *module, leaf = path
        name = _module_to_torch(".".join(module))
        arr = np.asarray(value)
        if leaf == "kernel" and arr.ndim == 4:
            arr = arr.transpose(3, 2, 0, 1)  # (kh, kw, I, O) -> (O, I, kh, kw)
        elif leaf == "kernel" and arr.ndim == 2:
            arr = arr.T
        elif leaf not in ("kernel", "scale", "bias"):
            raise ValueError(f"params leaf {'/'.join(path)!r} is not a kernel, scale or bias")
        sd[f"{name}.{'bias' if leaf == 'bias' else 'weight'}"] = np.ascontiguousarray(arr)
    return sd


def check_params(params: Mapping[str, Any], expected: Mapping[Tuple[str, ...], Tuple[int, ...]], source: str) -> None:
    """Raise ValueError naming the first missing, unexpected or wrongly shaped leaves of `params`."""
    from ..convert import fit_problems  # the torch loader's check, on "/"-joined leaf names

    got = {"/".join(k): tuple(np.shape(v)) for k, v in flatten(params).items()}
    problems = fit_problems({"/".join(k): tuple(v) for k, v in expected.items()}, got, noun="")
    if problems:
        raise ValueError(f"{source}: params do not fit the VAE config ({'; '.join(problems)})")
