"""Reading and writing VAE weights: diffusers folders, LDM single files, full checkpoints.

The layout (LDM or diffusers) is read from the keys and the container (safetensors or a torch
pickle) from the first bytes, never from the file name. Pickles load only with weights_only=True.
Every failure is a `VAELoadError` (a ValueError) naming the file and what was wrong.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import convert, safe_read
from .errors import VAELoadError, WeightsNotFoundError  # noqa: F401  (public here, as before)
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
_CONTAINER_NAMES = {"safetensors": "safetensors file", "zip-pickle": "torch zip checkpoint (torch.save)",
                    "pickle": "legacy torch pickle"}


# -- containers ---------------------------------------------------------------------------


def sniff_container(path: PathLike) -> str:
    """'safetensors', 'zip-pickle' (torch.save since 1.6), 'pickle' (legacy), or raise VAELoadError."""
    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        raise VAELoadError(f"{p}: the file is empty (0 bytes); re-download or re-export it")
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError as err:
        raise VAELoadError(f"{p}: cannot read the file: {err.strerror or type(err).__name__}") from None
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
        raise VAELoadError(f"{p}: this is a JSON/text file, not model weights")
    # the kind in words, never the bytes: the path may be a link to a private file
    raise VAELoadError(f"{p}: unrecognised file format ({safe_read.describe_bytes(head)}); expected .safetensors "
                       "or a torch checkpoint (.ckpt/.pt/.pth/.bin)")


def read_state_dict(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], str]:
    """Read the tensors of a weights file: (state dict, safetensors metadata, container kind). Of a full
    .safetensors checkpoint only the VAE's are read; the others are meta tensors (names and shapes)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise VAELoadError(f"{p}: is a folder; use AutoencoderKL.from_pretrained for diffusers folders")
    kind = sniff_container(p)
    if kind == "safetensors":
        # plain reads, every size checked against the file first (safe_read.py): no mmap, so no SIGBUS
        sd, metadata = safe_read.read_safetensors(p)
        return sd, metadata, kind
    try:
        # through one open file (safe_read.py: no mmap, zip entries checked first), never the path:
        # torch.load hands any path ending in .safetensors to safetensors
        with _allowing(_legacy_checkpoint_globals()):
            obj, size = safe_read.load_torch_checkpoint(p, kind)
    except VAELoadError:
        raise
    except pickle.UnpicklingError as err:
        raise VAELoadError(
            f"{p}: refused to load: this pickle holds more than tensors (it may run code when unpickled), "
            f"and only weights_only=True loading is allowed. Convert it to .safetensors with a tool you trust. "
            f"Detail: {_refusal_detail(err)}"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, AttributeError,
            IndexError, TypeError, OverflowError, AssertionError) as err:
        # a damaged pickle stream fails in many ways; torch's weights-only unpickler even asserts
        raise VAELoadError(f"{p}: corrupt or truncated {_CONTAINER_NAMES[kind]}: {type(err).__name__}: {err}") from err
    sd = _tensors_of_checkpoint(obj, p)
    safe_read.check_views(sd, p, size)  # stride-0 / overlapping views, before anything reads their values
    return sd, {}, kind


# -- what a torch checkpoint holds besides the weights ------------------------------------------


class _LightningModelCheckpoint:
    """Stands in for pytorch_lightning's ModelCheckpoint class, which SD-era checkpoints name as a dict key
    (their `callbacks` entry). It is only ever a key: nothing of Lightning is imported or run."""


def _numpy_scalar(dtype, data=None):
    """numpy 1.x's scalar(dtype, bytes), as a pickle names it, for numeric dtypes only (a score or a
    learning rate in Lightning's callback state); refuses the object dtype, whose bytes would be a pointer."""
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes) \
            or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"numpy.core.multiarray.scalar with dtype {dtype!r}: only numeric scalars "
                                     "are allowed in a checkpoint")
    return np.frombuffer(data, dtype=dtype)[0]


def _legacy_checkpoint_globals():
    """The inert globals old Lightning checkpoints name, as (object, pickled name) pairs: the set the host
    (ComfyUI's comfy/utils.py) allowlists, and no more. Pairs, so leaving the context never removes an
    entry the host added itself."""
    import _codecs

    import numpy as np

    return [
        (_LightningModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        (_numpy_scalar, "numpy.core.multiarray.scalar"),
        (np.dtype, "numpy.dtype"),
        (type(np.dtype("float64")), "numpy.dtypes.Float64DType"),  # np.dtypes.Float64DType (numpy >= 1.25)
        (_codecs.encode, "_codecs.encode"),  # how protocol-2 pickles store bytes
    ]


def _allowing(pairs):
    """torch's safe_globals context for the duration of one read. The (object, name) pairs need
    torch >= 2.6 (the host's own floor for safe loading is 2.4); without the context (torch < 2.5)
    nothing extra is allowed, and those checkpoints are refused like any other pickle."""
    context = getattr(torch.serialization, "safe_globals", None)
    return context(pairs) if context is not None else contextlib.nullcontext()


def _refusal_detail(err: Exception) -> str:
    """The line of torch's refusal that names what the pickle asked for (e.g. the unsupported global),
    without torch's advice to allowlist it or to load with weights_only=False."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        if "GLOBAL " in line or line is not lines[0] and not line.startswith(_TORCH_ADVICE):
            return line.split(" Please use `torch.serialization.", 1)[0].strip()
    return lines[0] if lines else type(err).__name__


# the lines of torch's weights-only refusal that say how to load anyway, not what was refused
_TORCH_ADVICE = ("Weights only load failed", "(1)", "(2)", "Check the documentation", "In PyTorch 2.6")


def _tensors_of_checkpoint(obj: Any, p: Path) -> Dict[str, torch.Tensor]:
    """The tensors of an unpickled checkpoint: `obj` itself, or its `state_dict` entry (Lightning, whose
    training state beside it, e.g. global_step, epoch, pytorch-lightning_version, callbacks,
    optimizer_states, is never weights: it is dropped, by name, in an info log line)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        beside = sorted(str(k) for k in obj if k != "state_dict")
        if beside:
            logger.info("%s: ignored the training state beside 'state_dict': %s", p, ", ".join(beside))
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise VAELoadError(f"{p}: expected a dict of tensors, found a {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


# -- building a model from a state dict -------------------------------------------------------


def _check_tensors(sd: Dict[str, torch.Tensor], source: str) -> None:
    bad = [k for k, v in sd.items() if v.dtype not in _FLOAT_DTYPES]
    if bad:
        raise VAELoadError(
            f"{source}: VAE weights must be floating point (float32, float16, bfloat16, float64, or float8, which "
            f"is upcast); {convert._first(bad)} {'is' if len(bad) == 1 else 'are'} {sd[bad[0]].dtype}: integer or "
            "packed quantised data (e.g. GGUF, bitsandbytes NF4/int8) this loader does not dequantise; use a "
            "float16/bfloat16/float32 export of the VAE")
    # A flipped exponent bit or a broken export leaves NaN/inf in a weight: every image would come out
    # black or broken, so refuse the file here, naming the tensor, rather than at the first decode.
    broken = [k for k, v in sd.items() if not safe_read.all_finite(v)]
    if broken:
        raise VAELoadError(f"{source}: the weights hold NaN or inf values in {convert._first(broken)}; the file is "
                           "corrupt (or was saved from a broken model): re-download or re-export it")


def _load_strict(model, sd: Dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True), with a message that names the first offending keys."""
    # keep_vars: names and shapes only (a plain state_dict() copies every channels_last weight to NCHW)
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    problems = convert.fit_problems(expected, {k: tuple(v.shape) for k, v in sd.items()})
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


MAX_CONFIG_BYTES = 1 << 20  # a diffusers config.json is ~1 KB


def _read_config_file(p: Path) -> AutoencoderKLConfig:
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise VAELoadError(f"{p}: refused: {p.stat().st_size:,} bytes is no AutoencoderKL config.json "
                               f"(the limit is {MAX_CONFIG_BYTES:,})")
        data = json.loads(p.read_bytes().decode("utf-8"))
    except OSError as err:
        raise VAELoadError(f"{p}: cannot read the config: {err.strerror or type(err).__name__}") from None
    except UnicodeDecodeError:
        raise VAELoadError(f"{p}: the config is not UTF-8 text ({safe_read.describe_bytes(p.read_bytes()[:16])})") from None
    except json.JSONDecodeError as err:  # its message gives the position, never the text
        raise VAELoadError(f"{p}: the config is not valid JSON: {err}") from None
    except RecursionError:
        raise VAELoadError(f"{p}: the config is not valid JSON: nested too deeply") from None
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
    # a standalone file may carry Playground's edm_mean/edm_std beside the VAE keys: family markers, not weights
    markers = [k for k in convert.PLAYGROUND_KEYS if prefix is None and k in vae_sd]
    vae_sd = {k: v for k, v in vae_sd.items() if k not in markers}
    weights, dropped = convert.drop_training_leftovers(vae_sd)
    try:
        weights, upcast = convert.dequantize_float8(weights)
        dsd, layout = convert.to_diffusers_layout(weights if weights else vae_sd)
    except ValueError as err:
        hint = _what_is_it(vae_sd)
        raise VAELoadError(f"{source}: {err}{hint}") from None
    if dropped:
        logger.info("%s: ignored training leftovers: %s", source,
                    "; ".join(f"{what}: {n} tensor{'s' if n > 1 else ''}" for what, n in dropped.items()))
    if upcast:
        logger.info("%s: %d float8 tensors upcast to float32", source, upcast)
    _check_tensors(dsd, source)
    safe_read.check_vae_shapes(dsd, source)
    cfg = _resolve_config(config, source)
    cfg_origin = "given"
    if cfg is None and metadata and metadata.get(META_CONFIG):
        try:
            cfg = _config_from_dict(json.loads(metadata[META_CONFIG]), source, f"metadata {META_CONFIG}")
            cfg_origin = "metadata"
        except json.JSONDecodeError as err:
            raise VAELoadError(f"{source}: metadata {META_CONFIG} is not valid JSON: {err}") from err
        except RecursionError:
            raise VAELoadError(f"{source}: metadata {META_CONFIG} is not valid JSON: nested too deeply") from None
    if cfg is None:
        try:
            cfg = convert.infer_config(dsd)
        except ValueError as err:
            raise VAELoadError(f"{source}: {err}") from None
        cfg_origin = "inferred from shapes"
    detected, reason = convert.detect_family(cfg, full if prefix or markers else None, metadata)
    detected, reason = _checked_family(detected, reason, cfg, source)
    if family is not None:
        fam = _given_family(family, cfg, source)
        detected, reason = fam.name, "given (family=)"
        cfg = _with_family(cfg, fam, full)
    elif cfg_origin == "inferred from shapes" and detected is not None:
        fam = get_family(detected)
        cfg = _with_family(cfg, fam, full, sample_size=fam.sample_size)
    if detected is not None and cfg_origin == "inferred from shapes" and "assumed" in reason:
        logger.warning("%s: %s", source, reason)
    safe_read.check_fits(cfg, dsd, source, cfg_origin)  # before any module exists: milliseconds, not minutes
    try:
        with torch.device("meta"):
            skeleton = cls.from_config(cfg)
        model = skeleton.to_empty(device="cpu")
    except (RuntimeError, ValueError, TypeError) as err:  # e.g. a damaged config with negative channels
        raise VAELoadError(f"{source}: the VAE config ({cfg_origin}) does not describe a buildable VAE: "
                           f"{str(err).splitlines()[0]}; re-export the file or pass config=") from None
    _load_strict(model, dsd, source)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    model.eval()
    model.info = {
        "family": detected,
        "family_reason": safe_read.capped(reason),  # may quote metadata; the card carries it to the UI
        "layout": layout,
        "prefix": prefix,
        "config_origin": cfg_origin,
        "source": source,
    }
    if metadata and metadata.get(META_DESCRIPTION):  # what the file says it is, for the model card
        model.info["description"] = str(metadata[META_DESCRIPTION])
    return model


def _with_family(cfg: AutoencoderKLConfig, fam, full: Dict[str, torch.Tensor], **more) -> AutoencoderKLConfig:
    """cfg with the family's scaling, shift and latent statistics. Playground's statistics come from
    the checkpoint's own edm_mean/edm_std when it has them (as diffusers' single-file loader does),
    otherwise from the published config."""
    mean, std = fam.latents_mean, fam.latents_std
    if mean is not None and all(k in full for k in convert.PLAYGROUND_KEYS):
        stats = [full[k].detach().to(torch.float32).flatten() for k in convert.PLAYGROUND_KEYS]
        if all(t.numel() == cfg.latent_channels for t in stats):
            mean, std = (tuple(t.tolist()) for t in stats)
    return AutoencoderKLConfig(**{**cfg.to_dict(), "scaling_factor": fam.scaling_factor,
                                  "shift_factor": fam.shift_factor, "latents_mean": mean, "latents_std": std,
                                  **more})


def _given_family(family: str, cfg: AutoencoderKLConfig, source: str):
    """The LatentFormat named by family= (an unknown name is refused, naming the file). The caller's
    explicit choice wins over the weights, but a latent channel count that contradicts it is logged."""
    try:
        fam = get_family(family)
    except ValueError as err:
        raise VAELoadError(f"{source}: family={safe_read.capped(family, 40)!r}: {err}") from None
    if fam.latent_channels != cfg.latent_channels:
        logger.warning("%s: family=%r (%s) has %d latent channels but this VAE has %d; using its scaling as asked",
                       source, family, fam.label, fam.latent_channels, cfg.latent_channels)
    return fam


def _checked_family(detected: Optional[str], reason: str, cfg: AutoencoderKLConfig,
                    source: str) -> Tuple[Optional[str], str]:
    """A family claim (from metadata or the checkpoint) that names no family, or whose latent channel
    count contradicts the weights', is overridden by shapes alone, with a warning."""
    if detected is None:
        return detected, reason
    try:
        fam = get_family(detected)
    except ValueError:
        problem = "names no known family"
    else:
        if fam.latent_channels == cfg.latent_channels:
            return fam.name, reason
        problem = f"has {fam.latent_channels} latent channels, not {cfg.latent_channels}"
    fallback, why = convert.detect_family(cfg, None, None)
    if fallback is not None and get_family(fallback).latent_channels != cfg.latent_channels:
        fallback, why = None, "shapes match no published family"
    note = f"{why}; ignored the claim {safe_read.capped(detected, 40)!r} ({safe_read.capped(reason, 80)}), which {problem}"
    logger.warning("%s: %s", source, note)
    return fallback, note


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


def folder_variants(folder: PathLike) -> list:
    """The variants a diffusers folder's weight files carry (x.fp16.safetensors,
    x.fp16-00001-of-00002.safetensors, x.safetensors.index.fp16.json -> ["fp16"]), sorted."""
    names = [p.name for p in Path(folder).glob(f"{WEIGHTS_NAME}*")]
    found = (re.fullmatch(rf"{WEIGHTS_NAME}\.(\w+)(?:-\d+-of-\d+)?\.(?:safetensors|bin)", n)
             or re.fullmatch(rf"{WEIGHTS_NAME}\.(?:safetensors|bin)\.index\.(\w+)\.json", n) for n in names)
    return sorted({m.group(1) for m in found if m} - {"safetensors", "bin"})


def only_variant(folder: PathLike) -> Optional[str]:
    """The variant to load a folder with when it holds no plain weights and exactly one variant (a
    vae/ folder downloaded as fp16 only); None otherwise. For callers that pick the folder, not the
    file, such as the Load VAE node: from_pretrained itself follows diffusers and needs variant=."""
    folder = Path(folder)
    plain = any((folder / f"{WEIGHTS_NAME}.{ext}{tail}").is_file()
                for ext in ("safetensors", "bin") for tail in ("", ".index.json"))
    variants = folder_variants(folder)
    return variants[0] if not plain and len(variants) == 1 else None


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
        variants = folder_variants(folder)
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
    for name in ("sd1", "sdxl", "sd3", "flux", "playground-v2-5"):
        fam = get_family(name)
        if (cfg.latent_channels == fam.latent_channels and abs(cfg.scaling_factor - fam.scaling_factor) < 1e-6
                and (cfg.shift_factor or None) == fam.shift_factor
                and (fam.latents_mean is None or cfg.latents_mean is not None)):
            return name, "config.json scaling/shift factors" + (" and latents_mean/std" if fam.latents_mean else "")
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
