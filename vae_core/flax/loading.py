"""Files for FlaxAutoencoderKL: every format the torch core reads (through its loaders), plus
diffusers' Flax layout (config.json + diffusion_flax_model.msgpack), and writing both layouts.

torch is touched only here, only to read torch-format files; the params returned are jax arrays.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import loading as torch_loading
from ..config import AutoencoderKLConfig
from .convert import check_params, flatten, params_to_state_dict, state_dict_to_params

logger = logging.getLogger(__name__)

# diffusers' names (FLAX_WEIGHTS_NAME in diffusers <= 0.39, CONFIG_NAME, the torch weights).
FLAX_WEIGHTS_NAME = "diffusion_flax_model.msgpack"
CONFIG_NAME = torch_loading.CONFIG_NAME
TORCH_WEIGHTS_NAME = torch_loading.WEIGHTS_NAME
# The last diffusers release with FlaxAutoencoderKL: what a Flax config.json claims to be written for.
FLAX_DIFFUSERS_VERSION = "0.39.0"


def expected_shapes(model) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
    """The params' leaf shapes for this model's config, without computing anything (jax.eval_shape)."""
    tree = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def _to_jax(params: Dict[str, Any]) -> Dict[str, Any]:
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=jnp.float32), params)


def from_torch(cls, vae, dtype: Any = jnp.float32):
    """(model, params) from a torch AutoencoderKL (vae_core's or diffusers'); params are float32."""
    config = vae.config if isinstance(vae.config, AutoencoderKLConfig) else AutoencoderKLConfig.from_dict(
        dict(vae.config), source=type(vae).__name__)
    model = cls.from_config(config, dtype=dtype)
    # float32 on the CPU first: numpy has no bfloat16, and fp16 -> fp32 is exact
    sd = {k: v.detach().float().cpu().numpy() for k, v in vae.state_dict().items()}
    params = state_dict_to_params(sd)
    try:
        check_params(params, expected_shapes(model), f"{type(vae).__name__} state dict")
    except ValueError as err:
        raise torch_loading.VAELoadError(str(err)) from None
    return model, _to_jax(params)


def load_single_file(cls, path, config=None, family: Optional[str] = None, dtype: Any = jnp.float32, **kwargs):
    """Any single file the torch core's from_single_file reads (LDM or diffusers keys, standalone or a
    full checkpoint, safetensors or weights-only pickles) -> (model, params)."""
    from ..model import AutoencoderKL

    vae = torch_loading.load_single_file(AutoencoderKL, path, config=config, family=family, **kwargs)
    return from_torch(cls, vae, dtype=dtype)


def _read_flax_config(path: Path) -> AutoencoderKLConfig:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise torch_loading.VAELoadError(f"{path}: cannot read the config: {err}") from err
    if not isinstance(data, dict):
        raise torch_loading.VAELoadError(f"{path}: expected a JSON object of AutoencoderKL settings, "
                                         f"found {type(data).__name__}")
    name = data.get("_class_name")
    if name not in (None, "AutoencoderKL", "FlaxAutoencoderKL"):
        raise torch_loading.VAELoadError(f"{path}: _class_name is {name!r}, expected 'FlaxAutoencoderKL' "
                                         "or 'AutoencoderKL'")
    data = {k: v for k, v in data.items() if k not in ("_class_name", "dtype")}
    try:
        return AutoencoderKLConfig.from_dict(data, source=str(path))
    except (ValueError, TypeError) as err:
        raise torch_loading.VAELoadError(f"{path}: {err}") from None


def load_pretrained(cls, path, subfolder: Optional[str] = None, dtype: Any = jnp.float32,
                    variant: Optional[str] = None, family: Optional[str] = None, **kwargs):
    """(model, params) from a diffusers folder (or a pipeline folder's vae/): Flax weights when the
    folder has them, else the torch weights through the torch core's from_pretrained."""
    folder = torch_loading.find_pretrained_folder(path, subfolder)
    flax_file = folder / FLAX_WEIGHTS_NAME
    if not flax_file.is_file():
        from ..model import AutoencoderKL

        vae = torch_loading.load_pretrained(AutoencoderKL, folder, variant=variant, family=family, **kwargs)
        return from_torch(cls, vae, dtype=dtype)
    from flax import serialization

    cfg = _read_flax_config(folder / CONFIG_NAME)
    if family is not None:
        from ..latent_formats import get_family

        fam = get_family(family)
        cfg = AutoencoderKLConfig(**{**cfg.to_dict(), "scaling_factor": fam.scaling_factor,
                                     "shift_factor": fam.shift_factor})
    model = cls.from_config(cfg, dtype=dtype)
    try:
        raw = serialization.msgpack_restore(flax_file.read_bytes())
    except (ValueError, TypeError, OSError) as err:
        raise torch_loading.VAELoadError(f"{flax_file}: not a readable Flax msgpack file: {err}") from err
    if not isinstance(raw, dict):
        raise torch_loading.VAELoadError(f"{flax_file}: expected a params dict, found {type(raw).__name__}")
    try:
        check_params(raw, expected_shapes(model), str(flax_file))
    except ValueError as err:
        raise torch_loading.VAELoadError(str(err)) from None
    broken = [("/".join(k)) for k, v in flatten(raw).items() if not np.isfinite(np.asarray(v, np.float32)).all()]
    if broken:
        raise torch_loading.VAELoadError(f"{flax_file}: the weights hold NaN or inf values in {broken[0]!r}; "
                                         "the file is corrupt: re-download or re-export it")
    return model, _to_jax(raw)


def save_pretrained(model, folder, params, format: str = "flax") -> None:
    """format="flax": config.json (_class_name FlaxAutoencoderKL) + diffusion_flax_model.msgpack, the
    layout diffusers <= 0.39 reads with FlaxAutoencoderKL.from_pretrained. format="safetensors":
    config.json + diffusion_pytorch_model.safetensors, the torch layout (vae_core, diffusers, the nodes)."""
    if format not in ("flax", "safetensors"):
        raise ValueError(f"save_pretrained format {format!r} is unknown; choose 'flax' or 'safetensors'")
    cfg = model.config
    check_params(params, expected_shapes(model), "save_pretrained params")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if format == "safetensors":
        from safetensors.numpy import save_file

        (out / CONFIG_NAME).write_text(cfg.to_json() + "\n")
        sd = params_to_state_dict(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params))
        save_file(sd, str(out / f"{TORCH_WEIGHTS_NAME}.safetensors"), metadata={"format": "pt"})
        return
    from flax import serialization

    from .. import __version__

    payload = {"_class_name": "FlaxAutoencoderKL", "_diffusers_version": FLAX_DIFFUSERS_VERSION,
               "_vae_core_version": __version__}
    payload.update(cfg.to_dict())
    (out / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    host = jax.tree_util.tree_map(np.asarray, params)
    (out / FLAX_WEIGHTS_NAME).write_bytes(serialization.to_bytes(host))
