"""Numerical parity of vae_core.AutoencoderKL with diffusers' AutoencoderKL on random weights."""
from __future__ import annotations

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
