"""Every published VAE layout in the zoo (layout_zoo.py) loads, gets its family, and decodes as diffusers'
AutoencoderKL does with the same weights; and what is ignored stays narrow (not strict=False)."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core_helpers import assert_close_fp32
from layout_zoo import ARCHS, LAYOUTS, PLAYGROUND_MEAN, diffusers_view, source_weights
from vae_core import AutoencoderKL, convert, loading
from vae_core.latent_formats import get_family
from vae_core.loading import VAELoadError

diffusers = pytest.importorskip("diffusers")


def _load(fixture):
    if fixture.path.is_dir():
        # as diffusers: a folder of only variant files loads when variant= names it (the node does so itself)
        return AutoencoderKL.from_pretrained(fixture.path, torch_dtype=fixture.torch_dtype,
                                             variant=loading.only_variant(fixture.path))
    return AutoencoderKL.from_single_file(fixture.path, torch_dtype=fixture.torch_dtype)


def _diffusers_reads(fixture, config_dir: Path):
    """The state dict diffusers' AutoencoderKL.from_single_file / from_pretrained makes of the file
    (from_single_file given a local diffusers config, so nothing is fetched)."""
    import json

    if fixture.path.is_dir():
        fp16_only = not any(fixture.path.glob("diffusion_pytorch_model.safetensors")) and \
            any(fixture.path.glob("diffusion_pytorch_model.fp16.safetensors"))
        model = diffusers.AutoencoderKL.from_pretrained(fixture.path, variant="fp16" if fp16_only else None,
                                                        torch_dtype=torch.float32)
    else:
        config_dir.mkdir(exist_ok=True)
        cfg = {"_class_name": "AutoencoderKL", **{k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in fixture.config.items()}}
        (config_dir / "config.json").write_text(json.dumps(cfg))
        model = diffusers.AutoencoderKL.from_single_file(str(fixture.path), config=str(config_dir),
                                                         torch_dtype=torch.float32)
    return model.state_dict()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_loads_with_its_family_and_decodes_like_diffusers(name, tmp_path, caplog):
    fixture = LAYOUTS[name](tmp_path)
    with caplog.at_level(logging.INFO, logger="vae_core"):
        model = _load(fixture)
    info = model.info
    assert info["container"] == fixture.container
    assert info["family"] == fixture.family, info
    if fixture.reason:
        assert fixture.reason in info["family_reason"], info
    if fixture.family is not None:
        fam = get_family(fixture.family)
        assert model.config.scaling_factor == fam.scaling_factor
        assert model.config.shift_factor == fam.shift_factor
    else:  # tiny widths match no published family: diffusers' default scaling, and no ambiguity warning
        assert model.config.scaling_factor == 0.18215 and model.config.shift_factor is None
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "assumed" in r.getMessage()]
    if fixture.latents_mean is not None:
        assert model.config.latents_mean == pytest.approx(fixture.latents_mean)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("vae_core")]
    for words in fixture.logged:
        assert any(words in m and fixture.path.name in m for m in messages), (words, messages)

    if fixture.ldm:  # the file's keys are a real LDM layout: diffusers' own converter maps them to the same set
        vae = {k[len(fixture.vae_prefix):]: v for k, v in fixture.raw.items() if k.startswith(fixture.vae_prefix)}
        mapped = {k: v for k, v in diffusers_view(vae, fixture.arch).items()
                  if not k.endswith((".scale_weight", ".scale_input"))}  # it carries ComfyUI's fp8 scales along
        assert {k: tuple(v.shape[:2]) for k, v in mapped.items()} == \
               {k: tuple(v.shape[:2]) for k, v in fixture.weights.items()}

    if fixture.diffusers_reads:  # diffusers' own loader reads the same weights from the same file
        read = _diffusers_reads(fixture, tmp_path / "diffusers_config")
        assert set(read) == set(fixture.weights)
        for key, value in fixture.weights.items():
            assert torch.equal(read[key].to(torch.float32), value), key

    ref = diffusers.AutoencoderKL(**fixture.config).eval()
    ref.load_state_dict(fixture.weights, strict=True)
    z = torch.randn(1, ARCHS[fixture.arch]["latent_channels"], 4, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close_fp32(model.decode(z).sample, ref.decode(z).sample)


# -- the published widths: shapes alone decide, with the documented warning -----------------------------


def _published_width_file(path: Path, latent_channels: int, quant: bool) -> None:
    """A real-width VAE (128/256/512/512; one resnet per level, which the rule does not read) with zero
    weights, LDM keys, fp16: shapes are all it tells."""
    with torch.device("meta"):
        meta = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                       up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
                                       latent_channels=latent_channels, use_quant_conv=quant, use_post_quant_conv=quant)
    sd = {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in meta.state_dict().items()}
    save_file({k: v.contiguous() for k, v in convert.diffusers_to_ldm(sd).items()}, str(path))


@pytest.mark.parametrize("name,channels,quant,family,alternative", [
    ("vae-ft-mse-840000-ema-pruned.safetensors", 4, True, "sd1", "sdxl"),
    ("ae.safetensors", 16, False, "flux", "sd3"),
])
def test_standalone_files_at_published_widths_warn_about_the_shared_shape(tmp_path, caplog, name, channels, quant,
                                                                          family, alternative):
    path = tmp_path / name
    _published_width_file(path, channels, quant)
    with caplog.at_level(logging.WARNING, logger="vae_core"):
        model = AutoencoderKL.from_single_file(path)
    assert model.info["family"] == family
    assert model.config.scaling_factor == get_family(family).scaling_factor
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(name in w and f"family='{alternative}'" in w for w in warnings), warnings


# -- what is ignored stays narrow ------------------------------------------------------------------------


def _ldm_with(tmp_path, extra, drop=(), name="v.safetensors"):
    sd = {k: v.contiguous() for k, v in convert.diffusers_to_ldm(source_weights("sd")).items()}
    for k in drop:
        del sd[k]
    sd.update(extra)
    path = tmp_path / name
    save_file(sd, str(path))
    return path


def test_training_leftovers_are_not_strict_false(tmp_path):
    ema = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7, dtype=torch.int32)}
    loss = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.3.num_batches_tracked": torch.tensor(3)}
    # a VAE key missing beside the leftovers is still an error naming it
    with pytest.raises(VAELoadError, match=r"missing keys: 'decoder\.mid_block\.resnets\.1\.norm1\.bias'"):
        AutoencoderKL.from_single_file(_ldm_with(tmp_path, ema, drop=["decoder.mid.block_2.norm1.bias"], name="a.safetensors"),
                                       config=ARCHS["sd"])
    # any other unknown key is still an error, leftovers or not
    with pytest.raises(VAELoadError, match=r"unrecognised LDM VAE keys: 'encoder\.down\.0\.block\.0\.gamma'"):
        AutoencoderKL.from_single_file(_ldm_with(tmp_path, {**ema, "encoder.down.0.block.0.gamma": torch.zeros(8)},
                                                 name="b.safetensors"))
    with pytest.raises(VAELoadError, match=r"unrecognised LDM VAE keys: 'model_emax\.decay'"):
        AutoencoderKL.from_single_file(_ldm_with(tmp_path, {"model_emax.decay": torch.zeros(())}, name="c.safetensors"))
    # a file of another model with training leftovers is refused with the usual message
    unet = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2), **ema, **loss}, str(unet))
    with pytest.raises(VAELoadError, match="diffusion model") as err:
        AutoencoderKL.from_single_file(unet)
    assert "unet.safetensors" in str(err.value) and "no VAE weights" in str(err.value)
    only = tmp_path / "only_leftovers.safetensors"
    save_file({**ema, **loss}, str(only))
    with pytest.raises(VAELoadError, match="no VAE weights"):
        AutoencoderKL.from_single_file(only)


def test_float8_scales_that_cannot_be_applied_are_errors(tmp_path):
    weight = "decoder.conv_out.weight"
    blockwise = _ldm_with(tmp_path, {"decoder.conv_out.scale_weight": torch.ones(3, 1)}, name="blockwise.safetensors")
    with pytest.raises(VAELoadError, match=r"blockwise\.safetensors.*decoder\.conv_out\.weight: its scale has shape \(3, 1\)"):
        AutoencoderKL.from_single_file(blockwise)
    orphan = _ldm_with(tmp_path, {"decoder.nothing.scale_weight": torch.ones(())}, name="orphan.safetensors")
    with pytest.raises(VAELoadError, match=r"weight scales without their weight: 'decoder\.nothing\.weight'"):
        AutoencoderKL.from_single_file(orphan)
    # a float8 file asked for in bfloat16 is upcast and cast to it
    sd = {k: v.to(torch.float8_e4m3fn) for k, v in convert.diffusers_to_ldm(source_weights("sd")).items()}
    path = tmp_path / "fp8.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = AutoencoderKL.from_single_file(path, torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.state_dict()[weight], sd[weight].to(torch.float32).to(torch.bfloat16))


def test_integer_weights_message_says_what_is_accepted(tmp_path):
    path = _ldm_with(tmp_path, {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3, dtype=torch.int8)})
    with pytest.raises(VAELoadError) as err:
        AutoencoderKL.from_single_file(path)
    msg = str(err.value)
    assert "floating point" in msg and "float8, which is upcast" in msg and "torch.int8" in msg
    assert "'encoder.conv_in.weight'" in msg and "v.safetensors" in msg


# -- pickles -----------------------------------------------------------------------------------------


class _Exploit:
    """The classic payload: unpickling it would run a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


class _Payload:
    """Any class of the saving program: torch names it as an unsupported global."""


@pytest.mark.parametrize("payload,named", [
    ("os.system", "GLOBAL posix.system"),  # torch blocks the module outright
    ("class", f"Unsupported global: GLOBAL {__name__}._Payload"),
])
def test_a_refused_pickle_names_the_unsupported_global_and_runs_nothing(tmp_path, payload, named):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    obj = _Exploit(marker) if payload == "os.system" else _Payload()
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "x": obj}, str(evil))
    with pytest.raises(VAELoadError) as err:
        AutoencoderKL.from_single_file(evil)
    msg = str(err.value)
    assert "evil.ckpt" in msg and "refused" in msg and "weights_only" in msg
    assert named in msg, msg
    assert "add_safe_globals" not in msg, "torch's advice to allowlist the global must not be passed on"
    assert not marker.exists(), "the pickle's code ran"


def test_lightning_globals_are_allowed_only_while_reading_and_keep_the_hosts(tmp_path):
    import numpy as np

    fixture = LAYOUTS["kl_f4_lightning_ckpt"](tmp_path)
    torch.serialization.add_safe_globals([np.dtype])  # as the host does at import
    try:
        AutoencoderKL.from_single_file(fixture.path)
        assert np.dtype in torch.serialization.get_safe_globals(), "reading removed a global the host added"
    finally:
        torch.serialization.clear_safe_globals()
    with pytest.raises(pickle.UnpicklingError, match="ModelCheckpoint"):  # nothing leaked out of the read
        torch.load(fixture.path, weights_only=True)


def test_the_numpy_scalar_stand_in_builds_numbers_only():
    import numpy as np

    assert loading._numpy_scalar(np.dtype("float64"), np.float64(0.25).tobytes()) == 0.25
    with pytest.raises(pickle.UnpicklingError, match="only numeric scalars"):
        loading._numpy_scalar(np.dtype("O"), bytes(8))
    with pytest.raises(pickle.UnpicklingError):
        loading._numpy_scalar(np.dtype("float64"), bytes(3))


# -- Playground v2.5 and modelspec ------------------------------------------------------------------


def test_playground_family_by_name_or_metadata(tmp_path):
    path = _ldm_with(tmp_path, {})
    model = AutoencoderKL.from_single_file(path, family="playground-v2-5")
    assert model.config.scaling_factor == 0.5 and model.config.latents_mean == pytest.approx(PLAYGROUND_MEAN)
    # a standalone VAE with edm_mean/edm_std beside its keys: they are family markers, and its statistics
    mean, std = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    marked = _ldm_with(tmp_path, {"edm_mean": mean.view(1, 4, 1, 1), "edm_std": std.view(1, 4, 1, 1)},
                       name="marked.safetensors")
    model = AutoencoderKL.from_single_file(marked)
    assert model.info["family"] == "playground-v2-5" and model.config.scaling_factor == 0.5
    assert model.config.latents_mean == pytest.approx(mean.tolist())
    assert model.config.latents_std == pytest.approx(std.tolist())
    cfg = convert.infer_config(source_weights("sd"))
    for arch, family in [("playground-v2.5-1024px-aesthetic", "playground-v2-5"),
                         ("stable-diffusion-v3-medium", "sd3"), ("stable-diffusion-v3.5-large", "sd3"),
                         ("stable-diffusion-v3.5-large-turbo", "sd3"), ("stable-diffusion-v3.5-medium", "sd3"),
                         ("stable-diffusion-xl-v1-refiner", "sdxl"), ("stable-diffusion-v2-768-v", "sd1"),
                         ("Flux.1-dev", "flux")]:
        assert convert.detect_family(cfg, metadata={"modelspec.architecture": arch})[0] == family, arch
    # edm_mean/edm_std beside the weights win over a modelspec that says SDXL
    full = {"edm_mean": torch.zeros(1, 4, 1, 1), "edm_std": torch.ones(1, 4, 1, 1)}
    assert convert.detect_family(cfg, full, {"modelspec.architecture": "stable-diffusion-xl-v1-base"})[0] == \
        "playground-v2-5"


def test_a_playground_config_json_names_its_family():
    from vae_core import AutoencoderKLConfig

    base = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
    playground = AutoencoderKLConfig(**base, scaling_factor=0.5, latents_mean=PLAYGROUND_MEAN,
                                     latents_std=(8.4927, 5.9022, 6.5498, 5.2299))
    assert loading._family_from_config(playground)[0] == "playground-v2-5"
    assert loading._family_from_config(AutoencoderKLConfig(**base, scaling_factor=0.5))[0] is None
    assert loading._family_from_config(AutoencoderKLConfig(**base, scaling_factor=0.13025))[0] == "sdxl"


def test_comfy_mixed_precision_scale_names_dequantize_too():
    """ComfyUI's newer per-layer quantisation (comfy/ops.py MixedPrecisionOps) names the scales
    `weight_scale` / `input_scale`; the result is weight * scale in float32, the scales consumed."""
    w = torch.randn(4, 4, 3, 3)
    scale = torch.tensor(0.01)
    stored = (w / scale).to(torch.float8_e4m3fn)
    out, upcast = convert.dequantize_float8({"decoder.conv_in.weight": stored, "decoder.conv_in.weight_scale": scale,
                                             "decoder.conv_in.input_scale": torch.tensor(1.0),
                                             "decoder.conv_in.bias": torch.zeros(4, dtype=torch.bfloat16)})
    assert upcast == 1 and set(out) == {"decoder.conv_in.weight", "decoder.conv_in.bias"}
    assert out["decoder.conv_in.weight"].dtype == torch.float32
    assert torch.equal(out["decoder.conv_in.weight"], stored.to(torch.float32) * scale)
    assert out["decoder.conv_in.bias"].dtype == torch.bfloat16  # non-float8 tensors are left as stored
