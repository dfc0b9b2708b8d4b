"""GroupNorm statistics stay accurate on large channels_last CPU tensors, where torch's kernel drifts."""
import torch
import torch.nn.functional as F

from vae_core import norm
from vae_core.norm import GroupNorm, GroupStats


def _module(channels=64, groups=32):
    torch.manual_seed(0)
    gn = GroupNorm(groups, channels, eps=1e-6)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    return gn


def _offset_input(channels, size):
    g = torch.Generator().manual_seed(1)
    # an offset mean per channel, as resnet outputs have: fp32 sums of squares lose digits here
    x = torch.randn(1, channels, size, size, generator=g) + 3.0 + torch.randn(1, channels, 1, 1, generator=g)
    return x.contiguous(memory_format=torch.channels_last)


def test_channels_last_group_norm_matches_float64_where_torch_drifts():
    gn = _module()
    x = _offset_input(64, 512)
    ref = F.group_norm(x.double(), 32, gn.weight.double(), gn.bias.double(), 1e-6)
    with torch.no_grad():
        ours = gn(x)
        theirs = F.group_norm(x, 32, gn.weight, gn.bias, 1e-6)  # torch's channels_last CPU kernel
    assert ours.is_contiguous(memory_format=torch.channels_last)
    ours_err = (ours.double() - ref).abs().max().item()
    theirs_err = (theirs.double() - ref).abs().max().item()
    nchw_err = (F.group_norm(x.contiguous(), 32, gn.weight, gn.bias, 1e-6).double() - ref).abs().max().item()
    # fp32 rounding of the output itself (values up to ~20) is ~2e-6; torch's NCHW kernel gets there too
    assert ours_err <= 2 * nchw_err + 1e-6, (ours_err, nchw_err)
    assert theirs_err > 10 * ours_err, "the drift this module exists for has gone from torch; revisit norm.py"


def test_group_norm_takes_torch_path_for_nchw_and_autograd():
    gn = _module(8, 4)
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(gn(x), F.group_norm(x, 4, gn.weight, gn.bias, 1e-6), rtol=0, atol=0)
    xl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y = gn(xl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.square().sum().backward()
    xr = x.clone().requires_grad_()
    F.group_norm(xr, 4, gn.weight, gn.bias, 1e-6).square().sum().backward()
    torch.testing.assert_close(xl.grad, xr.grad, rtol=1e-5, atol=1e-6)


def test_group_stats_chunks_channels_last_rows_and_batches(monkeypatch):
    monkeypatch.setattr(norm, "CHUNK_PIXELS", 20)  # 13 x 17 tiles split into bands of one row
    t = (torch.randn(3, 8, 13, 17) * 2 + 4).contiguous(memory_format=torch.channels_last)
    stats = GroupStats(3, 2)
    stats.add(t[:, :, :6])
    stats.add(t[:, :, 6:])
    assert len(stats.counts) == 13
    mean, rstd = stats.finish(1e-6)
    g = t.double().reshape(3, 2, -1)
    torch.testing.assert_close(mean, g.mean(-1), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(rstd, torch.rsqrt(g.var(-1, correction=0) + 1e-6), rtol=1e-6, atol=0)


def test_half_precision_input_keeps_its_dtype():
    gn = _module(8, 4)
    x = torch.randn(1, 8, 6, 6).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = gn.to(torch.bfloat16)(x)
    ref = F.group_norm(x.float().contiguous(), 4, gn.weight.float(), gn.bias.float(), 1e-6)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)


class _CopyingStats(GroupStats):
    """The statistics as they were taken before: each dense piece copied to fp32 first."""

    def _add_dense(self, t, fmt):
        super()._add_dense(t.float().contiguous(memory_format=fmt), fmt)


def test_half_precision_statistics_match_those_of_an_fp32_copy(monkeypatch):
    """bf16/fp16 channels_last chunks go to the statistics kernel as they are (it accumulates in fp32
    when handed fp32 running buffers): their moments are those of the fp32 copies it used to get,
    within an fp32 rounding, and as accurate against float64, over row chunks, batches and crops of a
    wider tensor; NCHW pieces are still copied, so theirs are the same to the last bit."""
    monkeypatch.setattr(norm, "CHUNK_PIXELS", 40)
    kernel = torch.batch_norm_update_stats
    seen = []  # the dtypes the statistics kernel is handed

    def recording(x, *args):
        seen.append(x.dtype)
        return kernel(x, *args)

    monkeypatch.setattr(torch, "batch_norm_update_stats", recording)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 12, 13, 19, generator=g) * 2 + 5 + torch.randn(1, 12, 1, 1, generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        wide = base.to(dtype).contiguous(memory_format=torch.channels_last)
        half, copied = GroupStats(2, 3), _CopyingStats(2, 3)
        for p in (wide[:, :, :7, :11], wide[:, :, 7:, :11], wide[:, :, :, 11:]):
            seen.clear()
            half.add(p)
            assert seen and set(seen) == {dtype}, "the half-precision chunks were copied to fp32 first"
            copied.add(p)
        assert len(half.counts) == len(copied.counts) > 3
        for a, b in zip(half.means + half.m2s, copied.means + copied.m2s):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
        (mean, rstd), (mean_c, rstd_c) = half.finish(1e-6), copied.finish(1e-6)
        rows = wide.double().reshape(2, 3, -1)
        exact_mean, exact_rstd = rows.mean(-1), torch.rsqrt(rows.var(-1, correction=0) + 1e-6)
        # fp32 moments of the rounded values, not moments rounded to bf16/fp16
        torch.testing.assert_close(mean, exact_mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(rstd, exact_rstd, rtol=1e-5, atol=0)
        assert (rstd - exact_rstd).abs().max() <= 2 * (rstd_c - exact_rstd).abs().max() + 1e-12

        nchw, nchw_copied = GroupStats(2, 3), _CopyingStats(2, 3)
        seen.clear()
        nchw.add(wide.contiguous())
        assert set(seen) == {torch.float32}, "NCHW pieces keep their fp32 copy"
        nchw_copied.add(wide.contiguous())
        for a, b in zip(nchw.means + nchw.m2s, nchw_copied.means + nchw_copied.m2s):
            assert torch.equal(a, b), dtype


def test_forward_in_place_gives_the_same_numbers_in_the_same_buffer():
    gn = _module()
    for dtype in (torch.float32, torch.bfloat16):
        for batch in (1, 2):
            x = torch.cat([_offset_input(64, 48)] * batch).to(dtype).contiguous(memory_format=torch.channels_last)
            for ctx in (torch.no_grad, torch.inference_mode):
                with ctx():
                    y = x.clone()
                    ref = gn(x)
                    out = gn.forward_(y)
                assert out.data_ptr() == y.data_ptr(), (dtype, batch, ctx)
                assert torch.equal(out, ref), (dtype, batch, ctx)


def test_forward_in_place_falls_back_where_it_is_not_safe():
    gn = _module()
    x = _offset_input(64, 32)
    with torch.no_grad():
        ref = gn(x)
        nchw = x.contiguous()
        assert gn.forward_(nchw).data_ptr() != nchw.data_ptr()  # NCHW: torch's own kernel, a new tensor
        crop = x[:, :, :, :16]  # a view into a caller's tensor that is not dense
        assert gn.forward_(crop).data_ptr() != crop.data_ptr()
    seen = []
    handle = gn.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            y = x.clone()
            out = gn.forward_(y)  # with a hook the module is called normally
    finally:
        handle.remove()
    assert seen and out.data_ptr() != y.data_ptr() and torch.equal(y, x) and torch.equal(out, ref)
    # with autograd the input is left alone (it is needed for the backward pass)
    xg = x.clone().requires_grad_(True)
    out = gn.forward_(xg)
    assert out.data_ptr() != xg.data_ptr() and out.requires_grad


def test_resnet_in_place_norm_leaves_hooked_intermediates_alone():
    """A forward hook on conv1 keeps its output: the resnet must not normalise that tensor in place."""
    from vae_core.layers import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(32, 32, 8).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 32, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain = block(x)
        kept = []
        handle = block.conv1.register_forward_hook(lambda m, i, o: kept.append(o))
        try:
            hooked = block(x)
        finally:
            handle.remove()
        expected_conv1 = block.conv1(F.silu(block.norm1(x)))
    assert torch.equal(plain, hooked)
    assert torch.equal(kept[0], expected_conv1)
