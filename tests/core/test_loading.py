"""Loading and saving: diffusers folders, LDM single files, full checkpoints, config inference,
family recognition, and the errors bad files must give."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core_helpers import CONFIGS, assert_close_fp32, make_pair

from vae_core import AutoencoderKL, AutoencoderKLConfig
from vae_core import convert
from vae_core.loading import VAELoadError, read_state_dict


def _tiny(name="sd_layout", seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(**CONFIGS[name]).eval()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# -- key conversion ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ldm_round_trip_is_lossless(name):
    sd = _tiny(name).state_dict()
    ldm = convert.diffusers_to_ldm(sd)
    assert "encoder.down.0.block.0.conv1.weight" in ldm
    assert all(not k.startswith("encoder.down_blocks") for k in ldm)
    back = convert.ldm_to_diffusers(ldm)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_ldm_decoder_levels_are_reversed_and_attention_is_conv():
    sd = _tiny("sd_layout").state_dict()
    ldm = convert.diffusers_to_ldm(sd)
    # LDM's decoder.up.0 is the full-resolution level, diffusers' up_blocks.3
    assert torch.equal(ldm["decoder.up.0.block.0.conv1.weight"], sd["decoder.up_blocks.3.resnets.0.conv1.weight"])
    assert "decoder.up.3.upsample.conv.weight" in ldm and "decoder.up.0.upsample.conv.weight" not in ldm
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert "encoder.down.0.block.0.nin_shortcut.weight" not in ldm
    assert "encoder.down.1.block.0.nin_shortcut.weight" in ldm


def test_linear_attention_and_old_diffusers_names_load():
    m = _tiny()
    ldm = convert.diffusers_to_ldm(m.state_dict())
    for part in "qkv":
        key = f"decoder.mid.attn_1.{part}.weight"
        ldm[key] = ldm[key][:, :, 0, 0]  # some exports store the projections as linear weights
    sd = convert.ldm_to_diffusers(ldm)
    assert torch.equal(sd["decoder.mid_block.attentions.0.to_q.weight"], m.state_dict()["decoder.mid_block.attentions.0.to_q.weight"])
    old = {k.replace("to_q", "query").replace("to_out.0", "proj_attn"): v for k, v in m.state_dict().items()}
    upgraded = convert.upgrade_old_diffusers_keys(old)
    assert set(upgraded) == set(m.state_dict())


def _inferable(name, seed=0):
    """A tiny model whose norm_num_groups follows the documented inference rule (shapes cannot
    show GroupNorm's group count: the rule takes the largest divisor of the widths' gcd up to 32)."""
    torch.manual_seed(seed)
    return AutoencoderKL(**{**CONFIGS[name], "norm_num_groups": 8}).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_inference_recovers_the_architecture(name):
    m = _inferable(name)
    cfg = convert.infer_config(m.state_dict())
    for field in ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels",
                  "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "norm_num_groups"):
        assert getattr(cfg, field) == getattr(m.config, field), field


def test_family_recognition_rules():
    sd_shape = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
    sd1 = AutoencoderKLConfig(**sd_shape)
    flux = AutoencoderKLConfig(**sd_shape, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    assert convert.detect_family(sd1)[0] == "sd1"
    assert "sdxl" in convert.detect_family(sd1)[1], "the reason must say SDXL shares the shape"
    assert convert.detect_family(flux)[0] == "flux"
    assert convert.detect_family(sd1, {"conditioner.embedders.1.model.ln_final.weight": 0})[0] == "sdxl"
    assert convert.detect_family(flux, {"model.diffusion_model.joint_blocks.0.x": 0})[0] == "sd3"
    assert convert.detect_family(flux, {"model.diffusion_model.double_blocks.0.x": 0})[0] == "flux"
    assert convert.detect_family(sd1, metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/vae"})[0] == "sdxl"
    assert convert.detect_family(AutoencoderKLConfig(**CONFIGS["sd_layout"]))[0] is None


# -- single files --------------------------------------------------------------------------


def test_single_file_round_trip_gives_identical_tensors(tmp_path, config_name):
    m = _tiny(config_name)
    path = tmp_path / "vae.safetensors"
    m.save_single_file(path)
    loaded = AutoencoderKL.from_single_file(path)
    _same_weights(loaded, m)
    assert loaded.config.to_dict() == m.config.to_dict()
    assert loaded.info["layout"] == "ldm" and loaded.info["container"] == "safetensors"


def test_group_count_comes_from_the_rule_or_the_config(tmp_path):
    m = _tiny("sd_layout")  # 4 groups: not what the rule infers
    assert convert.infer_config(m.state_dict()).norm_num_groups == 8
    ldm = {k: v.contiguous() for k, v in convert.diffusers_to_ldm(m.state_dict()).items()}
    save_file(ldm, str(tmp_path / "plain.safetensors"))
    loaded = AutoencoderKL.from_single_file(tmp_path / "plain.safetensors", config=m.config)
    assert loaded.config.norm_num_groups == 4
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, m(x).sample)


def test_single_file_without_metadata_infers_config(tmp_path):
    m = _inferable("sd_layout")
    ldm = {k: v.contiguous() for k, v in convert.diffusers_to_ldm(m.state_dict()).items()}
    save_file(ldm, str(tmp_path / "plain.safetensors"))
    loaded = AutoencoderKL.from_single_file(tmp_path / "plain.safetensors")
    assert loaded.info["config_origin"] == "inferred from shapes"
    _same_weights(loaded, m)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, m(x).sample)


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae."])
@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".safetensors"])
def test_full_checkpoints_and_pickles(tmp_path, prefix, suffix):
    m = _tiny("sd_layout")
    ldm = convert.diffusers_to_ldm(m.state_dict())
    full = {prefix + k: v.contiguous() for k, v in ldm.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    full["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(full, str(path))
    else:
        torch.save({"state_dict": full, "global_step": 3}, str(path))
    loaded = AutoencoderKL.from_single_file(path, config=CONFIGS["sd_layout"])
    _same_weights(loaded, m)
    assert loaded.info["prefix"] == prefix


def test_diffusers_layout_single_file_and_family_override(tmp_path):
    m = _tiny("sd_layout")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "d.safetensors"))
    loaded = AutoencoderKL.from_single_file(tmp_path / "d.safetensors", family="sdxl")
    assert loaded.config.scaling_factor == 0.13025
    assert loaded.info["family"] == "sdxl" and loaded.info["layout"] == "diffusers"
    flux = AutoencoderKL.from_single_file(tmp_path / "d.safetensors", family="flux")
    assert (flux.config.scaling_factor, flux.config.shift_factor) == (0.3611, 0.1159)
    with pytest.raises(ValueError, match="unknown model family"):
        AutoencoderKL.from_single_file(tmp_path / "d.safetensors", family="sd4")


def test_torch_dtype(tmp_path):
    m = _tiny()
    m.save_single_file(tmp_path / "v.safetensors")
    half = AutoencoderKL.from_single_file(tmp_path / "v.safetensors", torch_dtype=torch.float16)
    assert half.dtype == torch.float16


# -- diffusers folders ---------------------------------------------------------------------


def test_pretrained_round_trip_and_diffusers_interop(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ref, ours = make_pair("flux_layout")
    ours.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "config.json").is_file()
    assert (tmp_path / "ours" / "diffusion_pytorch_model.safetensors").is_file()
    back = AutoencoderKL.from_pretrained(tmp_path / "ours")
    _same_weights(back, ours)
    assert back.config.to_dict() == ours.config.to_dict()
    # diffusers reads ours, we read diffusers'
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours")
    for k, v in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[k], v), k
    ref.save_pretrained(tmp_path / "ref")
    _same_weights(AutoencoderKL.from_pretrained(tmp_path / "ref"), ours)
    ref.save_pretrained(tmp_path / "ref16", variant="fp16")
    assert AutoencoderKL.from_pretrained(tmp_path / "ref16", variant="fp16").config.latent_channels == 16


def test_pretrained_variants_pipeline_folder_and_bin(tmp_path):
    m = _tiny()
    pipe = tmp_path / "pipeline"
    m.save_pretrained(pipe / "vae", variant="fp16")
    os.replace(pipe / "vae" / "diffusion_pytorch_model.fp16.safetensors",
               pipe / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(OSError, match="variant='fp16'"):  # as diffusers: the .fp16 file needs variant=
        AutoencoderKL.from_pretrained(pipe)
    _same_weights(AutoencoderKL.from_pretrained(pipe, variant="fp16"), m)  # finds vae/ and the .fp16 file
    _same_weights(AutoencoderKL.from_pretrained(pipe, subfolder="vae", variant="fp16"), m)
    m.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    _same_weights(AutoencoderKL.from_pretrained(tmp_path / "bin"), m)
    with pytest.raises(VAELoadError, match="no config.json"):
        AutoencoderKL.from_pretrained(tmp_path / "nowhere")


def test_loaded_model_computes_like_diffusers(tmp_path):
    ref, ours = make_pair("sd_layout")
    ours.save_single_file(tmp_path / "v.safetensors")
    loaded = AutoencoderKL.from_single_file(tmp_path / "v.safetensors")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert_close_fp32(loaded.encode(x).latent_dist.mean, ref.encode(x).latent_dist.mean)


# -- bad files -----------------------------------------------------------------------------


def _ldm_file(tmp_path, mutate=None, name="v.safetensors"):
    sd = {k: v.contiguous() for k, v in convert.diffusers_to_ldm(_tiny().state_dict()).items()}
    if mutate:
        mutate(sd)
    path = tmp_path / name
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("kind,keys,match", [
    ("UNet", ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight"], "diffusion model"),
    ("CLIP", ["text_model.encoder.layers.0.mlp.fc1.weight", "text_model.embeddings.position_ids"], "text encoder"),
    ("LoRA", ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "LoRA"),
])
def test_non_vae_files_are_refused(tmp_path, kind, keys, match):
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    with pytest.raises(VAELoadError, match=match) as err:
        AutoencoderKL.from_single_file(path)
    assert str(path) in str(err.value) and "no VAE weights" in str(err.value)


def test_truncated_and_corrupt_files(tmp_path):
    good = _ldm_file(tmp_path)
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VAELoadError, match="cut.safetensors") as err:
        AutoencoderKL.from_single_file(cut)
    assert "truncated" in str(err.value) or "corrupt" in str(err.value)
    short_header = tmp_path / "hdr.safetensors"
    short_header.write_bytes(data[:100])
    with pytest.raises(VAELoadError, match="truncated"):
        AutoencoderKL.from_single_file(short_header)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(VAELoadError, match="empty"):
        AutoencoderKL.from_single_file(empty)
    js = tmp_path / "config.safetensors"
    js.write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(VAELoadError, match="JSON"):
        AutoencoderKL.from_single_file(js)
    garbage = tmp_path / "garbage.ckpt"
    garbage_bytes = b"PK\x03\x04" + random.Random(1).randbytes(200)  # seeded, as the noise below
    assert garbage_bytes[8:9] != b"{"
    garbage.write_bytes(garbage_bytes)
    with pytest.raises(VAELoadError, match="corrupt"):
        AutoencoderKL.from_single_file(garbage)
    noise = tmp_path / "noise.bin"
    # seeded, not os.urandom: with a "{" at byte 8 (1 in 256 random draws) either file reads as a
    # safetensors header and the loader rightly says "truncated" instead
    noise_bytes = b"\x13\x37" + random.Random(0).randbytes(64)
    assert noise_bytes[8:9] != b"{"
    noise.write_bytes(noise_bytes)
    with pytest.raises(VAELoadError, match="unrecognised file format"):
        AutoencoderKL.from_single_file(noise)
    with pytest.raises(FileNotFoundError):
        AutoencoderKL.from_single_file(tmp_path / "missing.safetensors")


def test_wrong_shapes_missing_and_unexpected_keys(tmp_path):
    def wrong_shape(sd):
        sd["decoder.up.1.block.0.conv2.weight"] = torch.zeros(16, 16, 3, 1)

    with pytest.raises(VAELoadError, match=r"wrong shapes: 'decoder\.up_blocks\.2\.resnets\.0\.conv2\.weight"):
        AutoencoderKL.from_single_file(_ldm_file(tmp_path, wrong_shape, "a.safetensors"))

    def missing(sd):
        del sd["decoder.mid.block_2.norm1.bias"]

    with pytest.raises(VAELoadError, match=r"missing keys: 'decoder\.mid_block\.resnets\.1\.norm1\.bias'"):
        AutoencoderKL.from_single_file(_ldm_file(tmp_path, missing, "b.safetensors"), config=CONFIGS["sd_layout"])

    def unexpected(sd):
        sd["decoder.up.0.block.9.conv1.weight"] = torch.zeros(8, 8, 3, 3)

    with pytest.raises(VAELoadError, match=r"unexpected keys: 'decoder\.up_blocks\.3\.resnets\.9"):
        AutoencoderKL.from_single_file(_ldm_file(tmp_path, unexpected, "c.safetensors"), config=CONFIGS["sd_layout"])

    def unknown(sd):
        sd["encoder.down.0.block.0.gamma"] = torch.zeros(8)

    with pytest.raises(VAELoadError, match=r"unrecognised LDM VAE keys: 'encoder\.down\.0\.block\.0\.gamma'"):
        AutoencoderKL.from_single_file(_ldm_file(tmp_path, unknown, "d.safetensors"))

    def int_weights(sd):
        sd["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"].to(torch.int32)

    with pytest.raises(VAELoadError, match="floating point"):
        AutoencoderKL.from_single_file(_ldm_file(tmp_path, int_weights, "e.safetensors"))


class _Exploit:
    """Unpickling this would create a marker file: the test proves it never happens."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    sd = dict(convert.diffusers_to_ldm(_tiny().state_dict()))
    sd["payload"] = _Exploit(marker)
    torch.save({"state_dict": sd}, str(evil))
    with pytest.raises(VAELoadError, match="refused") as err:
        AutoencoderKL.from_single_file(evil)
    assert "evil.ckpt" in str(err.value)
    assert not marker.exists(), "the pickle's code ran"
    with pytest.raises(VAELoadError):
        read_state_dict(evil)
    assert not marker.exists()
