"""Attention processors: each one against the plain matmul reference, the registry and the mapping API."""
from __future__ import annotations

import pytest
import torch

from core_helpers import CONFIGS, assert_close_fp32, make_pair

from vae_core import (AttnProcessor, AttnProcessor2_0, AttnProcessorBase, AutoencoderKL, SlicedAttnProcessor,
                      XFormersAttnProcessor, available_attn_processors, register_attn_processor)


def _decode_with(model, processor, z):
    model.set_attn_processor(processor)
    with torch.no_grad():
        return model.decode(z).sample


@pytest.mark.parametrize("name", ["sd_layout", "flux_layout"])
def test_every_processor_matches_the_plain_one(name):
    _, ours = make_pair(name)
    c = CONFIGS[name]["latent_channels"]
    z = torch.randn(2, c, 9, 7, generator=torch.Generator().manual_seed(0))
    reference = _decode_with(ours, AttnProcessor(), z)
    for proc in (AttnProcessor2_0(), SlicedAttnProcessor(5), SlicedAttnProcessor(1), SlicedAttnProcessor(10_000),
                 "sdpa", "sliced", "math"):
        assert_close_fp32(_decode_with(ours, proc, z), reference)


def test_processor_mapping_and_dict_form():
    ref, ours = make_pair("sd_layout")
    assert set(ours.attn_processors) == set(ref.attn_processors) == {
        "encoder.mid_block.attentions.0.processor", "decoder.mid_block.attentions.0.processor"}
    assert all(isinstance(p, AttnProcessor2_0) for p in ours.attn_processors.values()), "SDPA is the default"
    ours.set_attn_processor({"encoder.mid_block.attentions.0.processor": "math",
                             "decoder.mid_block.attentions.0.processor": SlicedAttnProcessor(3)})
    procs = ours.attn_processors
    assert isinstance(procs["encoder.mid_block.attentions.0.processor"], AttnProcessor)
    assert procs["decoder.mid_block.attentions.0.processor"].slice_size == 3
    with pytest.raises(ValueError, match="attention modules are"):
        ours.set_attn_processor({"decoder.mid_block.attentions.0.processor": "math"})
    # diffusers' set_default_attn_processor picks its plain AttnProcessor for a VAE: so does ours
    ref.set_default_attn_processor()
    ours.set_default_attn_processor()
    assert {type(p).__name__ for p in ref.attn_processors.values()} == {"AttnProcessor"}
    assert all(type(p) is AttnProcessor for p in ours.attn_processors.values())


def _diffusers_processors():
    from diffusers.models import attention_processor as dap

    procs = [dap.AttnProcessor(), dap.AttnProcessor2_0(), dap.SlicedAttnProcessor(slice_size=1)]
    try:
        procs.append(dap.XFormersAttnProcessor())
        import xformers.ops  # noqa: F401
    except ImportError:
        procs.pop()  # xformers is not installed here: that processor cannot run in either model
    return procs


@pytest.mark.parametrize("name", ["sd_layout", "flux_layout"])
def test_diffusers_processor_objects_run_and_match_diffusers(name):
    """diffusers' own processors, set on our model, read our Attention as theirs and give diffusers' output."""
    pytest.importorskip("diffusers")
    ref, ours = make_pair(name)
    x = torch.rand(2, 3, 24, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    for proc in _diffusers_processors():
        ref.set_attn_processor(proc)
        ours.set_attn_processor(proc)
        assert all(p is proc for p in ours.attn_processors.values())
        with torch.no_grad():
            assert_close_fp32(ours(x).sample, ref(x).sample)
            assert_close_fp32(ours.encode(x).latent_dist.mean, ref.encode(x).latent_dist.mean)


def test_attention_helpers_match_diffusers_attention():
    """The helpers diffusers' processors call (heads <-> batch, masks, scores) agree with diffusers' Attention."""
    pytest.importorskip("diffusers")
    ref, ours = make_pair("sd_layout")
    a = ref.decoder.mid_block.attentions[0]
    b = ours.decoder.mid_block.attentions[0]
    for attr in ("heads", "scale", "rescale_output_factor", "residual_connection", "upcast_softmax",
                 "upcast_attention", "spatial_norm", "norm_cross", "norm_q", "norm_k", "is_cross_attention"):
        assert getattr(b, attr) == getattr(a, attr), attr
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 6, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    torch.testing.assert_close(b.head_to_batch_dim(q), a.head_to_batch_dim(q))
    torch.testing.assert_close(b.batch_to_head_dim(q), a.batch_to_head_dim(q))
    torch.testing.assert_close(b.get_attention_scores(q, k), a.get_attention_scores(q, k))
    mask = torch.randn(2, 1, 5, generator=g)
    torch.testing.assert_close(b.prepare_attention_mask(mask, 5, 2), a.prepare_attention_mask(mask, 5, 2))
    full = b.prepare_attention_mask(mask.expand(2, 6, 5), 5, 2)
    torch.testing.assert_close(b.get_attention_scores(q, k, full), a.get_attention_scores(q, k, full))
    assert b.prepare_attention_mask(None, 5, 2) is None


def test_named_processors_and_errors():
    m = AutoencoderKL(**CONFIGS["sd_layout"])
    m.set_attn_processor("sliced", slice_size=16)
    assert {p.slice_size for p in m.attn_processors.values()} == {16}
    with pytest.raises(ValueError, match="unknown attention processor 'flash3'"):
        m.set_attn_processor("flash3")
    with pytest.raises(ValueError, match="slice_size"):
        SlicedAttnProcessor(0)
    assert {"math", "sdpa", "sliced"} <= set(available_attn_processors())


def test_xformers_is_a_clear_error_when_missing():
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="xformers"):
            XFormersAttnProcessor()
        assert "xformers" not in available_attn_processors()
    else:
        pytest.skip("xformers is installed here")


def test_registry_accepts_a_custom_processor():
    calls = []

    class Counting(AttnProcessor):
        def attend(self, attn, q, k, v):
            calls.append(q.shape)
            return super().attend(attn, q, k, v)

    register_attn_processor("counting-test", lambda **kw: Counting(), overwrite=True)
    with pytest.raises(ValueError, match="already registered"):
        register_attn_processor("counting-test", lambda **kw: Counting())
    m = AutoencoderKL(**CONFIGS["sd_layout"]).eval()
    z = torch.randn(1, 4, 4, 4)
    ref = _decode_with(m, "math", z)
    out = _decode_with(m, "counting-test", z)
    assert calls == [torch.Size([1, 16, 32])]
    assert_close_fp32(out, ref)
    assert isinstance(m.attn_processors["decoder.mid_block.attentions.0.processor"], AttnProcessorBase)


def test_sliced_processor_bounds_the_score_matrix():
    """The sliced processor never materialises more than slice_size x N scores."""
    seen = []
    import vae_core.attention as attention

    original = attention._math_attention

    def spy(q, k, v, scale):
        seen.append(q.shape[1] * k.shape[1])
        return original(q, k, v, scale)

    attention._math_attention = spy
    try:
        m = AutoencoderKL(**CONFIGS["sd_layout"]).eval()
        m.set_attn_processor(SlicedAttnProcessor(8))
        with torch.no_grad():
            m.decode(torch.randn(1, 4, 8, 8))
    finally:
        attention._math_attention = original
    assert seen and max(seen) == 8 * 64


def test_fuse_qkv_projections_matches_diffusers():
    """fuse_qkv_projections: one (C -> 3C) linear, the same output as diffusers' fused model; unfuse restores
    diffusers' state-dict keys."""
    pytest.importorskip("diffusers")
    ref, ours = make_pair("sd_layout")
    z = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain = ours.decode(z).sample
        ref.fuse_qkv_projections()
        ours.fuse_qkv_projections()
        assert ours.decoder.mid_block.attentions[0].to_qkv.weight.shape == (96, 32)
        for proc in ("sdpa", "math", "sliced"):
            ours.set_attn_processor(proc)
            assert_close_fp32(ours.decode(z).sample, ref.decode(z).sample)
        assert_close_fp32(ours.decode(z).sample, plain)
        ours.unfuse_qkv_projections()
    assert not any("to_qkv" in k for k in ours.state_dict())
    assert list(ours.state_dict()) == [k for k in ref.state_dict() if "to_qkv" not in k]


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (True, False, True),    # AMD EPYC (Zen 4): flash kernel slow in bf16, matmuls native
    (True, True, False),    # Intel Xeon with AMX: the flash kernel is the faster one
    (False, False, False),  # no native bf16: matmuls emulated
])
def test_bf16_matmul_attention_is_chosen_only_without_amx(monkeypatch, avx512_bf16, amx, expected):
    from vae_core import attention

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert attention._cpu_bf16_matmul.__wrapped__() is expected


def test_sdpa_in_bf16_on_the_cpu_runs_chunked_matmuls_at_bf16_accuracy(monkeypatch):
    """AttnProcessor2_0 in bf16 on a CPU with AVX512-BF16 but no AMX runs matmul attention over
    bounded query chunks (torch's CPU flash kernel runs bf16 at fp32 speed there); elsewhere SDPA.
    Both paths are checked on any CPU. The chunked path's error against a float64
    reference must stay at bf16's level, within 3x SDPA's own; chunking must change nothing (each
    query row is computed alone); and fp32 must still go to SDPA itself."""
    import torch.nn.functional as F

    from vae_core import attention

    attn = attention.Attention(64, 8)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 300, 64, generator=gen) for _ in range(3))
    ref = attention._math_attention(q.double(), k.double(), v.double(), attn.scale)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    sdpa = F.scaled_dot_product_attention(qb[:, None], kb[:, None], vb[:, None])[:, 0]
    out = AttnProcessor2_0().attend(attn, qb, kb, vb)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    err, sdpa_err = ((t.double() - ref).abs().max().item() for t in (out, sdpa))
    assert err < 2 ** -7 and err < 3 * sdpa_err, (err, sdpa_err)
    whole = attention._math_attention(qb, kb, vb, attn.scale)  # the whole-matrix maths
    assert torch.equal(out, whole if attention._cpu_bf16_matmul() else sdpa.to(torch.bfloat16))
    # both paths, whichever this CPU takes
    monkeypatch.setattr(attention, "_cpu_bf16_matmul", lambda: True)
    chunked = AttnProcessor2_0().attend(attn, qb, kb, vb)
    assert torch.equal(chunked, whole)
    err = (chunked.double() - ref).abs().max().item()
    assert err < 2 ** -7 and err < 3 * sdpa_err, (err, sdpa_err)
    monkeypatch.setattr(attention, "CPU_BF16_CHUNK_BYTES", 8 * 300 * 7)  # 7 query rows per chunk
    assert torch.equal(AttnProcessor2_0().attend(attn, qb, kb, vb), chunked)  # each row's maths is its own
    monkeypatch.setattr(attention, "_cpu_bf16_matmul", lambda: False)
    assert torch.equal(AttnProcessor2_0().attend(attn, qb, kb, vb), sdpa.to(torch.bfloat16))
    # fp32 (and every dtype off the CPU) is SDPA's own result
    fp32 = AttnProcessor2_0().attend(attn, q, k, v)
    assert torch.equal(fp32, F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0])
