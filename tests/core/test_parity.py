"""Numerical parity of vae_core.AutoencoderKL with diffusers' AutoencoderKL on random weights."""
from __future__ import annotations

import json

import pytest
import torch

from core_helpers import CONFIGS, assert_close_fp32, make_pair


@pytest.fixture
def pair(config_name):
    return make_pair(config_name)


def _image(batch=2, h=64, w=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=g) * 2 - 1


def test_config_defaults_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from vae_core import AutoencoderKL, AutoencoderKLConfig

    ref = diffusers.AutoencoderKL()
    ours = AutoencoderKL()
    for field in AutoencoderKLConfig().keys():
        expected = ref.config[field]
        got = getattr(ours.config, field)
        if isinstance(expected, (list, tuple)):
            expected, got = list(expected), list(got)
        assert got == expected, field
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_encode_mean_and_logvar(pair):
    ref, ours = pair
    x = _image()
    with torch.no_grad():
        a = ref.encode(x).latent_dist
        b = ours.encode(x).latent_dist
    assert_close_fp32(b.mean, a.mean)
    assert_close_fp32(b.logvar, a.logvar)
    assert_close_fp32(b.std, a.std)
    assert_close_fp32(b.var, a.var)


def test_decode(pair, config_name):
    ref, ours = pair
    c = CONFIGS[config_name]["latent_channels"]
    f = 2 ** (len(CONFIGS[config_name]["block_out_channels"]) - 1)
    z = torch.randn(2, c, 64 // f, 40 // f, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close_fp32(ours.decode(z).sample, ref.decode(z).sample)
        assert_close_fp32(ours.decode(z, return_dict=False)[0], ref.decode(z).sample)


def test_forward_with_seeded_posterior_sample(pair):
    ref, ours = pair
    x = _image()
    with torch.no_grad():
        a = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(7)).sample
        b = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(7)).sample
        mode = ours(x).sample
    assert_close_fp32(b, a)
    assert not torch.allclose(a, mode), "the posterior sample must differ from its mode"


def test_posterior_methods_match(pair):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as RefDist

    from vae_core import DiagonalGaussianDistribution

    params = torch.randn(2, 8, 5, 6) * 3
    a, b = RefDist(params), DiagonalGaussianDistribution(params)
    assert b.logvar.max() <= 20 and b.logvar.min() >= -30
    torch.testing.assert_close(b.kl(), a.kl())
    other_a, other_b = RefDist(params.flip(0)), DiagonalGaussianDistribution(params.flip(0))
    torch.testing.assert_close(b.kl(other_b), a.kl(other_a))
    s = torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(b.nll(s), a.nll(s))
    torch.testing.assert_close(b.mode(), a.mode())
    torch.testing.assert_close(b.sample(torch.Generator().manual_seed(3)), a.sample(torch.Generator().manual_seed(3)))
    gens_a = [torch.Generator().manual_seed(i) for i in (4, 5)]
    gens_b = [torch.Generator().manual_seed(i) for i in (4, 5)]
    torch.testing.assert_close(b.sample(gens_b), a.sample(gens_a))
    clamped = DiagonalGaussianDistribution(torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 99.0)], 1))
    assert clamped.logvar.max().item() == 20.0


def _count_calls(model, name):
    calls = []
    original = getattr(model, name)

    def wrapped(t):
        calls.append(tuple(t.shape))
        return original(t)

    setattr(model, name, wrapped)
    return calls


def test_tiled_encode_and_decode_match_diffusers(pair, config_name):
    ref, ours = pair
    ref.enable_tiling()
    ours.enable_tiling()
    assert ours.tile_sample_min_size == ref.tile_sample_min_size
    assert ours.tile_latent_min_size == ref.tile_latent_min_size
    assert ours.tile_overlap_factor == ref.tile_overlap_factor
    f = 2 ** (len(CONFIGS[config_name]["block_out_channels"]) - 1)
    # 96 x 80 px: a 4 x 4 grid of 32 px tiles every 24 px (diffusers itself fails on slivers < f px)
    x = _image(batch=1, h=96, w=80)
    enc_calls = _count_calls(ours, "_moments")
    with torch.no_grad():
        a = ref.encode(x).latent_dist
        b = ours.encode(x).latent_dist  # enable_tiling routes encode through the tiler
    assert len(enc_calls) > 1, "tiled encode must run more than one tile"
    assert_close_fp32(b.mean, a.mean)
    assert_close_fp32(b.logvar, a.logvar)

    c = CONFIGS[config_name]["latent_channels"]
    z = torch.randn(2, c, 104 // f, 88 // f, generator=torch.Generator().manual_seed(5))
    dec_calls = _count_calls(ours, "_pixels")
    with torch.no_grad():
        assert_close_fp32(ours.tiled_decode(z).sample, ref.tiled_decode(z).sample)
    assert len(dec_calls) > 2, "tiled decode must run more than one tile"


def test_slicing_matches(pair):
    ref, ours = pair
    ours.enable_slicing()
    x = _image(batch=3)
    calls = _count_calls(ours, "_moments")
    with torch.no_grad():
        a = ref.encode(x).latent_dist.mean
        b = ours.encode(x).latent_dist.mean
        assert_close_fp32(ours.decode(a).sample, ref.decode(a).sample)
    assert len(calls) == 3, "slicing runs one batch item at a time"
    assert_close_fp32(b, a)
    ours.disable_slicing()
    assert not ours.use_slicing


def test_tiling_switches():
    from vae_core import AutoencoderKL

    m = AutoencoderKL(**CONFIGS["sd_layout"])
    m.enable_tiling()
    assert m.use_tiling and m.tiling_method == "blend"
    m.disable_tiling()
    assert not m.use_tiling
    with pytest.raises(ValueError, match="tiling method"):
        m.enable_tiling(method="seamless")


def test_state_dict_loads_into_diffusers_strictly(pair):
    ref, ours = pair
    fresh = type(ref).from_config(ref.config)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


# -- drop-in behaviour: what a diffusers user touches besides the numbers ------------------------------

TINY = dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4, latent_channels=4)


def _tiny_pair(seed=0):
    diffusers = pytest.importorskip("diffusers")
    from vae_core import AutoencoderKL

    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(**TINY).eval()
    ours = AutoencoderKL(**TINY).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def test_outputs_are_dict_like_as_diffusers():
    ref, ours = _tiny_pair()
    x = _image(1, 16, 16)
    with torch.no_grad():
        a, b = ref(x), ours(x)
        enc = ours.encode(x)
    assert isinstance(b, dict) and list(b.keys()) == list(a.keys()) == ["sample"]
    assert b["sample"] is b.sample is b[0] is b.to_tuple()[0] is list(b.values())[0]
    assert b.commit_loss is None and a.commit_loss is None
    assert enc["latent_dist"] is enc.latent_dist is enc[0]
    with pytest.raises(KeyError):
        b["nope"]


def test_state_dict_is_contiguous_and_ordered_as_diffusers(tmp_path):
    from safetensors.torch import save_file

    ref, ours = _tiny_pair()
    assert ours.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last), "fast layout kept"
    sd = ours.state_dict()
    assert all(t.is_contiguous() for t in sd.values())
    save_file(sd, str(tmp_path / "w.safetensors"))  # refuses non-contiguous tensors
    assert list(sd) == list(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]


def test_config_behaves_like_diffusers_frozendict(tmp_path):
    from vae_core import AutoencoderKL
    from vae_core.config import DIFFUSERS_FORMAT_VERSION

    ref, ours = _tiny_pair()
    ref.save_pretrained(tmp_path / "d")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "d")
    ref_loaded = type(ref).from_pretrained(tmp_path / "d")
    for key in ("block_out_channels", "down_block_types", "sample_size"):
        assert loaded.config[key] == ref_loaded.config[key]
        assert type(loaded.config[key]) is type(ref_loaded.config[key]), key  # lists stay lists
    assert loaded.config.block_out_channels == [8, 16]
    assert dict(loaded.config.items()) == {k: ref_loaded.config[k] for k in loaded.config.keys()}
    ours.save_pretrained(tmp_path / "o")
    written = json.loads((tmp_path / "o" / "config.json").read_text())
    assert written["_diffusers_version"] == DIFFUSERS_FORMAT_VERSION == ours.config._diffusers_version
    assert type(ref).from_pretrained(tmp_path / "o").config.block_out_channels == [8, 16]


def test_register_save_and_load_config(tmp_path):
    from vae_core import AutoencoderKL

    _, ours = _tiny_pair()
    ours.register_to_config(test_attribute=5, scaling_factor=0.5)
    assert ours.config.test_attribute == 5 and ours.config["scaling_factor"] == 0.5
    with pytest.warns(FutureWarning, match="config"):
        assert ours.test_attribute == 5  # diffusers' deprecated direct access, same warning class
    with pytest.raises(AttributeError, match="'AutoencoderKL' object has no attribute 'nope'"):
        ours.nope
    ours.save_config(tmp_path)
    cfg = AutoencoderKL.load_config(tmp_path)
    assert cfg["test_attribute"] == 5 and cfg["scaling_factor"] == 0.5 and cfg["_class_name"] == "AutoencoderKL"
    assert AutoencoderKL.from_config(cfg).config.scaling_factor == 0.5


def test_from_pretrained_dtype_overrides_and_unknown_kwargs(tmp_path):
    from vae_core import AutoencoderKL

    _, ours = _tiny_pair()
    ours.save_pretrained(tmp_path)
    assert AutoencoderKL.from_pretrained(tmp_path, dtype=torch.float16).dtype == torch.float16
    assert AutoencoderKL.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    m = AutoencoderKL.from_pretrained(tmp_path, sample_size=64, low_cpu_mem_usage=False)
    assert m.config.sample_size == 64 and m.tile_sample_min_size == 64
    m, info = AutoencoderKL.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    with pytest.raises(TypeError, match=r"\['bogus', 'device_map'\]"):
        AutoencoderKL.from_pretrained(tmp_path, bogus=1, device_map="auto")
    with pytest.raises(TypeError, match="torch_dtype"):
        AutoencoderKL.from_pretrained(tmp_path, torch_dtype=torch.float16, dtype=torch.bfloat16)
    ours.save_single_file(tmp_path / "vae.safetensors")
    with pytest.raises(TypeError, match=r"\['subfolder'\]"):
        AutoencoderKL.from_single_file(tmp_path / "vae.safetensors", subfolder="vae")
    assert AutoencoderKL.from_single_file(tmp_path / "vae.safetensors", dtype=torch.float16).dtype == torch.float16


def test_variant_rule_as_diffusers(tmp_path):
    from vae_core import AutoencoderKL

    ref, ours = _tiny_pair()
    ours.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    for cls in (type(ref), AutoencoderKL):  # both refuse the variant file without variant=
        with pytest.raises(OSError, match="no file named diffusion_pytorch_model.bin"):
            cls.from_pretrained(tmp_path)
    with pytest.raises(OSError, match="variant='fp16'"):
        AutoencoderKL.from_pretrained(tmp_path)
    torch.testing.assert_close(AutoencoderKL.from_pretrained(tmp_path, variant="fp16").state_dict(), ours.state_dict())


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_folders_both_ways(tmp_path, variant):
    from vae_core import AutoencoderKL

    ref, ours = _tiny_pair()
    ref.save_pretrained(tmp_path / "d", max_shard_size="20KB", variant=variant)
    index = "diffusion_pytorch_model.safetensors.index" + (f".{variant}" if variant else "") + ".json"
    assert (tmp_path / "d" / index).is_file()
    loaded = AutoencoderKL.from_pretrained(tmp_path / "d", variant=variant)
    torch.testing.assert_close(loaded.state_dict(), ours.state_dict())
    ours.save_pretrained(tmp_path / "o", max_shard_size="20KB", variant=variant)
    shards = sorted(p.name for p in (tmp_path / "o").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "o" / index).is_file()
    back = type(ref).from_pretrained(tmp_path / "o", variant=variant)
    torch.testing.assert_close(back.state_dict(), ref.state_dict())
    ours.save_pretrained(tmp_path / "o", variant=variant)  # re-save unsharded: stale shards go
    assert sorted(p.name for p in (tmp_path / "o").glob("*.safetensors")) == [
        "diffusion_pytorch_model" + (f".{variant}" if variant else "") + ".safetensors"]


def test_gradient_checkpointing_gives_the_same_gradients():
    from vae_core import AutoencoderKL

    torch.manual_seed(0)
    plain = AutoencoderKL(**TINY).train()
    ckpt = AutoencoderKL(**TINY).train()
    ckpt.load_state_dict(plain.state_dict())
    assert AutoencoderKL._supports_gradient_checkpointing and not ckpt.is_gradient_checkpointing
    ckpt.enable_gradient_checkpointing()
    assert ckpt.is_gradient_checkpointing
    assert {type(m).__name__ for m in ckpt.modules() if getattr(m, "gradient_checkpointing", False)} == {
        "Encoder", "Decoder", "UNetMidBlock2D"}  # the set diffusers' test expects
    calls = []
    ckpt.enable_gradient_checkpointing(lambda block, *a: calls.append(type(block).__name__) or block(*a))
    x = _image(1, 16, 16)
    for model in (plain, ckpt):
        model.zero_grad()
        (model(x).sample ** 2).mean().backward()
    assert "ResnetBlock2D" in calls and "UpDecoderBlock2D" in calls, "the checkpoint function must be used"
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    ckpt.disable_gradient_checkpointing()
    assert not ckpt.is_gradient_checkpointing


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_compile_fullgraph_encode_and_decode(mode):
    """torch.compile(fullgraph=True) traces encode and decode whole (it raises on any graph break).
    aot_eager runs dynamo and AOT autograd without inductor's C++ build, which takes minutes here."""
    from vae_core import AutoencoderKL

    torch._dynamo.reset()
    model = AutoencoderKL(**TINY).eval()
    x = _image(1, 16, 16)
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with ctx():
        z = model.encode(x).latent_dist.mode()
        enc = torch.compile(model.encode, fullgraph=True, backend="aot_eager")(x).latent_dist.mode()
        dec = torch.compile(model.decode, fullgraph=True, backend="aot_eager")(z).sample
        expected = model.decode(z).sample
    # same kernels in the same order, so the outputs agree to fp32 rounding of the graph's reorderings
    torch.testing.assert_close(enc, z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dec, expected, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_bridge_shares_weights_both_ways():
    from vae_core import AutoencoderKL

    ref, ours = _tiny_pair()
    d = ours.to_diffusers()
    assert type(d) is type(ref)
    assert all(a is b for a, b in zip(d.parameters(), ours.parameters()))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_close_fp32(d.decode(z).sample, ours.decode(z).sample)
        d.decoder.conv_out.bias.add_(1.0)  # one tensor: an edit on one side shows on the other
    assert torch.equal(ours.decoder.conv_out.bias, d.decoder.conv_out.bias)
    back = AutoencoderKL.from_diffusers(ref)
    assert all(a is b for a, b in zip(back.parameters(), ref.parameters()))
    with pytest.raises(TypeError, match="diffusers AutoencoderKL"):
        AutoencoderKL.from_diffusers(torch.nn.Linear(2, 2))


def _tiny_tokenizer(folder):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "cat</w>": 3, "a": 4, "c": 5, "t": 6}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)


def test_stable_diffusion_pipeline_with_the_bridge(tmp_path):
    """StableDiffusionPipeline(vae=vae.to_diffusers(), ...) runs and save_pretrained writes our weights."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from vae_core import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=8, hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2, attention_head_dim=2)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.to_diffusers(), text_encoder=text, tokenizer=_tiny_tokenizer(tmp_path), unet=unet,
        scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    images = pipe("a cat", num_inference_steps=1, height=16, width=16, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3)
    pipe.save_pretrained(tmp_path / "pipe")
    reloaded = AutoencoderKL.from_pretrained(tmp_path / "pipe", subfolder="vae")
    torch.testing.assert_close(reloaded.state_dict(), vae.state_dict(), rtol=0, atol=0)
