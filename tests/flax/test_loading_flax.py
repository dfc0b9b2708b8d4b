"""FlaxAutoencoderKL loading through the torch core's loaders (diffusers folders, LDM single files,
full checkpoints), its own Flax layout, safetensors output, and the errors bad files give."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flax_helpers import require_jax, torch_vae

require_jax()

import jax.numpy as jnp  # noqa: E402

from vae_core import AutoencoderKL, convert  # noqa: E402
from vae_core.flax import FlaxAutoencoderKL  # noqa: E402
from vae_core.flax.convert import flatten, params_to_state_dict, state_dict_to_params  # noqa: E402
from vae_core.flax.loading import FLAX_WEIGHTS_NAME  # noqa: E402
from vae_core.loading import VAELoadError  # noqa: E402


def _same_params(a, b):
    fa, fb = flatten(a), flatten(b)
    assert set(fa) == set(fb)
    for k in fa:
        assert np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), "/".join(k)


@pytest.fixture(scope="module")
def vae():
    return torch_vae("sd_layout")


@pytest.fixture(scope="module")
def reference(vae):
    return FlaxAutoencoderKL.from_torch(vae)


@pytest.mark.parametrize("name", ["sd_layout", "flux_layout", "no_attention"])
def test_state_dict_round_trip_is_lossless(name):
    sd = {k: v.numpy() for k, v in torch_vae(name).state_dict().items()}
    params = state_dict_to_params(sd)
    assert params["encoder"]["conv_in"]["kernel"].shape == (3, 3, 3, 8)  # (kh, kw, in, out)
    assert ("quant_conv" in params) == (name != "flux_layout")
    assert ("attentions_0" in params["encoder"]["mid_block"]) == (name != "no_attention")
    back = params_to_state_dict(params)
    assert set(back) == set(sd)
    for k in sd:
        assert np.array_equal(back[k], sd[k]), k


def test_flax_names_are_diffusers_flax_names(reference):
    _, params = reference
    attn = params["encoder"]["mid_block"]["attentions_0"]
    assert set(attn) == {"group_norm", "query", "key", "value", "proj_attn"}
    assert set(params["decoder"]["up_blocks_0"]) == {"resnets_0", "resnets_1", "resnets_2", "upsamplers_0"}
    assert set(params["encoder"]["down_blocks_1"]["resnets_0"]["norm1"]) == {"scale", "bias"}
    assert "conv_shortcut" in params["encoder"]["down_blocks_1"]["resnets_0"]


def test_from_pretrained_torch_folder(vae, reference, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    model, params = FlaxAutoencoderKL.from_pretrained(tmp_path, dtype=jnp.bfloat16)  # a pipeline's vae/
    assert model.dtype == jnp.bfloat16 and model.config == reference[0].config
    _same_params(params, reference[1])


def test_from_single_file_ldm_and_full_checkpoint(vae, reference, tmp_path):
    vae.save_single_file(tmp_path / "ldm.safetensors")
    _, params = FlaxAutoencoderKL.from_single_file(tmp_path / "ldm.safetensors")
    _same_params(params, reference[1])
    ldm = convert.diffusers_to_ldm(vae.state_dict())
    full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2, 2)
    torch.save({"state_dict": full}, tmp_path / "full.ckpt")
    model, params = FlaxAutoencoderKL.from_single_file(tmp_path / "full.ckpt", config=vae.config.to_dict())
    _same_params(params, reference[1])
    model, _ = FlaxAutoencoderKL.from_single_file(tmp_path / "full.ckpt", config=vae.config.to_dict(), family="sdxl")
    assert model.scaling_factor == 0.13025


def test_flax_layout_round_trip(reference, tmp_path):
    model, params = reference
    model.save_pretrained(tmp_path, params)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["_class_name"] == "FlaxAutoencoderKL" and cfg["block_out_channels"] == [8, 16, 32, 32]
    assert (tmp_path / FLAX_WEIGHTS_NAME).is_file()
    assert not any(p.name.startswith("diffusion_pytorch_model") for p in tmp_path.iterdir())
    back, back_params = FlaxAutoencoderKL.from_pretrained(tmp_path)
    assert back.config == model.config
    _same_params(back_params, params)


def test_safetensors_output_loads_in_the_torch_core(vae, reference, tmp_path):
    model, params = reference
    model.save_pretrained(tmp_path, params, format="safetensors")
    back = AutoencoderKL.from_pretrained(tmp_path)
    for k, v in vae.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_extras_shift_and_layout_flags_come_through(tmp_path):
    vae = torch_vae("flux_layout")
    model, params = FlaxAutoencoderKL.from_torch(vae)
    assert model.shift_factor == 0.1159 and not model.use_quant_conv and "quant_conv" not in params
    model.save_pretrained(tmp_path, params)
    back, _ = FlaxAutoencoderKL.from_pretrained(tmp_path)
    assert back.shift_factor == 0.1159 and not back.use_post_quant_conv


def test_bad_flax_files_name_the_problem(reference, tmp_path):
    model, params = reference
    model.save_pretrained(tmp_path, params)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["latent_channels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VAELoadError, match=r"diffusion_flax_model\.msgpack.*(quant_conv|conv_in)"):
        FlaxAutoencoderKL.from_pretrained(tmp_path)
    (tmp_path / FLAX_WEIGHTS_NAME).write_bytes(b"not msgpack at all")
    with pytest.raises(VAELoadError, match="msgpack"):
        FlaxAutoencoderKL.from_pretrained(tmp_path)
    cfg["_class_name"] = "UNet2DConditionModel"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VAELoadError, match="_class_name"):
        FlaxAutoencoderKL.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="format"):
        model.save_pretrained(tmp_path / "x", params, format="ckpt")


def test_torch_core_errors_pass_through(tmp_path):
    (tmp_path / "lora.safetensors").write_bytes(b"")
    with pytest.raises(VAELoadError, match="empty"):
        FlaxAutoencoderKL.from_single_file(tmp_path / "lora.safetensors")


def test_from_torch_takes_diffusers_torch_model():
    from core_helpers import make_pair

    ref, ours = make_pair("no_attention")
    model_a, params_a = FlaxAutoencoderKL.from_torch(ref)
    model_b, params_b = FlaxAutoencoderKL.from_torch(ours)
    assert model_a.config == model_b.config and not model_a.mid_block_add_attention
    _same_params(params_a, params_b)
