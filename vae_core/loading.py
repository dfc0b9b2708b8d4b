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
import re
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
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class VAELoadError(ValueError):
    """A file that is not a loadable VAE; the message names the file and the problem."""


class WeightsNotFoundError(VAELoadError, FileNotFoundError):
    """A diffusers folder without the weights file asked for (an OSError too, as diffusers raises)."""


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
    # keep_vars: names and shapes only (a plain state_dict() copies every channels_last weight to NCHW)
    expected = model.state_dict(keep_vars=True)
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


def _add_variant(name: str, variant: Optional[str]) -> str:
    """diffusers' variant naming: the variant goes before the last suffix (x.safetensors -> x.fp16.safetensors,
    x.safetensors.index.json -> x.safetensors.index.fp16.json)."""
    if not variant:
        return name
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{variant}.{ext}"


def _weights_files(folder: Path, variant: Optional[str], use_safetensors: Optional[bool] = None) -> list:
    """The weights of a diffusers folder: one file, or the shards an index file lists.

    As in diffusers, a variant file (diffusion_pytorch_model.fp16.safetensors) is read only when
    variant= names it, and use_safetensors=True/False restricts the search to that format."""
    kinds = {True: ("safetensors",), False: ("bin",), None: ("safetensors", "bin")}[use_safetensors]
    looked = []
    for ext in kinds:
        single = folder / _add_variant(f"{WEIGHTS_NAME}.{ext}", variant)
        index = folder / _add_variant(f"{WEIGHTS_NAME}.{ext}.index.json", variant)
        looked += [single.name, index.name]
        if single.is_file():
            return [single]
        if index.is_file():
            return _shards_of(index)
    present = sorted(p.name for p in folder.glob(f"{WEIGHTS_NAME}*"))
    hint = f"; the folder holds {', '.join(present)}" if present else ""
    if present and not variant:
        # x.fp16.safetensors, x.fp16-00001-of-00002.safetensors, x.safetensors.index.fp16.json -> fp16
        found = (re.fullmatch(rf"{WEIGHTS_NAME}\.(\w+)(?:-\d+-of-\d+)?\.(?:safetensors|bin)", n)
                 or re.fullmatch(rf"{WEIGHTS_NAME}\.(?:safetensors|bin)\.index\.(\w+)\.json", n) for n in present)
        variants = sorted({m.group(1) for m in found if m} - {"safetensors", "bin"})
        if variants:
            hint += f": pass variant={variants[0]!r} to load {'it' if len(present) == 1 else 'them'}"
    # The first sentence is diffusers' wording for the same case, which diffusers' own tests look for.
    raise WeightsNotFoundError(f"Error no file named {WEIGHTS_NAME}.bin found in directory {folder} "
                               f"(looked for {', '.join(looked)}{hint})")


def _shards_of(index: Path) -> list:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise VAELoadError(f"{index}: not a valid sharded-weights index (expected a JSON object with a "
                           f"'weight_map' of tensor name -> shard file): {err}") from err
    if not isinstance(weight_map, dict) or not weight_map:
        raise VAELoadError(f"{index}: 'weight_map' is empty or not an object; re-export the folder")
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        shard = index.parent / str(name)
        if Path(str(name)).name != str(name) or not shard.is_file():
            raise WeightsNotFoundError(f"{index}: lists shard {name!r}, which is not a file in {index.parent}")
        shards.append(shard)
    return shards


def _read_weights(files: list) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], str]:
    if len(files) == 1:
        return read_state_dict(files[0])
    sd: Dict[str, torch.Tensor] = {}
    metadata: Dict[str, str] = {}
    container = ""
    for shard in files:
        part, meta, container = read_state_dict(shard)
        clash = sorted(set(part) & set(sd))
        if clash:
            raise VAELoadError(f"{shard}: tensor {clash[0]} is also in an earlier shard; the index is damaged")
        sd.update(part)
        metadata = metadata or meta
    return sd, metadata, container


def load_pretrained(cls, path: PathLike, subfolder: Optional[str] = None, torch_dtype: Optional[torch.dtype] = None,
                    variant: Optional[str] = None, family: Optional[str] = None,
                    config_overrides: Optional[Dict[str, Any]] = None, use_safetensors: Optional[bool] = None,
                    **_ignored):
    folder = find_pretrained_folder(path, subfolder)
    cfg = _read_config_file(folder / CONFIG_NAME)
    if config_overrides:
        cfg = _config_from_dict({**cfg.to_dict(), **config_overrides}, str(folder / CONFIG_NAME),
                                "config.json with overrides")
    files = _weights_files(folder, variant, use_safetensors)
    weights = files[0] if len(files) == 1 else files[0].parent
    sd, metadata, container = _read_weights(files)
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


_SIZE_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string like "10GB", "500MB", "64KiB" (decimal and binary units, as diffusers)."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit, scale in _SIZE_UNITS.items():
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * scale)
    raise ValueError(f"max_shard_size={size!r} is not a size; give bytes or a string like '10GB', '500MB', '64KiB'")


def save_pretrained(model, folder: PathLike, safe_serialization: bool = True, variant: Optional[str] = None,
                    max_shard_size: Union[int, str, None] = None) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(model.config.to_json() + "\n")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    ext = "safetensors" if safe_serialization else "bin"
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    shards = [sd]
    if limit is not None:  # greedy, in state-dict order, as diffusers/huggingface_hub split
        shards, size = [{}], 0
        for key, t in sd.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > limit:
                shards, size = shards + [{}], 0
            shards[-1][key], size = t, size + nbytes
    single = _add_variant(f"{WEIGHTS_NAME}.{ext}", variant)
    names = [single] if len(shards) == 1 else [
        single.replace(f".{ext}", f"-{i + 1:05d}-of-{len(shards):05d}.{ext}") for i in range(len(shards))]
    # a re-save must not leave this variant's shards (or index) of an earlier save behind
    stem = re.escape(single[: -len(ext) - 1])
    ours = re.compile(rf"{stem}(-\d{{5}}-of-\d{{5}})?\.{ext}|{re.escape(_add_variant(f'{WEIGHTS_NAME}.{ext}.index.json', variant))}")
    for stale in out.iterdir():
        if ours.fullmatch(stale.name) and stale.name not in names:
            stale.unlink()
    for name, part in zip(names, shards):
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(part, str(out / name), metadata={"format": "pt"})
        else:
            torch.save(part, str(out / name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                 "weight_map": {k: name for name, part in zip(names, shards) for k in part}}
        (out / _add_variant(f"{WEIGHTS_NAME}.{ext}.index.json", variant)).write_text(json.dumps(index, indent=2) + "\n")


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
