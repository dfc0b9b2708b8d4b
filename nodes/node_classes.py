"""The six nodes of the pack (ComfyUI V1 node API). Thin: they convert IMAGE/LATENT, call
`run.py` / vae_core, and return UI data for the web extension. Node ids are permanent."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional

import folder_paths

from ..vae_core import AutoencoderKL, available_attn_processors
from ..vae_core.loading import VAELoadError, is_pretrained_folder, only_variant
from . import grid, run
from .cache import MODELS, file_signature
from .sample_image import AutoencoderKLSampleImage
from .vae_object import DTYPES, as_akl, build, outside_inference_mode

logger = logging.getLogger(__name__)

CATEGORY = "latent/AutoencoderKL"
DTYPE_CHOICES = ["auto", *DTYPES]
SEED_MAX = 0xFFFFFFFFFFFFFFFF

VAE_IN_TOOLTIP = ("The VAE: from Load VAE (AutoencoderKL), or the host's Load VAE / Load Checkpoint "
                  "(a KL-VAE such as SD1, SDXL, SD3 or FLUX).")
LATENT_IN_TOOLTIP = "Raw (unscaled) latents [B, C, H/8, W/8], as the host's VAE Encode and samplers make them."
PIXELS_IN_TOOLTIP = ("Images [B, H, W, C] in [0, 1]. Sides are centre-cropped to multiples of 8 and only the "
                     "first three channels are used, as in the host's VAE Encode.")
TILE_TOOLTIP = (f"Tile side in image pixels ({grid.TILE_MIN}-{grid.TILE_MAX}, a multiple of {grid.ALIGN}). "
                "Smaller tiles use less memory; an image that fits in one tile runs untiled.")
OVERLAP_TOOLTIP = (f"Pixels shared by neighbouring tiles (a multiple of {grid.ALIGN}, at most half the tile). "
                   "The 'blend' method cross-fades over this band; 'exact' needs no overlap and ignores it.")
METHOD_TOOLTIP = ("How tiles are joined. 'exact' (the default, also for API prompts that omit it): pools "
                  "normalisation statistics over the whole image, so the result equals the untiled one; it keeps "
                  "intermediate results in free memory when there is room (about 1.1x untiled time) and "
                  "recomputes them when there is not (up to ~1.5x). 'blend': diffusers' tiling, cross-fading "
                  "overlapping tiles (seams and colour shifts possible); kept for parity with diffusers and for "
                  "saved workflows, which keep the method they stored.")


# -- the vae_name combo -----------------------------------------------------------------------


def diffusers_folders() -> List[str]:
    """Diffusers-format VAE folders (config.json + weights) in the host's vae folders, as 'name/'."""
    found = []
    for base in folder_paths.get_folder_paths("vae"):
        if not os.path.isdir(base):
            continue
        for root, dirs, _files in os.walk(base, followlinks=True):
            rel = os.path.relpath(root, base)
            if rel != "." and is_pretrained_folder(root):
                found.append(rel.replace(os.sep, "/") + "/")
            if rel.count(os.sep) >= 2:
                dirs[:] = []
    return sorted(set(found))


def vae_choices() -> List[str]:
    files = [f for f in folder_paths.get_filename_list("vae")]
    return files + [d for d in diffusers_folders() if d not in files]


def check_vae_name(vae_name: str) -> None:
    """Refuse names that could reach outside the vae model folders: absolute paths and '..' parts.

    Names come from prompts (the API), so they are not trusted; the host's own lookup would quietly
    map '../x' to 'x', and a folder name ('name/') is joined as given. Symlinks the server's owner put
    inside a vae folder are followed, as the host's own loaders do (only someone who can write to
    the model folders can create them).
    """
    if not isinstance(vae_name, str) or not vae_name.strip("/"):
        raise ValueError(f"vae_name={vae_name!r} is not a file or folder name; choose one from the list")
    parts = vae_name.replace("\\", "/").split("/")
    if "\0" in vae_name or os.path.isabs(vae_name) or vae_name.startswith(("/", "\\")) or ".." in parts \
            or (len(vae_name) > 1 and vae_name[0].isalpha() and vae_name[1] == ":"):  # a Windows drive
        raise ValueError(f"vae_name={vae_name!r} is refused: names must be relative to the vae model folders, "
                         "without '..' or an absolute path; choose a name from the list (put the file in "
                         "models/vae first)")


def resolve_vae_path(vae_name: str) -> str:
    check_vae_name(vae_name)
    if vae_name.endswith("/"):
        for base in folder_paths.get_folder_paths("vae"):
            path = os.path.join(base, vae_name.rstrip("/"))
            if os.path.isdir(path):
                return path
    else:
        path = folder_paths.get_full_path("vae", vae_name)
        if path is not None:
            return path
    raise FileNotFoundError(
        f"VAE {vae_name!r} was not found in the vae model folders ({', '.join(folder_paths.get_folder_paths('vae'))}); "
        "put the file (or a diffusers folder) there and refresh the node list (press R in the editor)")


# -- nodes ---------------------------------------------------------------------------------


class AutoencoderKLLoader:
    DESCRIPTION = ("Loads a KL-VAE (SD1.x/2.x, SDXL, SD3, FLUX.1 or a custom size) from the vae model folders: "
                   "single files in LDM or diffusers layout (.safetensors, or .ckpt/.pt loaded weights-only) and "
                   "diffusers folders. The architecture is read from the weights. Output works with every VAE node.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The VAE, usable by these nodes and by the host's VAE Encode/Decode nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": (vae_choices(), {"tooltip": "A file or diffusers folder ('name/') in the vae model "
                                                         "folders (models/vae and extra paths)."}),
            },
            "optional": {
                "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": "Weight and compute precision. 'auto' is "
                                          "what the host picks for its VAE device (fp32 on the CPU, bf16 on most "
                                          "GPUs)."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, vae_name, dtype="auto"):
        try:
            return f"{vae_name}|{dtype}|{file_signature(resolve_vae_path(vae_name))}"
        except (OSError, ValueError):  # missing file, refused name
            return float("nan")  # always re-run so the load error is reported

    def load(self, vae_name: str, dtype: str = "auto"):
        path = resolve_vae_path(vae_name)

        def _load():
            with outside_inference_mode():
                if os.path.isdir(path):
                    # a folder of only .fp16 weights loads as such (from_pretrained alone needs variant=)
                    core = AutoencoderKL.from_pretrained(path, variant=only_variant(path))
                else:
                    core = AutoencoderKL.from_single_file(path)
                return build(core, name=vae_name, dtype=dtype)

        try:
            vae = MODELS.get(path, dtype, _load)
        except VAELoadError as err:
            raise ValueError(f"Load VAE (AutoencoderKL) could not load {vae_name!r}: {err}") from None
        return {"ui": {"akl_card": [vae.card()]}, "result": (vae,)}


class AutoencoderKLEncode:
    DESCRIPTION = ("Encodes images into raw latents with the VAE (no scaling factor applied; samplers apply "
                   "it). Same result as the host's VAE Encode, with a choice of the posterior's mode or a sample.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Raw latents {'samples': [B, C, H/8, W/8]}.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pixels": ("IMAGE", {"tooltip": PIXELS_IN_TOOLTIP}),
                "vae": ("VAE", {"tooltip": VAE_IN_TOOLTIP}),
            },
            "optional": {
                "posterior": (["mode", "sample"], {"default": "mode", "tooltip": "'mode': the mean of the latent "
                              "distribution (the host's behaviour, deterministic). 'sample': a random draw from it, "
                              "seeded by 'seed'."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "tooltip": "Seed of the random draw when "
                         "posterior is 'sample'; unused for 'mode'."}),
            },
        }

    def encode(self, pixels, vae, posterior: str = "mode", seed: int = 0):
        akl = as_akl(vae)
        z, report = run.encode(akl, pixels, posterior=posterior, seed=seed)
        return {"ui": {"akl_run": [report]}, "result": ({"samples": z},)}


class AutoencoderKLDecode:
    DESCRIPTION = ("Decodes raw latents into images with the VAE. Same result as the host's VAE Decode; shows "
                   "progress for large batches and says clearly when the latent belongs to another model family.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("Images [B, H, W, 3] in [0, 1].",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": LATENT_IN_TOOLTIP}),
                "vae": ("VAE", {"tooltip": VAE_IN_TOOLTIP}),
            },
        }

    def decode(self, samples, vae):
        akl = as_akl(vae)
        image, report = run.decode(akl, _latent_tensor(samples))
        return {"ui": {"akl_run": [report]}, "result": (image,)}


def _latent_tensor(samples: Any):
    if not isinstance(samples, dict) or "samples" not in samples:
        raise ValueError(f"expected a LATENT ({{'samples': tensor}}), got {type(samples).__name__}")
    return samples["samples"]


def _tiled_inputs(first: str, first_type: str, first_tooltip: str) -> Dict[str, Any]:
    return {
        "required": {
            first: (first_type, {"tooltip": first_tooltip}),
            "vae": ("VAE", {"tooltip": VAE_IN_TOOLTIP}),
            "tile_size": ("INT", {"default": grid.TILE_DEFAULT, "min": grid.TILE_MIN, "max": grid.TILE_MAX,
                                  "step": grid.ALIGN, "tooltip": TILE_TOOLTIP}),
            "overlap": ("INT", {"default": grid.OVERLAP_DEFAULT, "min": 0, "max": grid.OVERLAP_MAX,
                                "step": grid.ALIGN, "tooltip": OVERLAP_TOOLTIP}),
        },
        "optional": {
            "method": (list(run.tiling_methods()), {"default": run.DEFAULT_METHOD, "tooltip": METHOD_TOOLTIP}),
        },
    }


def _check_tiles(tile_size, overlap, method: Optional[str] = None):
    err = grid.check_tile_params(tile_size, overlap)
    if err is None and method is not None and method not in run.tiling_methods():
        err = f"method={method!r} is not available; choose one of {list(run.tiling_methods())}"
    return err


class _TiledNode:
    """What both tiled nodes share: tile settings are validated before the run, never rewritten."""

    @classmethod
    def VALIDATE_INPUTS(cls, tile_size=None, overlap=None, method=None):
        err = _check_tiles(tile_size, overlap, method)
        return True if err is None else err


class AutoencoderKLEncodeTiled(_TiledNode):
    DESCRIPTION = ("Encodes images tile by tile, for images too large to encode at once. Shows the tile grid and "
                   "progress per tile; Cancel stops it within one tile.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Raw latents {'samples': [B, C, H/8, W/8]} (posterior mode).",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return _tiled_inputs("pixels", "IMAGE", PIXELS_IN_TOOLTIP)

    def encode(self, pixels, vae, tile_size: int, overlap: int, method: str = run.DEFAULT_METHOD):
        err = _check_tiles(tile_size, overlap, method)
        if err:
            raise ValueError(err)
        akl = as_akl(vae)
        tile = {"tile_size": tile_size, "overlap": overlap, "method": method}
        z, report = run.encode(akl, pixels, tile=tile)
        g = _grid_ui(report, akl, "encode")
        return {"ui": {"akl_grid": [g], "akl_run": [report]}, "result": ({"samples": z},)}


class AutoencoderKLDecodeTiled(_TiledNode):
    DESCRIPTION = ("Decodes latents tile by tile, for images too large to decode at once. Shows the tile grid and "
                   "progress per tile; Cancel stops it within one tile.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("Images [B, H, W, 3] in [0, 1].",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return _tiled_inputs("samples", "LATENT", LATENT_IN_TOOLTIP)

    def decode(self, samples, vae, tile_size: int, overlap: int, method: str = run.DEFAULT_METHOD):
        err = _check_tiles(tile_size, overlap, method)
        if err:
            raise ValueError(err)
        akl = as_akl(vae)
        tile = {"tile_size": tile_size, "overlap": overlap, "method": method}
        image, report = run.decode(akl, _latent_tensor(samples), tile=tile)
        g = _grid_ui(report, akl, "decode")
        return {"ui": {"akl_grid": [g], "akl_run": [report]}, "result": (image,)}


def _grid_ui(report: Dict[str, Any], akl, direction: str) -> Dict[str, Any]:
    return grid.tile_grid(report["image_h"], report["image_w"], report["tile_size"], report["overlap"],
                          report["method"], dtype_bytes=run.mm.dtype_size(akl.vae_dtype), batch=report["batch_chunk"],
                          direction=direction, factor=akl.downscale_ratio, model=grid.model_summary(akl.core.config))


class AutoencoderKLSetAttentionProcessor:
    DESCRIPTION = ("Returns a copy of the VAE that computes its self-attention with another backend. The copy "
                   "shares the weights (no extra memory); the input VAE is unchanged.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("A VAE sharing the input's weights, using the chosen attention processor.",)
    FUNCTION = "set_processor"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("VAE", {"tooltip": VAE_IN_TOOLTIP}),
                "processor": (available_attn_processors(), {"default": "sdpa", "tooltip": "'sdpa': torch's "
                              "scaled_dot_product_attention (default). 'math': plain matmul + softmax (reference). "
                              "'sliced': queries in slices of slice_size (least memory). 'xformers': when "
                              "installed."}),
            },
            "optional": {
                "slice_size": ("INT", {"default": 1024, "min": 1, "max": 1 << 20, "tooltip": "Queries per slice "
                               "for the 'sliced' processor; ignored by the others."}),
            },
        }

    def set_processor(self, vae, processor: str, slice_size: int = 1024):
        if processor not in available_attn_processors():
            raise ValueError(f"attention processor {processor!r} is not available here; "
                             f"choose one of {available_attn_processors()}")
        akl = as_akl(vae)
        kwargs = {"slice_size": int(slice_size)} if processor == "sliced" else {}
        new = akl.with_attention(processor, **kwargs)
        return {"ui": {"akl_card": [new.card()]}, "result": (new,)}


NODE_CLASS_MAPPINGS = {
    "AutoencoderKLLoader": AutoencoderKLLoader,
    "AutoencoderKLEncode": AutoencoderKLEncode,
    "AutoencoderKLDecode": AutoencoderKLDecode,
    "AutoencoderKLEncodeTiled": AutoencoderKLEncodeTiled,
    "AutoencoderKLDecodeTiled": AutoencoderKLDecodeTiled,
    "AutoencoderKLSetAttentionProcessor": AutoencoderKLSetAttentionProcessor,
    "AutoencoderKLSampleImage": AutoencoderKLSampleImage,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "AutoencoderKLLoader": "Load VAE (AutoencoderKL)",
    "AutoencoderKLEncode": "VAE Encode (AutoencoderKL)",
    "AutoencoderKLDecode": "VAE Decode (AutoencoderKL)",
    "AutoencoderKLEncodeTiled": "VAE Encode Tiled (AutoencoderKL)",
    "AutoencoderKLDecodeTiled": "VAE Decode Tiled (AutoencoderKL)",
    "AutoencoderKLSetAttentionProcessor": "Set VAE Attention Processor (AutoencoderKL)",
    "AutoencoderKLSampleImage": "AutoencoderKL Sample Image",
}
