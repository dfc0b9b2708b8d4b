"""Precision policy: force_upcast, casting without changing the model, and the fp32 retry on NaN/inf."""
import logging

import torch

from vae_core import AutoencoderKL, planner, precision


def tiny_vae(force_upcast: bool = True) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1, latent_channels=4,
        force_upcast=force_upcast,
    ).eval()


def test_force_upcast_turns_fp16_into_fp32_unless_overridden():
    model = tiny_vae(force_upcast=True)
    assert precision.resolve_dtype(model, torch.float16) == torch.float32
    assert precision.resolve_dtype(model, torch.float16, force_upcast=False) == torch.float16
    assert precision.resolve_dtype(model, torch.bfloat16) == torch.bfloat16  # bf16 has fp32's range
    assert precision.resolve_dtype(tiny_vae(force_upcast=False), torch.float16) == torch.float16
    assert precision.resolve_dtype(model) == torch.float32


def test_cast_model_restores_weights_bit_for_bit():
    model = tiny_vae()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with precision.cast_model(model, torch.bfloat16):
        assert model.dtype == torch.bfloat16
    assert model.dtype == torch.float32
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_non_finite_half_output_is_retried_in_fp32(caplog):
    seen = []

    def fn(dtype):
        seen.append(dtype)
        out = torch.ones(4, dtype=dtype)
        if dtype == torch.float16:
            out[1] = float("nan")
        return out

    with caplog.at_level(logging.WARNING, logger="vae_core.precision"):
        out, retried = precision.run_checked(fn, torch.float16, what="decode")
    assert retried and seen == [torch.float16, torch.float32]
    assert torch.isfinite(out).all() and out.dtype == torch.float32
    assert any("NaN/inf" in r.message and "fp32" in r.message for r in caplog.records)
    out, retried = precision.run_checked(fn, torch.float32)
    assert not retried


def test_fp16_overflow_in_a_real_decode_is_retried_in_fp32():
    model = tiny_vae(force_upcast=False)
    with torch.no_grad():
        model.post_quant_conv.weight.mul_(1e6)  # activations beyond fp16's 65504, fine in fp32
    z = torch.randn(1, 4, 6, 7)
    out, report = planner.run_decode(model, z, dtype=torch.float16, free_bytes=2**40)
    assert report["fp32_retry"] is True and report["dtype"] == "float32"
    assert torch.isfinite(out).all()
    with torch.no_grad():
        ref = model._pixels(z)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the retry is the plain fp32 run
    assert model.dtype == torch.float32


def test_bf16_on_cpu_is_offered_and_close_to_fp32():
    model = tiny_vae()
    z = torch.randn(1, 4, 6, 7)
    out, report = planner.run_decode(model, z, dtype=torch.bfloat16, free_bytes=2**40)
    assert report["dtype"] == "bfloat16" and not report["fp32_retry"]
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        ref = model._pixels(z)
    # bf16 has 8 significant bits (eps 7.8e-3); a few layers of rounding stay within ~5% of the scale
    assert (out.float() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
