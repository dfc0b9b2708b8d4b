"""Inference reuses dead buffers (fused conv + skip, in-place norms, blocks taking over their input)
without touching any tensor a caller or a hook can still see."""
import pytest
import torch
import torch.nn.functional as F

from vae_core import cpu_half
from vae_core.layers import (DownEncoderBlock2D, ResnetBlock2D, UpDecoderBlock2D, conv_add_, fused_add_ok)

CL = torch.channels_last


def _t(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).contiguous(memory_format=CL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_add_writes_conv_plus_skip_into_the_skip(dtype):
    conv = torch.nn.Conv2d(32, 32, 3, padding=1).to(dtype).to(memory_format=CL)
    h, skip = _t(1, 32, 24, 20, dtype=dtype), _t(1, 32, 24, 20, dtype=dtype, seed=1)
    with torch.no_grad():
        ref = F.conv2d(h.float(), conv.weight.float(), conv.bias.float(), padding=1) + skip.float()
        if dtype == torch.bfloat16 and not cpu_half.NATIVE[dtype]:
            # oneDNN's fused primitive raises for bf16 on this CPU; the model must not pick it
            # (tests/core/test_cpu_half.py runs the model that way)
            assert not fused_add_ok(conv, h, skip)
            return
        assert fused_add_ok(conv, h, skip)
        out = skip.clone()
        got = conv_add_(conv, h, out)
    assert got.data_ptr() == out.data_ptr()
    tol = 1e-5 if dtype == torch.float32 else 0.05  # bf16: one rounding of values up to ~4
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=tol)


def test_fused_add_is_refused_where_it_would_be_wrong_or_unsafe():
    conv = torch.nn.Conv2d(16, 16, 3, padding=1).to(memory_format=CL)
    h, skip = _t(1, 16, 8, 8), _t(1, 16, 8, 8)
    assert not fused_add_ok(conv, h, skip)  # autograd on: the skip is needed for the backward pass
    with torch.no_grad():
        assert fused_add_ok(conv, h, skip)
        assert not fused_add_ok(conv, h.contiguous(), skip)  # NCHW
        assert not fused_add_ok(conv, h, _t(1, 16, 8, 9))  # result shape differs
        assert not fused_add_ok(conv, h.double(), skip.double())
    with torch.inference_mode():
        assert not fused_add_ok(conv, h, skip)  # a normal tensor cannot be written in inference mode... 
        assert fused_add_ok(conv, _t(1, 16, 8, 8), _t(1, 16, 8, 8))  # ...tensors made there can


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("channels", [(32, 32), (16, 32)])
def test_blocks_leave_their_callers_input_alone(ctx, channels):
    cin, cout = channels
    torch.manual_seed(0)
    res = ResnetBlock2D(cin, cout, 8).eval().to(memory_format=CL)
    down = DownEncoderBlock2D(cin, cout, 2, 8, "silu", add_downsample=True).eval().to(memory_format=CL)
    up = UpDecoderBlock2D(cin, cout, 2, 8, "silu", add_upsample=True).eval().to(memory_format=CL)
    with ctx():
        x = _t(1, cin, 16, 16)
        keep = x.clone()
        for module in (res, down, up):
            a = module(x)
            assert torch.equal(x, keep), type(module).__name__
            # the owned path (what Encoder/Decoder use) gives the same numbers as forward
            b = module.forward_owned(x.clone()) if module is res else module.consume([x.clone()])
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_model_input_and_hooked_outputs_are_not_overwritten():
    from vae_core import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    keep = x.clone()
    with torch.inference_mode():
        z = vae.encode(x).latent_dist.mode()
        assert torch.equal(x, keep)
        plain = vae.decode(z).sample
        kept = []
        hooks = [vae.decoder.up_blocks[1].resnets[0].register_forward_hook(lambda m, i, o: kept.append(o.clone()) or None),
                 vae.decoder.up_blocks[1].resnets[0].register_forward_hook(lambda m, i, o: kept.append(o))]
        try:
            hooked = vae.decode(z).sample
        finally:
            for h in hooks:
                h.remove()
    # with hooks the resnets take the unfused conv, then add: fp32 rounding apart (about 2e-6 here)
    torch.testing.assert_close(hooked, plain, rtol=0, atol=1e-5)
    assert torch.equal(kept[0], kept[1]), "a tensor a hook kept was overwritten later in the forward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_onednn_matches_the_module(dtype):
    from vae_core.layers import conv_onednn, onednn_ok

    for k, cin, cout in ((1, 32, 16), (3, 16, 16)):
        conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2).to(dtype).to(memory_format=CL)
        x = _t(1, cin, 20, 24, dtype=dtype)
        with torch.no_grad():
            if dtype == torch.bfloat16 and not cpu_half.NATIVE[dtype]:
                assert not onednn_ok(conv, x)  # oneDNN refuses bf16 on this CPU (test_cpu_half.py)
                continue
            assert onednn_ok(conv, x) and not onednn_ok(conv, x.contiguous())
            tol = 1e-5 if dtype == torch.float32 else 0.05
            torch.testing.assert_close(conv_onednn(conv, x).float(), conv(x).float(), rtol=0, atol=tol)
    assert not onednn_ok(conv, x)  # autograd on
