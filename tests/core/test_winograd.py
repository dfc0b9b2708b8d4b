"""Winograd F(2x2, 3x3) convolutions (vae_core/winograd.py): exact maths, bounded rounding, and used
only where it applies."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core_helpers import DOWN4, UP4, assert_close_fp32

from vae_core import winograd


def _conv(cin, cout, bias=True, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
    with torch.no_grad():
        conv.weight.normal_(0.0, (2.0 / (9 * cin)) ** 0.5)  # an SD-like scale: outputs of order 1
        if bias:
            conv.bias.normal_(0.0, 0.5)
    return conv.to(memory_format=torch.channels_last)


def _input(batch, cin, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cin, h, w, generator=g).to(memory_format=torch.channels_last)


def _errors(conv, x, **kw):
    """(Winograd's, the direct conv's) largest error against float64."""
    ref = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(), padding=1)
    with torch.no_grad():
        direct = F.conv2d(x, conv.weight, conv.bias, padding=1)
        ours = winograd.winograd_conv(conv, x, **kw)
    assert ours.shape == ref.shape and ours.is_contiguous(memory_format=torch.channels_last)
    return (ours.double() - ref).abs().max().item(), (direct.double() - ref).abs().max().item()


@pytest.mark.parametrize("batch,h,w,bias", [(1, 32, 32, True), (2, 34, 48, False), (1, 64, 36, True)])
def test_matches_float64_no_worse_than_the_direct_conv(batch, h, w, bias):
    conv = _conv(512, 512, bias)
    x = _input(batch, 512, h, w)
    assert winograd.winograd_ok(conv, x) is False  # grad mode is on in a plain test
    with torch.no_grad():
        assert winograd.winograd_ok(conv, x)
    err, direct = _errors(conv, x)
    # F(2x2, 3x3) has no constant above 1: it rounds like the direct conv (measured 1.3-1.9e-6 here,
    # the direct conv 1.8-7e-6 on this scale of outputs); 3e-6 absolute leaves room for neither a
    # wrong tap nor a misplaced tile, whose errors are of the outputs' own size
    assert err <= max(2 * direct, 3e-6), (err, direct)


def test_bands_with_a_remainder_and_the_fused_add(monkeypatch):
    """Force several bands (the last one short): every band's rows, halo and padding are right, and
    add_to receives conv(x) + add_to in its own buffer."""
    monkeypatch.setattr(winograd, "BAND_ROWS", 40)  # 20 tiles across -> 2 tile rows per band; 17 rows
    conv = _conv(512, 512)
    x = _input(1, 512, 34, 40)
    err, direct = _errors(conv, x)
    assert err <= max(2 * direct, 3e-6)
    skip = _input(1, 512, 34, 40, seed=5)
    buf = skip.clone()
    with torch.no_grad():
        out = winograd.winograd_conv(conv, x, add_to=buf)
    assert out.data_ptr() == buf.data_ptr()
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1) + skip.double()
    # one more rounding (the add) on outputs up to ~2x larger than the conv's alone
    assert (out.double() - ref).abs().max().item() <= max(2 * direct, 3e-6) + 2 * ref.abs().max().item() * 2**-24


def test_a_band_never_exceeds_its_workspace(monkeypatch):
    """BAND_BYTES bounds the band even where BAND_ROWS would ask for more: the result is the same."""
    conv = _conv(512, 512, seed=3)
    x = _input(1, 512, 32, 32)
    with torch.no_grad():
        whole = winograd.winograd_conv(conv, x)
        monkeypatch.setattr(winograd, "BAND_BYTES", 16 * 16 * 1024 * 4)  # one tile row of 16 tiles
        banded = winograd.winograd_conv(conv, x)
    torch.testing.assert_close(banded, whole, rtol=0, atol=2e-6)


def _wide_ok(conv, x):
    with torch.no_grad():
        return winograd.winograd_ok(conv, x)


def test_applies_only_where_it_should(monkeypatch):
    conv = _conv(512, 512)
    x = _input(1, 512, 32, 32)
    assert _wide_ok(conv, x)
    narrow = winograd.MIN_CHANNELS // 2
    assert _wide_ok(_conv(winograd.MIN_CHANNELS, 512), _input(1, winograd.MIN_CHANNELS, 32, 32))
    assert not _wide_ok(_conv(narrow, 512), _input(1, narrow, 32, 32))  # narrow input side
    assert not _wide_ok(_conv(512, narrow), x)  # narrow output side
    assert not _wide_ok(conv, _input(1, 512, 33, 32))  # odd height
    assert not _wide_ok(conv, _input(1, 512, 32, 30))  # fewer than MIN_TILES tiles
    assert not _wide_ok(conv, x.contiguous())  # NCHW
    assert not _wide_ok(conv.to(torch.bfloat16), x.to(torch.bfloat16))
    strided = torch.nn.Conv2d(512, 512, 3, stride=2, padding=1).to(memory_format=torch.channels_last)
    assert not _wide_ok(strided, x)

    class Lora(torch.nn.Conv2d):  # a subclass has its own forward, which must run
        pass

    assert not _wide_ok(Lora(512, 512, 3, padding=1).to(memory_format=torch.channels_last), x)
    monkeypatch.setattr(winograd, "enabled", False)
    assert not _wide_ok(conv, x)


# A VAE as wide as SD's two deepest levels, small enough for a CPU test: every resnet conv is
# 512 -> 512 at 32-64 px, where Winograd applies.
WIDE = dict(block_out_channels=(512, 512), down_block_types=DOWN4[:2], up_block_types=UP4[:2],
            layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=64)


def _counting(monkeypatch):
    calls = []
    real = winograd.winograd_conv

    def counted(conv, h, add_to=None):
        calls.append(tuple(h.shape))
        return real(conv, h, add_to=add_to)

    import vae_core.exact_tiling as exact_tiling
    import vae_core.layers as layers

    monkeypatch.setattr(layers, "winograd_conv", counted)
    monkeypatch.setattr(exact_tiling, "winograd_conv", counted)
    return calls


def test_a_wide_vae_matches_diffusers_through_winograd(monkeypatch):
    """Encode and decode of a 512-wide VAE run their resnet convs through Winograd (counted) and
    still agree with diffusers' AutoencoderKL to the parity tests' fp32 bound."""
    diffusers = pytest.importorskip("diffusers")
    from vae_core import AutoencoderKL

    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**WIDE).eval()
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.normal_(1.0, 0.2)
                mod.bias.normal_(0.0, 0.2)
    ours = AutoencoderKL(**WIDE).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    calls = _counting(monkeypatch)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        a, b = ref.encode(x).latent_dist, ours.encode(x).latent_dist
        assert_close_fp32(b.mean, a.mean)
        assert_close_fp32(b.logvar, a.logvar)
        encoder_calls = len(calls)
        # encoder: 2 resnets at 64² and 32² (2 convs each), mid block 2 resnets at 32²
        assert encoder_calls == 8, calls
        z = torch.randn(1, 4, 32, 32, generator=g)
        assert_close_fp32(ours.decode(z).sample, ref.decode(z).sample)
    # decoder: mid block 2 resnets, 2 resnets per level at 32² and 64²
    assert len(calls) - encoder_calls == 12, calls


def test_a_forward_hook_on_a_conv_still_runs(monkeypatch):
    """Winograd skips the module call, so a hooked block keeps the module path."""
    from vae_core import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**WIDE).eval()
    calls = _counting(monkeypatch)
    seen = []
    vae.decoder.mid_block.resnets[0].conv1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        vae.decode(torch.randn(1, 4, 32, 32))
    assert seen == [torch.Size([1, 512, 32, 32])]
    assert len(calls) == 10  # all but the hooked resnet's two convs


def test_exact_tiles_take_the_same_path_and_match_the_untiled_decode(monkeypatch):
    """The exact tiler's wide convs go through Winograd on each tile (counted), and its decode still
    equals the untiled one within fp32 rounding (a seam or a wrong halo would be off by the outputs'
    own scale)."""
    from vae_core import AutoencoderKL
    from vae_core.exact_tiling import exact_tiled_decode

    torch.manual_seed(0)
    vae = AutoencoderKL(**WIDE).eval()
    z = torch.randn(1, 4, 48, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = vae.decode(z).sample
        calls = _counting(monkeypatch)
        tiled = exact_tiled_decode(vae, z, tile_size=64)
    # tiles (with their halos) smaller than the whole 48x32 and 96x64 levels went through it
    assert calls and all(h * w < 48 * 32 or 48 * 32 < h * w < 96 * 64 for _, _, h, w in calls), calls
    scale = whole.abs().max().item()
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5 * max(1.0, scale))
