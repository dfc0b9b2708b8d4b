"""The layout zoo: one small file per published VAE layout (real key names, extra keys, container,
stored dtype, prefix, neighbouring non-VAE weights), random tiny-width weights. Not a test module.

Each builder's docstring names the real file it stands for and where its key list was seen. Widths
are tiny (8/16/32/32): the loader reads the architecture off the shapes, and the family from the
keys, metadata and neighbours; with tiny widths the shapes-only rule gives no family (it needs the
published widths), so `family` below is what the file itself says. Builders write into a folder and
return a `Fixture`; `LAYOUTS` maps a name to its builder. Also used by the node and e2e tests.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vae_core import convert  # noqa: E402

StateDict = Dict[str, torch.Tensor]
DOWN = ("DownEncoderBlock2D",)
UP = ("UpDecoderBlock2D",)

# Tiny stand-ins for the published architectures. 8 groups is what shape inference recovers for these widths.
ARCHS = {
    # SD1.x/2.x, SDXL, Playground v2.5 (and latent-diffusion kl-f8): 4 latent channels, quant convs
    "sd": dict(block_out_channels=(8, 16, 32, 32), down_block_types=DOWN * 4, up_block_types=UP * 4,
               layers_per_block=2, latent_channels=4, norm_num_groups=8),
    # SD3/3.5 and FLUX.1: 16 latent channels, no quant convs
    "flux": dict(block_out_channels=(8, 16, 32, 32), down_block_types=DOWN * 4, up_block_types=UP * 4,
                 layers_per_block=2, latent_channels=16, norm_num_groups=8, use_quant_conv=False,
                 use_post_quant_conv=False),
    # latent-diffusion kl-f4: 3 levels (f = 4), 3 latent channels
    "kl_f4": dict(block_out_channels=(8, 16, 32), down_block_types=DOWN * 3, up_block_types=UP * 3,
                  layers_per_block=2, latent_channels=3, norm_num_groups=8),
}


@dataclasses.dataclass
class Fixture:
    path: Path  # what the loader is given: a file, or a diffusers folder
    arch: str  # key of ARCHS: the diffusers config of the weights
    weights: StateDict  # diffusers-layout float32 weights, as diffusers computes with them
    raw: StateDict  # the flat dict of tensors the file holds (before any container wrapping)
    family: Optional[str]  # the family the file says, None where only the (tiny) shapes could tell
    reason: Optional[str] = None  # a substring of model.info["family_reason"]
    logged: Tuple[str, ...] = ()  # substrings of the loader's info log lines
    container: str = "safetensors"
    ldm: bool = True  # raw holds LDM keys (checked against diffusers' own LDM converter)
    vae_prefix: str = ""  # prefix of the VAE keys in raw
    torch_dtype: Optional[torch.dtype] = None  # passed to the loader
    latents_mean: Optional[Tuple[float, ...]] = None  # expected config.latents_mean
    # diffusers' own loader (from_single_file / from_pretrained) reads exactly `weights` from the file;
    # False, with the reason in the builder, where it fails or computes with other weights
    diffusers_reads: bool = True

    @property
    def config(self) -> dict:
        return dict(ARCHS[self.arch])


def source_weights(arch: str, seed: int = 0) -> StateDict:
    """Random diffusers-layout weights for `arch`, GroupNorm affines randomised too (diffusers' 1/0
    init would hide a swapped norm)."""
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**ARCHS[arch])
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.normal_(1.0, 0.2)
                mod.bias.normal_(0.0, 0.2)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def diffusers_view(ldm: StateDict, arch: str) -> StateDict:
    """LDM keys mapped to diffusers' by diffusers' own single-file converter (the reference)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return {k: v.contiguous() for k, v in convert_ldm_vae_checkpoint(dict(ldm), ARCHS[arch]).items()}


def _ldm(sd: StateDict) -> StateDict:
    return {k: v.contiguous() for k, v in convert.diffusers_to_ldm(sd).items()}


def _stored(sd: StateDict, dtype: torch.dtype) -> Tuple[StateDict, StateDict]:
    """(the weights rounded to `dtype` as stored, the same back in float32 as they compute)."""
    stored = {k: v.to(dtype) for k, v in sd.items()}
    return stored, {k: v.to(torch.float32) for k, v in stored.items()}


def _others(keys, dtype=torch.float16) -> StateDict:
    """Neighbouring non-VAE weights: only their names matter to the loader, so they are tiny."""
    return {k: torch.zeros(2, 2, dtype=dtype) for k in keys}


# -- neighbours, by the key names the real checkpoints use --------------------------------------------
# Names as ComfyUI's model detection (comfy/model_detection.py, comfy/supported_models.py) and
# diffusers' single-file loader (loaders/single_file_utils.py CHECKPOINT_KEY_NAMES) look them up.
SD1_NEIGHBOURS = ("model.diffusion_model.input_blocks.0.0.weight",
                  "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
                  "model.diffusion_model.out.2.weight",
                  "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
                  "alphas_cumprod", "betas")
SDXL_NEIGHBOURS = ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
                   "model.diffusion_model.out.2.weight",
                   "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
                   "conditioner.embedders.1.model.positional_embedding",
                   "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias")
SDXL_REFINER_NEIGHBOURS = ("model.diffusion_model.input_blocks.0.0.weight",
                           "model.diffusion_model.label_emb.0.0.weight",
                           "conditioner.embedders.0.model.text_projection",
                           "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias")
SD3_NEIGHBOURS = ("model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
                  "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
                  "model.diffusion_model.x_embedder.proj.weight",
                  "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight",
                  "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight",
                  "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight")
FLUX_NEIGHBOURS = ("model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
                   "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
                   "model.diffusion_model.single_blocks.0.linear1.weight",
                   "model.diffusion_model.img_in.weight",
                   "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
                   "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight")


# latent-diffusion's LPIPSWithDiscriminator (ldm/modules/losses/contperceptual.py): logvar, taming's
# LPIPS (VGG16 slices, scaling layer, lin heads) and NLayerDiscriminator (BatchNorm with int64
# num_batches_tracked). The names are those a public script printed from load_state_dict(strict=False)
# on latent-diffusion's kl-f4 model.ckpt (found with the search tool: 'loss.discriminator.main').
def _loss_keys() -> StateDict:
    sd: StateDict = {"loss.logvar": torch.zeros(()),
                     "loss.perceptual_loss.scaling_layer.shift": torch.zeros(1, 3, 1, 1),
                     "loss.perceptual_loss.scaling_layer.scale": torch.ones(1, 3, 1, 1)}
    for slice_, idx in ((1, 0), (1, 2), (2, 5), (2, 7), (3, 10), (4, 17), (5, 28)):
        sd[f"loss.perceptual_loss.net.slice{slice_}.{idx}.weight"] = torch.zeros(2, 2, 3, 3)
        sd[f"loss.perceptual_loss.net.slice{slice_}.{idx}.bias"] = torch.zeros(2)
    for i in range(5):
        sd[f"loss.perceptual_loss.lin{i}.model.1.weight"] = torch.zeros(1, 2, 1, 1)
    sd["loss.discriminator.main.0.weight"] = torch.zeros(2, 3, 4, 4)
    sd["loss.discriminator.main.0.bias"] = torch.zeros(2)
    for i in (3, 6, 9):
        sd[f"loss.discriminator.main.{i - 1}.weight"] = torch.zeros(2, 2, 4, 4)
        sd[f"loss.discriminator.main.{i}.weight"] = torch.ones(2)
        sd[f"loss.discriminator.main.{i}.bias"] = torch.zeros(2)
        sd[f"loss.discriminator.main.{i}.running_mean"] = torch.zeros(2)
        sd[f"loss.discriminator.main.{i}.running_var"] = torch.ones(2)
        sd[f"loss.discriminator.main.{i}.num_batches_tracked"] = torch.tensor(840000, dtype=torch.int64)
    sd["loss.discriminator.main.11.weight"] = torch.zeros(1, 2, 4, 4)
    sd["loss.discriminator.main.11.bias"] = torch.zeros(1)
    return sd


EMA_KEYS = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840001, dtype=torch.int32)}
LIGHTNING_STATE = {"epoch": 6, "global_step": 840001, "pytorch-lightning_version": "1.4.2"}

LAYOUTS: Dict[str, Callable[[Path], Fixture]] = {}


def layout(fn: Callable[[Path], Fixture]) -> Callable[[Path], Fixture]:
    LAYOUTS[fn.__name__] = fn
    return fn


# -- standalone SD-family VAEs ---------------------------------------------------------------------


@layout
def vae_ft_mse_ema_ckpt(d: Path) -> Fixture:
    """stabilityai/sd-vae-ft-mse-original `vae-ft-mse-840000-ema-pruned.ckpt` (the file of diffusers'
    AutoencoderKL single-file docs): {state_dict: LDM VAE + model_ema.decay/num_updates, global_step},
    zip checkpoint. model_ema.* as A1111's modules/sd_vae.py `vae_ignore_keys` lists them."""
    w = source_weights("sd")
    raw = {**_ldm(w), **EMA_KEYS}
    path = d / "vae-ft-mse-840000-ema-pruned.ckpt"
    torch.save({"state_dict": raw, "global_step": 840001}, str(path))
    return Fixture(path, "sd", w, raw, None, logged=("model_ema.*", "global_step"), container="zip-pickle")


@layout
def vae_ft_mse_ema_safetensors(d: Path) -> Fixture:
    """The same VAE's `vae-ft-mse-840000-ema-pruned.safetensors` (and the many conversions of it):
    the .ckpt's state_dict as is, model_ema.decay/num_updates included."""
    w = source_weights("sd", seed=1)
    raw = {**_ldm(w), **EMA_KEYS}
    path = d / "vae-ft-mse-840000-ema-pruned.safetensors"
    save_file(raw, str(path))
    return Fixture(path, "sd", w, raw, None, logged=("model_ema.*",))


@layout
def sdxl_vae_safetensors(d: Path) -> Fixture:
    """stabilityai/sdxl-vae `sdxl_vae.safetensors`: LDM keys only, float32 (its key list: ComfyUI's
    VAE loader reads it as is, diffusers' convert_ldm_vae_checkpoint maps the same names)."""
    w = source_weights("sd", seed=2)
    raw = _ldm(w)
    path = d / "sdxl_vae.safetensors"
    save_file(raw, str(path))
    return Fixture(path, "sd", w, raw, None)


@layout
def kl_f8_model_ckpt(d: Path) -> Fixture:
    """CompVis/latent-diffusion `models/first_stage_models/kl-f8/model.ckpt`: a Lightning checkpoint,
    {state_dict: VAE + loss.* (LPIPS, discriminator, int64 buffers), epoch, global_step,
    pytorch-lightning_version}."""
    w = source_weights("sd", seed=3)
    raw = {**_ldm(w), **_loss_keys()}
    path = d / "kl-f8-model.ckpt"
    torch.save({"state_dict": raw, **LIGHTNING_STATE}, str(path))
    return Fixture(path, "sd", w, raw, None, logged=("loss.*", "pytorch-lightning_version"), container="zip-pickle")


class _NumpyScalarV1:
    """Pickles as numpy 1.x wrote a numpy scalar: numpy.core.multiarray.scalar(dtype, raw bytes)."""

    def __init__(self, value: float):
        self.value = value

    def __reduce__(self):
        import numpy as np

        return (_numpy_v1_scalar, (np.dtype("float64"), np.float64(self.value).tobytes()))


def _numpy_v1_scalar(dtype, data):  # only pickled by name, never called here
    raise AssertionError("never called")


_numpy_v1_scalar.__module__ = "numpy.core.multiarray"
_numpy_v1_scalar.__qualname__ = _numpy_v1_scalar.__name__ = "scalar"


def save_sd_era_lightning(obj, path: Path) -> None:
    """torch.save `obj` with pytorch_lightning's ModelCheckpoint class and numpy 1.x's scalar named in
    the pickle, as SD-era (Lightning 1.x, numpy 1.x) training wrote them; neither is imported."""
    fakes = {name: types.ModuleType(name) for name in
             ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")}
    mc = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks.model_checkpoint"})
    fakes["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = mc
    fakes["numpy.core.multiarray"] = types.ModuleType("numpy.core.multiarray")
    fakes["numpy.core.multiarray"].scalar = _numpy_v1_scalar
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        torch.save(obj(mc), str(path))
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


@layout
def kl_f4_lightning_ckpt(d: Path) -> Fixture:
    """CompVis/latent-diffusion `kl-f4/model.ckpt` as Lightning 1.x saved it: f = 4, 3 latent channels,
    loss.* beside the VAE, and `callbacks: {ModelCheckpoint: {..., best_model_score: numpy scalar}}`,
    the ModelCheckpoint class a dict key (the globals ComfyUI's comfy/utils.py allowlists for them)."""
    w = source_weights("kl_f4", seed=4)
    raw = {**_ldm(w), **_loss_keys()}
    path = d / "kl-f4-model.ckpt"
    save_sd_era_lightning(lambda mc: {
        "state_dict": raw, **LIGHTNING_STATE,
        "callbacks": {mc: {"monitor": "val/rec_loss", "best_model_score": _NumpyScalarV1(0.25),
                           "best_model_path": "logs/checkpoints/last.ckpt"}},
    }, path)
    # diffusers refuses it (its weights-only load does not allow these globals), as issue 11 saw
    return Fixture(path, "kl_f4", w, raw, None, logged=("loss.*", "callbacks"), container="zip-pickle",
                   diffusers_reads=False)


@layout
def a1111_vae_pt(d: Path) -> Fixture:
    """An A1111-style `*.vae.pt` (e.g. kl-f8-anime2.vae.pt, Anything-V3.0.vae.pt): the training dict
    flat, no state_dict wrapper, VAE + loss.* + model_ema.* (A1111 takes `state_dict` or the dict
    itself, modules/sd_vae.py); written in torch's legacy (pre-1.6) pickle format."""
    w = source_weights("sd", seed=5)
    raw = {**_ldm(w), **_loss_keys(), **EMA_KEYS}
    path = d / "anime.vae.pt"
    torch.save(raw, str(path), _use_new_zipfile_serialization=False)
    return Fixture(path, "sd", w, raw, None, logged=("loss.*", "model_ema.*"), container="pickle")


# -- stored dtypes ----------------------------------------------------------------------------------


def _float8_fixture(d: Path, dtype: torch.dtype, name: str, seed: int, scaled: bool) -> Fixture:
    w = source_weights("sd", seed=seed)
    ldm = _ldm(w)
    raw: StateDict = {}
    for k, v in ldm.items():
        if scaled and k.endswith(".weight") and v.ndim >= 2:
            # ComfyUI's scaled fp8: weight stored divided by a per-tensor scale, input scale beside it
            scale = (v.abs().max() / torch.finfo(dtype).max * 4).clamp(min=1e-12).to(torch.float32)
            raw[k] = (v / scale).to(dtype)
            raw[k[: -len("weight")] + "scale_weight"] = scale
            raw[k[: -len("weight")] + "scale_input"] = torch.ones(())
        else:
            raw[k] = v.to(dtype)
    if scaled:
        raw["scaled_fp8"] = torch.zeros(0, dtype=dtype)
    # what ComfyUI computes with: weight.to(float32) * scale_weight (comfy/ops.py), in diffusers' names
    upcast = {k: v.to(torch.float32) * raw.get(k[: -len("weight")] + "scale_weight", torch.ones(()))
              for k, v in raw.items() if k in ldm}
    path = d / name
    save_file(raw, str(path))
    # diffusers drops ComfyUI's scale tensors and computes with the scaled-down weights
    return Fixture(path, "sd", diffusers_view(upcast, "sd"), raw, None, logged=("float8",), diffusers_reads=not scaled)


@layout
def float8_e4m3fn(d: Path) -> Fixture:
    """A VAE stored in float8_e4m3fn (LDM keys, every tensor float8), as a whole checkpoint saved with
    an fp8 weight dtype carries it; diffusers and ComfyUI upcast such tensors on load (issue 11)."""
    return _float8_fixture(d, torch.float8_e4m3fn, "vae_fp8_e4m3fn.safetensors", 6, scaled=False)


@layout
def float8_e5m2(d: Path) -> Fixture:
    """The same in float8_e5m2."""
    return _float8_fixture(d, torch.float8_e5m2, "vae_fp8_e5m2.safetensors", 7, scaled=False)


@layout
def float8_scaled_comfy(d: Path) -> Fixture:
    """ComfyUI's scaled fp8 layout (comfy/ops.py scaled_fp8_ops, comfy/model_detection.py): a
    `scaled_fp8` marker, `<layer>.scale_weight` (weight stored divided by it) and `<layer>.scale_input`
    beside each float8 weight."""
    return _float8_fixture(d, torch.float8_e4m3fn, "vae_fp8_scaled.safetensors", 8, scaled=True)


# -- the container is read from the bytes ---------------------------------------------------------------


@layout
def zip_named_safetensors(d: Path) -> Fixture:
    """A torch zip checkpoint renamed `.safetensors` (a download saved under the wrong name):
    torch 2.14's torch.load(path) would hand it to safetensors by its name."""
    w = source_weights("sd", seed=9)
    raw = _ldm(w)
    path = d / "renamed_ckpt.safetensors"
    torch.save({"state_dict": raw}, str(path))
    return Fixture(path, "sd", w, raw, None, container="zip-pickle", diffusers_reads=False)  # it goes by the name


@layout
def safetensors_named_ckpt(d: Path) -> Fixture:
    """safetensors bytes under a `.ckpt` name."""
    w = source_weights("sd", seed=10)
    raw = _ldm(w)
    path = d / "renamed_safetensors.ckpt"
    save_file(raw, str(path))
    return Fixture(path, "sd", w, raw, None, diffusers_reads=False)  # diffusers goes by the name


# -- FLUX.1 ---------------------------------------------------------------------------------------------


@layout
def flux_ae_fp32(d: Path) -> Fixture:
    """black-forest-labs/FLUX.1-dev `ae.safetensors`: LDM keys, no quant convs, 16 latent channels, fp32."""
    w = source_weights("flux", seed=11)
    raw = _ldm(w)
    path = d / "ae.safetensors"
    save_file(raw, str(path))
    return Fixture(path, "flux", w, raw, None)


@layout
def flux_ae_bf16(d: Path) -> Fixture:
    """The same `ae.safetensors` in bfloat16, as FLUX.1-schnell repacks and ComfyUI saves it."""
    stored, w = _stored(source_weights("flux", seed=12), torch.bfloat16)
    raw = _ldm(stored)
    path = d / "ae_bf16.safetensors"
    save_file(raw, str(path))
    return Fixture(path, "flux", w, raw, None)


def _flux_all_in_one(d: Path, name: str, seed: int, vae_dtype: Optional[torch.dtype]) -> Fixture:
    w = source_weights("flux", seed=seed)
    vae = _ldm(w)
    if vae_dtype is not None:
        vae = {k: v.to(vae_dtype) for k, v in vae.items()}
        w = diffusers_view({k: v.to(torch.float32) for k, v in vae.items()}, "flux")
    raw = {**{f"vae.{k}": v for k, v in vae.items()}, **_others(FLUX_NEIGHBOURS, torch.float8_e4m3fn)}
    raw["model.diffusion_model.scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    path = d / name
    save_file(raw, str(path))
    return Fixture(path, "flux", w, raw, "flux", reason="FLUX", vae_prefix="vae.",
                   logged=("float8",) if vae_dtype is not None else ())


@layout
def flux_fp8_all_in_one(d: Path) -> Fixture:
    """Comfy-Org/flux1-dev `flux1-dev-fp8.safetensors`: the transformer in float8 under
    model.diffusion_model. (double_blocks/single_blocks), CLIP-L and T5 under text_encoders., the VAE
    in fp32 under `vae.` (ComfyUI's supported_models.Flux vae_key_prefix)."""
    return _flux_all_in_one(d, "flux1-dev-fp8.safetensors", 13, None)


@layout
def flux_fp8_all_in_one_fp8_vae(d: Path) -> Fixture:
    """The same all-in-one with the VAE itself cast to float8_e4m3fn (ComfyUI's checkpoint save with an
    fp8 weight dtype)."""
    return _flux_all_in_one(d, "flux1-dev-fp8-vae-fp8.safetensors", 14, torch.float8_e4m3fn)


# -- full checkpoints ----------------------------------------------------------------------------------


def _full(d: Path, name: str, arch: str, seed: int, neighbours, family: str, reason: str,
          metadata: Optional[dict] = None, extra: Optional[StateDict] = None, dtype=torch.float16) -> Fixture:
    stored, w = _stored(source_weights(arch, seed=seed), dtype)
    raw = {**{f"first_stage_model.{k}": v for k, v in _ldm(stored).items()}, **_others(neighbours), **(extra or {})}
    path = d / name
    save_file(raw, str(path), metadata=metadata)
    return Fixture(path, arch, w, raw, family, reason=reason, vae_prefix="first_stage_model.")


@layout
def sd15_full_checkpoint(d: Path) -> Fixture:
    """runwayml/stable-diffusion-v1-5 `v1-5-pruned-emaonly.safetensors`: first_stage_model. beside the
    UNet (model.diffusion_model.), CLIP (cond_stage_model.) and the schedule buffers, fp16."""
    return _full(d, "v1-5-pruned-emaonly.safetensors", "sd", 15, SD1_NEIGHBOURS, "sd1", "SD1.x/2.x UNet")


@layout
def sd15_full_ckpt_with_ema(d: Path) -> Fixture:
    """The same model's `v1-5-pruned.ckpt`: {state_dict: ... + model_ema.* (the UNet's EMA, flattened
    names, and decay/num_updates), global_step}, fp32 zip checkpoint."""
    w = source_weights("sd", seed=16)
    raw = {**{f"first_stage_model.{k}": v for k, v in _ldm(w).items()}, **_others(SD1_NEIGHBOURS, torch.float32),
           **EMA_KEYS, "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(2, 2)}
    path = d / "v1-5-pruned.ckpt"
    torch.save({"state_dict": raw, "global_step": 840000}, str(path))
    return Fixture(path, "sd", w, raw, "sd1", reason="SD1.x/2.x UNet", vae_prefix="first_stage_model.",
                   container="zip-pickle", logged=("global_step",))


@layout
def sdxl_base_full_checkpoint(d: Path) -> Fixture:
    """stabilityai/stable-diffusion-xl-base-1.0 `sd_xl_base_1.0.safetensors`: first_stage_model. beside
    the UNet (label_emb) and conditioner.embedders.0 (CLIP-L) / .1 (OpenCLIP bigG)."""
    return _full(d, "sd_xl_base_1.0.safetensors", "sd", 17, SDXL_NEIGHBOURS, "sdxl", "SDXL")


@layout
def sdxl_refiner_full_checkpoint(d: Path) -> Fixture:
    """stabilityai/stable-diffusion-xl-refiner-1.0 `sd_xl_refiner_1.0.safetensors`: only
    conditioner.embedders.0 (OpenCLIP bigG), the UNet with label_emb."""
    return _full(d, "sd_xl_refiner_1.0.safetensors", "sd", 18, SDXL_REFINER_NEIGHBOURS, "sdxl", "SDXL")


@layout
def sd3_medium_full_checkpoint(d: Path) -> Fixture:
    """stabilityai/stable-diffusion-3-medium `sd3_medium_incl_clips_t5xxlfp8.safetensors`: first_stage_model.
    beside the MMDiT (model.diffusion_model.joint_blocks) and text_encoders.clip_l/clip_g/t5xxl; no metadata."""
    return _full(d, "sd3_medium_incl_clips.safetensors", "flux", 19, SD3_NEIGHBOURS, "sd3", "MMDiT")


@layout
def sd3_comfy_saved_modelspec(d: Path) -> Fixture:
    """A checkpoint ComfyUI's CheckpointSave wrote from SD3 (comfy_extras/nodes_model_merging.py:
    modelspec.architecture = "stable-diffusion-v3-medium"). The modelspec decides, before the weights."""
    return _full(d, "ComfyUI_sd3_00001_.safetensors", "flux", 20, SD3_NEIGHBOURS, "sd3", "modelspec",
                 metadata={"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v3-medium",
                           "modelspec.implementation": "sgm"})


@layout
def sd35_large_modelspec(d: Path) -> Fixture:
    """stabilityai/stable-diffusion-3.5-large `sd3.5_large.safetensors`: modelspec.architecture
    "stable-diffusion-v3.5-large"; here without the MMDiT, so only the modelspec can decide."""
    return _full(d, "sd3.5_large_vae_only.safetensors", "flux", 21, (), "sd3", "modelspec",
                 metadata={"modelspec.architecture": "stable-diffusion-v3.5-large"})


# Playground v2.5's published VAE statistics (playgroundai/playground-v2.5-1024px-aesthetic
# vae/config.json latents_mean/latents_std), stored in its single file as edm_mean/edm_std (1, 4, 1, 1).
PLAYGROUND_MEAN = (-1.6574, 1.886, -1.383, 2.5155)
PLAYGROUND_STD = (8.4927, 5.9022, 6.5498, 5.2299)


@layout
def playground_v25_single_file(d: Path) -> Fixture:
    """playgroundai/playground-v2.5-1024px-aesthetic `playground-v2.5-1024px-aesthetic.fp16.safetensors`:
    an SDXL-layout single file (first_stage_model., SDXL UNet and conditioner) with top-level
    edm_mean/edm_std; diffusers' single_file_utils detects "playground-v2-5" by edm_mean, ComfyUI's
    supported_models.SDXL switches to SDXL_Playground_2_5 on both."""
    extra = {"edm_mean": torch.tensor(PLAYGROUND_MEAN).view(1, 4, 1, 1),
             "edm_std": torch.tensor(PLAYGROUND_STD).view(1, 4, 1, 1)}
    f = _full(d, "playground-v2.5-1024px-aesthetic.fp16.safetensors", "sd", 22, SDXL_NEIGHBOURS,
              "playground-v2-5", "edm_mean", extra=extra)
    f.latents_mean = PLAYGROUND_MEAN
    return f


# -- diffusers layouts -------------------------------------------------------------------------------


def _old_diffusers_names(sd: StateDict) -> StateDict:
    """Pre-0.14 diffusers attention names (query/key/value/proj_attn), as diffusers' own
    _convert_deprecated_attention_blocks (models/modeling_utils.py) still maps them."""
    out = {}
    for k, v in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        out[k] = v
    return out


def _config_json(folder: Path, arch: str) -> None:
    cfg = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.12.0", **ARCHS[arch], "sample_size": 512,
           "scaling_factor": 0.18215}
    (folder / "config.json").write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}))


@layout
def diffusers_folder_pre014_names(d: Path) -> Fixture:
    """stabilityai/sd-vae-ft-mse as first uploaded (diffusers < 0.14): config.json +
    diffusion_pytorch_model.bin with mid_block.attentions.0.query/key/value/proj_attn."""
    w = source_weights("sd", seed=23)
    raw = _old_diffusers_names(w)
    folder = d / "sd-vae-ft-mse-old"
    folder.mkdir()
    _config_json(folder, "sd")
    torch.save(raw, str(folder / "diffusion_pytorch_model.bin"))
    return Fixture(folder, "sd", w, raw, None, reason="config.json", container="zip-pickle", ldm=False)


@layout
def diffusers_names_pre014_single_file(d: Path) -> Fixture:
    """The same pre-0.14 weights saved as one .safetensors (the old diffusion_pytorch_model converted
    and renamed, as shared on Civitai)."""
    w = source_weights("sd", seed=24)
    raw = _old_diffusers_names(w)
    path = d / "sd-vae-ft-mse-diffusers-old.safetensors"
    save_file(raw, str(path))
    # diffusers' from_single_file does not rename pre-0.14 attention keys (it fails on them)
    return Fixture(path, "sd", w, raw, None, ldm=False, diffusers_reads=False)


@layout
def diffusers_folder_fp16_only(d: Path) -> Fixture:
    """A diffusers pipeline's vae/ folder with only diffusion_pytorch_model.fp16.safetensors (the fp16
    variant of e.g. stabilityai/stable-diffusion-xl-base-1.0/vae, downloaded alone)."""
    stored, w = _stored(source_weights("sd", seed=25), torch.float16)
    folder = d / "sdxl-base-vae-fp16"
    folder.mkdir()
    _config_json(folder, "sd")
    save_file(stored, str(folder / "diffusion_pytorch_model.fp16.safetensors"))
    return Fixture(folder, "sd", w, stored, None, reason="config.json", ldm=False)


# -- mid-block attention as linear or 1x1 conv -------------------------------------------------------


@layout
def ldm_linear_attention(d: Path) -> Fixture:
    """An LDM single file whose mid attention q/k/v/proj_out are linear (C, C), the shape diffusers
    stores them in, kept by converters that rename keys without reshaping (ComfyUI's
    diffusers_convert.reshape_weight_for_sd and diffusers' conv_attn_to_linear exist to bridge both)."""
    w = source_weights("sd", seed=26)
    raw = {k: (v[:, :, 0, 0].contiguous() if ".attn_1." in k and v.ndim == 4 else v) for k, v in _ldm(w).items()}
    path = d / "vae_linear_attn.safetensors"
    save_file(raw, str(path))
    return Fixture(path, "sd", w, raw, None)


@layout
def ldm_conv_attention(d: Path) -> Fixture:
    """The original CompVis layout: mid attention q/k/v/proj_out as 1x1 convs (C, C, 1, 1), fp16
    (stabilityai/sd-vae-ft-ema-original vae-ft-ema-560000-ema-pruned as ComfyUI users cast it)."""
    stored, w = _stored(source_weights("sd", seed=27), torch.float16)
    raw = _ldm(stored)
    assert raw["encoder.mid.attn_1.q.weight"].ndim == 4
    path = d / "vae_conv_attn_fp16.safetensors"
    save_file(raw, str(path))
    return Fixture(path, "sd", w, raw, None)
