"""Exact tiling equals the untiled model on tiny configs: many tiles, odd sizes, batch 2."""
import pytest
import torch
import torch.nn.functional as F

from vae_core import AutoencoderKL
from vae_core import exact_tiling
from vae_core.exact_tiling import BandedStore, UpNode, InputNode, exact_tiled_decode, exact_tiled_encode
from vae_core.layers import Upsample2D
from vae_core.norm import GroupStats

from core_helpers import tiny_vae




def assert_fp32_close(out, ref):
    # fp32 (eps 1.2e-7) through ~30 layers, with statistics pooled in another order and the
    # upsampling conv summed in sub-pixel form: observed errors are ~1e-6 relative to the output
    # scale; 1e-4 leaves two orders of margin yet catches any tile seam (errors of order 1e-1).
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * max(1.0, scale))


class Counter:
    def __init__(self):
        self.calls = []

    def __call__(self, done, total):
        self.calls.append((done, total))


@pytest.mark.parametrize("tile", [16, 40])
def test_decode_matches_untiled(tile):
    model = tiny_vae()
    z = torch.randn(2, 4, 9, 13, generator=torch.Generator().manual_seed(1))  # 72x104 px, odd latent
    with torch.no_grad():
        ref = model._pixels(z)
    cb = Counter()
    out = exact_tiled_decode(model, z, tile_size=tile, callback=cb)
    assert out.shape == ref.shape == (2, 3, 72, 104)
    assert len(cb.calls) > 8, "the decode must actually run many tiles"
    assert cb.calls[-1][0] == cb.calls[-1][1]
    assert_fp32_close(out, ref)


@pytest.mark.parametrize("hw", [(72, 104), (67, 101)])
def test_encode_matches_untiled(hw):
    model = tiny_vae()
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ref = model._moments(x)
    cb = Counter()
    out = exact_tiled_encode(model, x, tile_size=24, callback=cb)
    assert out.shape == ref.shape
    assert len(cb.calls) > 8
    assert_fp32_close(out, ref)


@pytest.mark.parametrize("store_budget", [0, 6000, 10**9, None])
def test_recompute_and_store_policies_agree(store_budget):
    # 0: the leanest plan (recompute what does not fit under one resnet output); 1e9: store all
    model = tiny_vae()
    z = torch.randn(1, 4, 9, 13, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model._pixels(z)
    assert_fp32_close(exact_tiled_decode(model, z, tile_size=24, store_budget=store_budget), ref)


@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_more_store_budget_never_means_more_work_and_the_peak_stays_within_it(kind):
    model = tiny_vae()
    inp = torch.zeros(1, 4, 16, 16) if kind == "decode" else torch.zeros(1, 3, 128, 128)
    graph = exact_tiling._decoder_graph if kind == "decode" else exact_tiling._encoder_graph
    runs = []
    for budget in (0, 1, 2, 3, 1000):  # in largest resnet outputs
        src, out = graph(model, inp)
        trunk = max(n.channels * n.size[0] * n.size[1] for n in exact_tiling._topological(out)
                    if isinstance(n, exact_tiling.AddNode))
        run = exact_tiling._ExactRun(src, inp, out, 32, budget * trunk, None)
        runs.append((budget, run._stored_peak(run.passes) / trunk, run._work(run.passes)))
    lean_peak = runs[0][1]
    assert lean_peak <= 1.0 + 1e-9, "the leanest plan holds about one resnet output of checkpoints"
    for budget, peak, _work in runs:
        assert peak <= max(budget, lean_peak) + 1e-9
    works = [w for _b, _p, w in runs]
    assert works == sorted(works, reverse=True)
    assert works[-1] < works[0], "a large budget must save recomputation"


@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_planned_work_counts_the_convolutions_a_run_really_does(kind, monkeypatch):
    """planned_work is the plan's conv multiply-adds over the untiled model's. With one tile (no
    halos) a run must execute exactly that many: every conv call is counted as it runs (the 1x1
    shortcuts sent through F.conv2d too, so that no conv goes uncounted)."""
    model = tiny_vae()
    t = torch.randn(1, 4, 32, 32) if kind == "decode" else torch.rand(1, 3, 256, 256) * 2 - 1
    run = exact_tiled_decode if kind == "decode" else exact_tiled_encode
    real, executed = F.conv2d, []

    def counting(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
        y = real(x, w, b, stride, padding, dilation, groups)
        executed.append(y.shape[0] * y.shape[2] * y.shape[3] * w.numel())
        return y

    monkeypatch.setattr(F, "conv2d", counting)
    monkeypatch.setattr(exact_tiling, "onednn_ok", lambda *a: False)
    done = {}
    for budget in (0, 10**12):  # the leanest plan, and everything stored
        executed.clear()
        run(model, t, tile_size=1024, store_budget=budget)
        done[budget] = sum(executed)
    lean = exact_tiling.planned_work(kind, model, t, tile_size=1024, store_budget=0)
    assert exact_tiling.planned_work(kind, model, t, tile_size=1024, store_budget=10**12) == 1.0
    assert lean > 1.05, "the leanest plan recomputes conv1 outputs, so it must cost more than one pass"
    assert done[0] / done[10**12] == pytest.approx(lean, rel=1e-12)
    with pytest.raises(ValueError, match="kind"):
        exact_tiling.planned_work("both", model, t)


def test_store_budget_is_checked():
    with pytest.raises(ValueError, match="store_budget"):
        exact_tiled_decode(tiny_vae(), torch.randn(1, 4, 9, 13), tile_size=16, store_budget=-1)


def test_model_api_tiles_decode_and_encode(monkeypatch):
    model = tiny_vae()
    z = torch.randn(2, 4, 9, 13, generator=torch.Generator().manual_seed(4))
    x = torch.rand(2, 3, 72, 104, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        ref_dec = model.decode(z).sample
        ref_enc = model.encode(x).latent_dist.mean
    counts = {"decode": 0, "encode": 0}
    real_dec, real_enc = exact_tiling.exact_tiled_decode, exact_tiling.exact_tiled_encode

    def dec(*a, **k):
        counts["decode"] += 1
        return real_dec(*a, **k)

    def enc(*a, **k):
        counts["encode"] += 1
        return real_enc(*a, **k)

    monkeypatch.setattr(exact_tiling, "exact_tiled_decode", dec)
    monkeypatch.setattr(exact_tiling, "exact_tiled_encode", enc)
    model.enable_tiling(method="exact", tile_sample_min_size=32)
    with torch.no_grad():
        assert_fp32_close(model.decode(z).sample, ref_dec)
        assert_fp32_close(model.encode(x).latent_dist.mean, ref_enc)
    assert counts == {"decode": 1, "encode": 1}
    cb = Counter()
    with torch.no_grad():
        out = model.tiled_decode(z, callback=cb).sample
    assert len(cb.calls) > 1
    assert_fp32_close(out, ref_dec)
    # blend is still there, for parity with diffusers (it is not exact)
    with torch.no_grad():
        blend = model.tiled_decode(z, method="blend").sample
    assert blend.shape == ref_dec.shape


def test_callback_can_cancel_within_one_tile():
    model = tiny_vae()
    z = torch.randn(1, 4, 9, 13)
    seen = []

    def cancel(done, total):
        seen.append(done)
        if done == 5:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        exact_tiled_decode(model, z, tile_size=16, callback=cancel)
    assert seen == [1, 2, 3, 4, 5]


def test_subpixel_upsample_equals_nearest_then_conv():
    torch.manual_seed(0)
    up = Upsample2D(6)
    y = torch.randn(2, 6, 5, 7)
    node = UpNode(up.conv, InputNode([], (5, 7), 6, 1.0))
    with torch.no_grad():
        ref = up(y)
        out = node.compute([(y, (0, 5, 0, 7))], (0, 10, 0, 14))  # the whole input: the conv pads itself
        r = (1, 9, 3, 13)  # odd region bounds
        need = node.need(0, r)  # low-res rows/cols; -1 would be the zero padding
        have = (max(need[0], 0), min(need[1], 5), max(need[2], 0), min(need[3], 7))
        odd = node.compute([(y[:, :, have[0] : have[1], have[2] : have[3]], have)], r)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(odd, ref[:, :, 1:9, 3:13], rtol=0, atol=1e-5)


def test_pooled_group_stats_equal_whole_tensor_stats():
    t = torch.randn(2, 8, 13, 17) * 3 + 5  # offset mean: a naive sum-of-squares would lose digits
    stats = GroupStats(2, 4)
    for rows in ((0, 4), (4, 5), (5, 13)):
        for cols in ((0, 9), (9, 17)):
            stats.add(t[:, :, rows[0]:rows[1], cols[0]:cols[1]])
    mean, rstd = stats.finish(1e-6)
    g = t.double().reshape(2, 4, -1)
    torch.testing.assert_close(mean, g.mean(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd, torch.rsqrt(g.var(-1, correction=0) + 1e-6), rtol=1e-6, atol=0)


def test_math_attention_is_sliced_when_large(monkeypatch):
    model = tiny_vae()
    model.set_attn_processor("math")
    from vae_core import attention, memory

    monkeypatch.setattr(memory, "ATTENTION_SCORE_CAP", 2 * 117 * 8 * 10)  # ten query rows of 117 keys, batch 2
    attn = model.decoder.mid_block.attentions[0]
    chosen = attention.bounded_processor(attn.processor, (2, 32, 9, 13), torch.float32, "cpu")
    assert type(chosen).__name__ == "SlicedAttnProcessor" and chosen.slice_size == 10
    z = torch.randn(2, 4, 9, 13)
    with torch.no_grad():
        ref = model._pixels(z)
    assert_fp32_close(exact_tiled_decode(model, z, tile_size=24), ref)
    assert type(attn.processor).__name__ == "AttnProcessor", "the model's own processor must not change"


def test_bf16_exact_is_as_good_as_untiled_bf16():
    model = tiny_vae()
    z = torch.randn(1, 4, 9, 13, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref32 = model._pixels(z)
        model.to(torch.bfloat16)
        zb = z.to(torch.bfloat16)
        untiled = model._pixels(zb).float()
        tiled = exact_tiled_decode(model, zb, tile_size=24).float()
    err_untiled = (untiled - ref32).abs().max().item()
    err_tiled = (tiled - ref32).abs().max().item()
    # bf16 keeps 8 mantissa bits (eps 7.8e-3): both runs carry rounding of that order, differently
    # ordered; exact tiling must not add more than the same order again.
    assert err_tiled <= 2.0 * err_untiled + 1e-2 * ref32.abs().max().item()


def test_tile_size_too_small_is_rejected():
    with pytest.raises(ValueError, match="tile_size"):
        exact_tiled_decode(tiny_vae(), torch.randn(1, 4, 9, 13), tile_size=4)


def test_banded_store_releases_rows_no_tile_needs_any_more():
    t = torch.arange(2 * 3 * 10 * 4, dtype=torch.float32).view(2, 3, 10, 4)
    store = BandedStore(tuple(t.shape), [0, 4, 8, 10], t.dtype, t.device)
    for i, (a, b) in enumerate(((0, 4), (4, 8), (8, 10))):
        store.write(i, (0, 4), t[:, :, a:b])
    store.free_below(5)  # band 0 goes; band 1 would keep 3 of 4 rows: not worth a copy
    assert 0 not in store.bands and store.bands[1].shape[2] == 4
    store.free_below(7)  # band 1 keeps only row 7 (a halo), in a buffer of its own
    assert store.bands[1].shape[2] == 1
    torch.testing.assert_close(store.read((7, 10, 1, 3)), t[:, :, 7:10, 1:3], rtol=0, atol=0)
    with pytest.raises(AssertionError, match="released"):
        store.read((6, 8, 0, 4))
    with pytest.raises(AssertionError, match="partly released"):
        store.whole()
