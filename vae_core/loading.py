"""Reading and writing VAE weights: diffusers folders, LDM single files, full checkpoints.

The layout (LDM or diffusers) is read from the keys and the container (safetensors or a torch
pickle) from the first bytes, never from the file name. Pickles load only with weights_only=True.
Every failure is a `VAELoadError` (a ValueError) naming the file and what was wrong.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import convert
from .config import AutoencoderKLConfig
from .latent_formats import get_family

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

WEIGHTS_NAME = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"
META_CONFIG = "vae_core.config"
META_FAMILY = "vae_core.family"
META_DESCRIPTION = "vae_core.description"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class VAELoadError(ValueError):
    """A file that is not a loadable VAE; the message names the file and the problem."""


# -- containers ---------------------------------------------------------------------------


def sniff_container(path: PathLike) -> str:
    """'safetensors', 'zip-pickle' (torch.save since 1.6), 'pickle' (legacy), or raise VAELoadError."""
    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        raise VAELoadError(f"{p}: the file is empty (0 bytes); re-download or re-export it")
    with open(p, "rb") as f:
        head = f.read(16)
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and 0 < header_len < size:
            return "safetensors"
        if head[8:9] == b"{" and header_len >= size:
            raise VAELoadError(
                f"{p}: truncated safetensors file: its header claims {header_len} bytes but the file has {size}; "
                "the download or copy was cut short"
            )
    if head[:4] == b"PK\x03\x04":
        return "zip-pickle"
    if head[:1] == b"\x80":
        return "pickle"
    if head.lstrip()[:1] in (b"{", b"["):
        raise VAELoadError(f"{p}: this is a JSON/text file, not model weights (first bytes {head[:12]!r})")
    raise VAELoadError(f"{p}: unrecognised file format (first bytes {head[:12]!r}); expected .safetensors "
                       "or a torch checkpoint (.ckpt/.pt/.pth/.bin)")


def read_state_dict(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], str]:
    """Read all tensors of a weights file: (state dict, safetensors metadata, container kind)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise VAELoadError(f"{p}: is a folder; use AutoencoderKL.from_pretrained for diffusers folders")
    kind = sniff_container(p)
    if kind == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as err:
            raise VAELoadError(f"{p}: corrupt or truncated safetensors file: {err}") from err
        return sd, metadata, kind
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise VAELoadError(
            f"{p}: refused to load: this pickle holds more than tensors (it may run code when unpickled), "
            f"and only weights_only=True loading is allowed. Convert it to .safetensors with a tool you trust. "
            f"Detail: {str(err).splitlines()[0]}"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, AttributeError,
            IndexError, TypeError, OverflowError, AssertionError) as err:
        # a damaged pickle stream fails in many ways; torch's weights-only unpickler even asserts
        raise VAELoadError(f"{p}: corrupt or truncated checkpoint: {type(err).__name__}: {err}") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise VAELoadError(f"{p}: expected a dict of tensors, found a {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return sd, {}, kind


# -- building a model from a state dict -------------------------------------------------------


def _check_tensors(sd: Dict[str, torch.Tensor], source: str) -> None:
    bad = [k for k, v in sd.items() if v.dtype not in _FLOAT_DTYPES]
    if bad:
        raise VAELoadError(f"{source}: VAE weights must be floating point; {convert._first(bad)} "
                           f"{'is' if len(bad) == 1 else 'are'} {sd[bad[0]].dtype}")
    # A flipped exponent bit or a broken export leaves NaN/inf in a weight: every image would come out
    # black or broken, so refuse the file here, naming the tensor, rather than at the first decode.
    broken = [k for k, v in sd.items() if not bool(torch.isfinite(v).all())]
    if broken:
        raise VAELoadError(f"{source}: the weights hold NaN or inf values in {convert._first(broken)}; the file is "
                           "corrupt (or was saved from a broken model): re-download or re-export it")


def _load_strict(model, sd: Dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True), with a message that names the first offending keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in sd and sd[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {convert._first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {convert._first(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {convert._first(wrong, 3)}")
    if problems:
        raise VAELoadError(f"{source}: weights do not fit the VAE config ({'; '.join(problems)})")
    model.load_state_dict(sd, strict=True)


def _config_from_dict(data: Any, source: str, what: str) -> AutoencoderKLConfig:
    """AutoencoderKLConfig.from_dict, with every failure a VAELoadError that names the file."""
    if not isinstance(data, dict):
        raise VAELoadError(f"{source}: {what} must be a JSON object of AutoencoderKL settings, "
                           f"found {type(data).__name__}; re-export the file")
    try:
        return AutoencoderKLConfig.from_dict(data, source=f"{source} ({what})")
    except VAELoadError:
        raise
    except (ValueError, TypeError) as err:
        msg = str(err) if source in str(err) else f"{source} ({what}): {err}"
        raise VAELoadError(f"{msg}; the file's config is damaged: re-download or re-export it") from None


def _resolve_config(config: Any, source: str) -> Optional[AutoencoderKLConfig]:
    if config is None or isinstance(config, AutoencoderKLConfig):
        return config
    if isinstance(config, dict):
        return _config_from_dict(config, source, "config")
    p = Path(config)
    if p.is_dir():
        p = p / CONFIG_NAME
    return _read_config_file(p)


def _read_config_file(p: Path) -> AutoencoderKLConfig:
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VAELoadError(f"{p}: cannot read the config: {err}") from err
    return _config_from_dict(data, str(p), "config.json")


def from_state_dict(cls, sd: Dict[str, torch.Tensor], config: Any = None, family: Optional[str] = None,
                    torch_dtype: Optional[torch.dtype] = None, metadata: Optional[Dict[str, str]] = None,
                    source: str = "state dict"):
    """Build an AutoencoderKL from any VAE state dict: LDM or diffusers keys, standalone or
    inside a full checkpoint (first_stage_model. / vae. prefix)."""
    full = sd
    vae_sd, prefix = convert.strip_vae_prefix(sd)
    if not vae_sd:
        raise VAELoadError(f"{source}: the file holds no tensors")
    try:
        dsd, layout = convert.to_diffusers_layout(vae_sd)
    except ValueError as err:
        hint = _what_is_it(vae_sd)
        raise VAELoadError(f"{source}: {err}{hint}") from None
    _check_tensors(dsd, source)
    cfg = _resolve_config(config, source)
    cfg_origin = "given"
    if cfg is None and metadata and metadata.get(META_CONFIG):
        try:
            cfg = _config_from_dict(json.loads(metadata[META_CONFIG]), source, f"metadata {META_CONFIG}")
            cfg_origin = "metadata"
        except json.JSONDecodeError as err:
            raise VAELoadError(f"{source}: metadata {META_CONFIG} is not valid JSON: {err}") from err
    if cfg is None:
        try:
            cfg = convert.infer_config(dsd)
        except ValueError as err:
            raise VAELoadError(f"{source}: {err}") from None
        cfg_origin = "inferred from shapes"
    detected, reason = convert.detect_family(cfg, full if prefix else None, metadata)
    if family is not None:
        fam = get_family(family)
        detected, reason = fam.name, "given (family=)"
        cfg = AutoencoderKLConfig(**{**cfg.to_dict(), "scaling_factor": fam.scaling_factor,
                                     "shift_factor": fam.shift_factor})
    elif cfg_origin == "inferred from shapes" and detected is not None:
        fam = get_family(detected)
        cfg = AutoencoderKLConfig(**{**cfg.to_dict(), "scaling_factor": fam.scaling_factor,
                                     "shift_factor": fam.shift_factor, "sample_size": fam.sample_size})
    if detected is not None and cfg_origin == "inferred from shapes" and "assumed" in reason:
        logger.warning("%s: %s", source, reason)
    try:
        with torch.device("meta"):
            skeleton = cls.from_config(cfg)
    except (RuntimeError, ValueError, TypeError) as err:  # e.g. a damaged config with negative channels
        raise VAELoadError(f"{source}: the VAE config ({cfg_origin}) does not describe a buildable VAE: "
                           f"{str(err).splitlines()[0]}; re-export the file or pass config=") from None
    model = skeleton.to_empty(device="cpu")
    _load_strict(model, dsd, source)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    model.eval()
    model.info = {
        "family": detected,
        "family_reason": reason,
        "layout": layout,
        "prefix": prefix,
        "config_origin": cfg_origin,
        "source": source,
    }
    if metadata and metadata.get(META_DESCRIPTION):  # what the file says it is, for the model card
        model.info["description"] = str(metadata[META_DESCRIPTION])
    return model


def _what_is_it(sd: Dict[str, torch.Tensor]) -> str:
    keys = list(sd)
    if any("lora" in k.lower() for k in keys[:200]):
        return " (this looks like a LoRA, not a VAE)"
    if any(k.startswith(("model.diffusion_model.", "input_blocks.", "down_blocks.", "double_blocks.", "joint_blocks."))
           for k in keys):
        return " (this looks like a diffusion model / UNet, not a VAE)"
    if any(k.startswith(("text_model.", "transformer.resblocks.", "cond_stage_model.", "encoder.block.",
                         "text_encoders.", "shared.")) for k in keys):
        return " (this looks like a text encoder (CLIP/T5), not a VAE)"
    return ""


def load_single_file(cls, path: PathLike, config: Any = None, family: Optional[str] = None,
                     torch_dtype: Optional[torch.dtype] = None, **_ignored):
    sd, metadata, container = read_state_dict(path)
    model = from_state_dict(cls, sd, config=config, family=family, torch_dtype=torch_dtype, metadata=metadata,
                            source=str(path))
    model.info["container"] = container
    model.info["path"] = str(path)
    return model


# -- diffusers folders ------------------------------------------------------------------------


def find_pretrained_folder(path: PathLike, subfolder: Optional[str] = None) -> Path:
    """The folder holding config.json: `path`, `path/subfolder`, or a pipeline's `path/vae`."""
    p = Path(path)
    if subfolder:
        p = p / subfolder
    if (p / CONFIG_NAME).is_file():
        return p
    if not subfolder and (p / "vae" / CONFIG_NAME).is_file():
        return p / "vae"
    raise VAELoadError(f"{p}: no {CONFIG_NAME} here or in a vae/ subfolder; expected a diffusers "
                       "AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)")


def is_pretrained_folder(path: PathLike) -> bool:
    try:
        find_pretrained_folder(path)
        return True
    except VAELoadError:
        return False


def _weights_file(folder: Path, variant: Optional[str]) -> Path:
    names = []
    if variant:
        names += [f"{WEIGHTS_NAME}.{variant}.safetensors", f"{WEIGHTS_NAME}.{variant}.bin"]
    names += [f"{WEIGHTS_NAME}.safetensors", f"{WEIGHTS_NAME}.fp16.safetensors", f"{WEIGHTS_NAME}.bin",
              f"{WEIGHTS_NAME}.fp16.bin"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise VAELoadError(f"{folder}: no weights file; looked for {', '.join(names)}")


def load_pretrained(cls, path: PathLike, subfolder: Optional[str] = None, torch_dtype: Optional[torch.dtype] = None,
                    variant: Optional[str] = None, family: Optional[str] = None, **_ignored):
    folder = find_pretrained_folder(path, subfolder)
    cfg = _read_config_file(folder / CONFIG_NAME)
    weights = _weights_file(folder, variant)
    sd, metadata, container = read_state_dict(weights)
    model = from_state_dict(cls, sd, config=cfg, family=family, torch_dtype=torch_dtype, metadata=metadata,
                            source=str(weights))
    if family is None:
        model.info["family"], model.info["family_reason"] = _family_from_config(cfg)
    model.info.update(container=container, path=str(folder))
    return model


def _family_from_config(cfg: AutoencoderKLConfig) -> Tuple[Optional[str], str]:
    if tuple(cfg.block_out_channels) != (128, 256, 512, 512):
        return None, "config.json: the widths match no published family"
    for name in ("sd1", "sdxl", "sd3", "flux"):
        fam = get_family(name)
        if (cfg.latent_channels == fam.latent_channels and abs(cfg.scaling_factor - fam.scaling_factor) < 1e-6
                and (cfg.shift_factor or None) == fam.shift_factor):
            return name, "config.json scaling/shift factors"
    return None, "config.json matches no published family"


def save_pretrained(model, folder: PathLike, safe_serialization: bool = True, variant: Optional[str] = None) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(model.config.to_json() + "\n")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    suffix = f".{variant}" if variant else ""
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(sd, str(out / f"{WEIGHTS_NAME}{suffix}.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(sd, str(out / f"{WEIGHTS_NAME}{suffix}.bin"))


def save_single_file(model, path: PathLike) -> None:
    """LDM layout in .safetensors, with the config and family in the metadata so it loads back exactly."""
    from safetensors.torch import save_file

    sd = convert.diffusers_to_ldm({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})
    metadata = {"format": "pt", META_CONFIG: json.dumps(model.config.to_dict())}
    family = (getattr(model, "info", None) or {}).get("family")
    if family:
        metadata[META_FAMILY] = str(family)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
