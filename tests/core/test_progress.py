"""Progress and cancel points inside long runs: untiled layer by layer, attention chunk by chunk."""
import pytest
import torch

from vae_core import attention, exact_tiling, planner
from vae_core.attention import attention_progress

from core_helpers import tiny_vae


class Cancelled(Exception):
    pass


def _recorder():
    calls = []
    return calls, lambda done, total: calls.append((done, total))


@pytest.mark.parametrize("processor", ["sdpa", "math", "sliced"])
def test_chunked_attention_equals_whole_and_reports_each_chunk(monkeypatch, processor):
    monkeypatch.setattr(attention, "QUERY_CHUNK", 16)
    model = tiny_vae()
    model.set_attn_processor(processor)
    attn = model.decoder.mid_block.attentions[0]
    x = torch.randn(2, attn.channels, 7, 9)  # 63 tokens: 4 chunks, the last one short
    calls, hook = _recorder()
    with torch.no_grad():
        whole = attn(x)
        with attention_progress(attn, hook):
            chunked = attn(x)
    assert attn.progress is None
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_untiled_planner_run_ticks_per_layer_and_can_be_cancelled(monkeypatch):
    monkeypatch.setattr(attention, "QUERY_CHUNK", 8)
    model = tiny_vae()
    z = torch.randn(1, 4, 6, 6)  # 36 latent tokens: 5 attention steps
    calls, cb = _recorder()
    out, report = planner.run_decode(model, z, callback=cb, free_bytes=2**40)
    assert not report["tiled"]
    total = calls[0][1]
    n_layers = sum(isinstance(m, (planner.ResnetBlock2D, planner.Upsample2D)) for m in model.decoder.modules())
    assert total == n_layers + 5
    assert calls == [(i, total) for i in range(total + 1)]
    with torch.no_grad():
        torch.testing.assert_close(out, model._pixels(z), rtol=0, atol=1e-5)

    def cancel_at_third(done, total):
        if done == 3:
            raise Cancelled
    with pytest.raises(Cancelled):
        planner.run_decode(model, z, callback=cancel_at_third, free_bytes=2**40)
    assert all(not m._forward_hooks for m in model.modules()), "hooks must be removed after a cancel"
    assert model.decoder.mid_block.attentions[0].progress is None


def test_untiled_encode_counts_attention_at_the_lowest_resolution(monkeypatch):
    monkeypatch.setattr(attention, "QUERY_CHUNK", 4)
    model = tiny_vae()
    x = torch.rand(1, 3, 24, 40) * 2 - 1
    calls, cb = _recorder()
    planner.run_encode(model, x, callback=cb, free_bytes=2**40)
    f = model.config.downscale_factor
    steps = -(-(24 // f) * (40 // f) // 4)
    n_layers = sum(isinstance(m, (planner.ResnetBlock2D, planner.Downsample2D)) for m in model.encoder.modules())
    assert calls[-1] == (n_layers + steps, n_layers + steps)


def test_exact_tiling_ticks_inside_the_whole_latent_attention(monkeypatch):
    monkeypatch.setattr(attention, "QUERY_CHUNK", 8)
    model = tiny_vae()
    z = torch.randn(1, 4, 8, 10)  # 80 tokens: 10 attention steps
    calls, cb = _recorder()
    with torch.no_grad():
        ref = model._pixels(z)
        out = exact_tiling.exact_tiled_decode(model, z, tile_size=32, callback=cb)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    total = calls[-1][1]
    assert calls == [(i, total) for i in range(1, total + 1)]
    seen = []

    def cancel_in_attention(done, total):
        seen.append(done)
        if model.decoder.mid_block.attentions[0].progress is not None and len(seen) > 1:
            raise Cancelled  # second call from inside the attention
    with pytest.raises(Cancelled), torch.no_grad():
        exact_tiling.exact_tiled_decode(model, z, tile_size=32, callback=cancel_in_attention)
    assert model.decoder.mid_block.attentions[0].progress is None
