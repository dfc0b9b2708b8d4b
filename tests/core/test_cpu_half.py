"""bf16 and fp16 on CPUs without native support (vae_core.cpu_half): convs and linears run as fp32
products of the upcast half-precision values, rounded once, and oneDNN's fused primitives (which
refuse bf16 there) are not called. `cpu_half.NATIVE` is forced off here so that the emulated path
runs on any CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vae_core import AutoencoderKL, attention, cpu_half, layers, planner
from vae_core.exact_tiling import exact_tiled_decode, exact_tiled_encode


HALF = (torch.bfloat16, torch.float16)


@pytest.fixture
def emulated(monkeypatch):
    for dtype in HALF:
        monkeypatch.setitem(cpu_half.NATIVE, dtype, False)


def _within_one_rounding(a: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor, terms: int,
                         dtype: torch.dtype) -> bool:
    """Whether `a` is the exact sum rounded once to `dtype`, after summing in fp32: |a - exact| at
    most one `dtype` step at exact (bf16: 8 significant bits, fp16: 11) plus the worst-case error
    of summing `terms` values in fp32, terms * 2^-24 * sum |term| (`magnitude`), which only counts
    where the sum cancels to far below its terms."""
    bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]  # explicit mantissa bits
    step = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - bits)
    return bool(((a.double() - exact).abs() <= step + terms * 2.0**-24 * magnitude).all())


@pytest.mark.parametrize("dtype", HALF)
def test_emulated_conv_rounds_the_exact_sum_of_half_precision_products(emulated, dtype):
    """What a native half-precision conv computes: the sum of exact products of the values, rounded once."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 48, 17, 19, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(40, 48, 3, 3, generator=g) * 0.05).to(dtype)
    b = torch.randn(40, generator=g).to(dtype)
    out = cpu_half.conv2d(x, w, b, padding=1)
    assert out.dtype == dtype and out.shape == (1, 40, 17, 19)
    assert out.is_contiguous(memory_format=torch.channels_last)  # the next conv needs no reorder
    exact = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    magnitude = F.conv2d(x.double().abs(), w.double().abs(), b.double().abs(), padding=1)
    assert _within_one_rounding(out, exact, magnitude, 48 * 9 + 1, dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_emulated_linear_rounds_the_exact_sum_of_half_precision_products(emulated, dtype):
    lin = cpu_half.Linear(64, 32).to(dtype)
    x = torch.randn(5, 64).to(dtype)
    with torch.no_grad():
        out = lin(x)
        exact = F.linear(x.double(), lin.weight.double(), lin.bias.double())
        magnitude = F.linear(x.double().abs(), lin.weight.double().abs(), lin.bias.double().abs())
    assert out.dtype == dtype
    assert _within_one_rounding(out, exact, magnitude, 64 + 1, dtype)


def test_native_dtypes_and_fp32_take_torchs_own_kernels(monkeypatch):
    x = torch.randn(1, 8, 6, 6).bfloat16()
    monkeypatch.setitem(cpu_half.NATIVE, torch.bfloat16, True)
    assert not cpu_half.emulated(x) and not cpu_half.emulated(x.float())
    monkeypatch.setitem(cpu_half.NATIVE, torch.bfloat16, False)
    assert cpu_half.emulated(x) and not cpu_half.emulated(x.float()) and not cpu_half.emulated(x.double())


def test_the_subclasses_keep_torchs_names_and_state_dict():
    """Loading, hooks and other packs see plain torch modules: same parameters, same keys."""
    ours, plain = cpu_half.Conv2d(8, 4, 3, padding=1), torch.nn.Conv2d(8, 4, 3, padding=1)
    assert isinstance(ours, torch.nn.Conv2d) and ours.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)  # fp32: torch's own conv, untouched
    assert isinstance(cpu_half.Linear(3, 2), torch.nn.Linear)


def _model() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                         norm_num_groups=16).eval()


def test_bf16_model_never_calls_onednn_fused_primitives_without_native_bf16(emulated, monkeypatch):
    """oneDNN's fused conv primitives raise on such CPUs ("bf16 path needs the cpu support ..."):
    the model must route bf16 around them. Here calling them at all is an error."""
    def refusing(fn):
        def call(conv, h, *rest):
            if h.dtype == torch.bfloat16:
                raise AssertionError("a oneDNN fused primitive was called for a bf16 conv without native bf16")
            return fn(conv, h, *rest)  # the fp32 reference run below uses them, as it should
        return call

    monkeypatch.setattr(layers, "conv_add_", refusing(layers.conv_add_))
    monkeypatch.setattr(layers, "conv_onednn", refusing(layers.conv_onednn))
    conv = cpu_half.Conv2d(64, 64, 3, padding=1).bfloat16().to(memory_format=torch.channels_last)
    h = torch.randn(1, 64, 8, 8).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # (with autograd on onednn_ok is False anyway)
        assert not layers.onednn_ok(conv, h)
        assert layers.onednn_ok(conv.float(), h.float())  # fp32 keeps oneDNN's direct path
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    model = _model()
    z = torch.randn(1, 4, 8, 8)
    out, report = planner.run_decode(model, z, dtype=torch.bfloat16, free_bytes=2**40)
    assert report["dtype"] == "bfloat16" and out.dtype == torch.bfloat16
    with torch.no_grad():
        ref = model._pixels(z)
        lat = model.to(torch.bfloat16).encode(x.bfloat16()).latent_dist.mode()
        model.float()
        lat_ref = model.encode(x).latent_dist.mode()
    # bf16 has 8 significant bits (eps 7.8e-3); a few layers of rounding stay within ~5% of the scale
    assert (out.float() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    assert lat.dtype == torch.bfloat16
    assert (lat.float() - lat_ref).abs().max().item() <= 0.05 * lat_ref.abs().max().item()


def test_exact_tiling_in_bf16_without_native_bf16_matches_untiled(emulated):
    model = _model().to(torch.bfloat16)
    z = torch.randn(1, 4, 16, 16).bfloat16()
    x = (torch.rand(1, 3, 64, 64) * 2 - 1).bfloat16()
    with torch.no_grad():
        whole, tiled = model.decode(z).sample, exact_tiled_decode(model, z, tile_size=32)
        enc, enc_tiled = model.encode(x).latent_dist.parameters, exact_tiled_encode(model, x, tile_size=32)
    assert tiled.dtype == torch.bfloat16
    # the same bf16 ops on the same values, in other groupings at tile edges: a few bf16 steps
    assert (tiled.float() - whole.float()).abs().max().item() <= 0.05 * whole.float().abs().max().item()
    assert (enc_tiled.float() - enc.float()).abs().max().item() <= 0.05 * enc.float().abs().max().item()


@pytest.mark.parametrize("dtype", HALF)
def test_no_conv_or_linear_reaches_torchs_half_precision_fallback(emulated, monkeypatch, dtype):
    """Every conv and linear of a half-precision encode, decode and exact tiled decode reaches torch
    in fp32 (the fallback is what takes ~100x fp32's time), and the outputs keep the asked dtype."""
    seen = []
    conv, linear = F.conv2d, F.linear

    def spy(fn):
        def call(x, *args, **kwargs):
            seen.append(x.dtype)
            return fn(x, *args, **kwargs)
        return call

    monkeypatch.setattr(F, "conv2d", spy(conv))
    monkeypatch.setattr(F, "linear", spy(linear))
    model = _model()
    z, x = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 32, 32) * 2 - 1
    out, report = planner.run_decode(model, z, dtype=dtype, force_upcast=False, free_bytes=2**40)
    assert report["dtype"] == str(dtype).replace("torch.", "") and out.dtype == dtype
    with torch.no_grad():
        half = model.to(dtype)
        lat = half.encode(x.to(dtype)).latent_dist.mode()
        tiled = exact_tiled_decode(half, z.to(dtype), tile_size=32)
    assert lat.dtype == dtype and tiled.dtype == dtype
    assert len(seen) > 20 and set(seen) == {torch.float32}


@pytest.mark.parametrize("dtype", HALF)
def test_emulated_math_attention_computes_what_torchs_half_matmuls_compute(monkeypatch, dtype):
    """The math and sliced processors' scores and weighted sum: on a CPU without native half precision
    they run as fp32 products rounded to the half dtype, as torch's own half matmuls round them (which
    are emulated there at ~40x fp32's time, so only a small case is compared)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 257, 64, generator=g).to(dtype) for _ in range(3))
    scale = 64 ** -0.5
    monkeypatch.setitem(cpu_half.NATIVE, dtype, True)
    reference = attention._math_attention(q, k, v, scale)  # torch's half-precision baddbmm and bmm
    monkeypatch.setitem(cpu_half.NATIVE, dtype, False)
    out = attention._math_attention(q, k, v, scale)
    assert out.dtype == dtype
    # The same roundings of the same sums in another summation order, so nearly every output is the
    # same value (measured 99.5-99.99%; where a sum's rounding flips, the flip propagates through the
    # softmax). Without the scores' rounding to the half dtype only ~36% are, more accurate but not
    # what diffusers' half-precision attention returns.
    assert (out == reference).double().mean().item() >= 0.99
    exact = torch.softmax(q.double() @ k.double().transpose(1, 2) * scale, dim=-1) @ v.double()
    err_ours, err_torch = ((t.double() - exact).abs().max().item() for t in (out, reference))
    assert err_ours <= 1.5 * err_torch  # no less accurate than the native kernels


@pytest.mark.parametrize("processor", ["math", "sliced"])
def test_math_attention_reaches_torchs_matmuls_in_fp32_without_native_half(emulated, monkeypatch, processor):
    seen = []

    def spy(fn):
        def call(*args, **kwargs):
            seen.extend(a.dtype for a in args if isinstance(a, torch.Tensor))
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(torch, "bmm", spy(torch.bmm))
    monkeypatch.setattr(torch, "baddbmm", spy(torch.baddbmm))
    model = _model().to(torch.bfloat16)
    model.set_attn_processor(attention.make_attn_processor(processor, slice_size=16))
    with torch.no_grad():
        out = model.decode(torch.randn(1, 4, 8, 8).bfloat16()).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert seen and set(seen) == {torch.float32}
