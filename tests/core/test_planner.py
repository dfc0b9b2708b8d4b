"""The memory planner: estimates, the tiling decision, out-of-memory retry, and its report."""
import logging

import pytest
import torch

from vae_core import AutoencoderKL, AutoencoderKLConfig, memory, planner


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, layers_per_block=1, latent_channels=4,
    ).eval()


SD = AutoencoderKLConfig(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)

REPORT_KEYS = {"tiled", "tile_size", "method", "fp32_retry", "estimated_bytes", "seconds"}


@pytest.fixture
def small_tiles(monkeypatch):
    # tiny images need tiny tile candidates for the planner to choose among
    monkeypatch.setattr(planner, "TILE_CANDIDATES", (64, 40, 24))


def test_estimates_scale_with_area_dtype_and_attention():
    d1 = memory.estimate_bytes("decode", (1, 4, 128, 128), torch.float32, SD)
    d2 = memory.estimate_bytes("decode", (1, 4, 256, 256), torch.float32, SD)
    half = memory.estimate_bytes("decode", (1, 4, 256, 256), torch.bfloat16, SD)
    assert 3.5 < (d2 - memory.OVERHEAD_BYTES) / (d1 - memory.OVERHEAD_BYTES) < 4.5
    assert 1.9 < (d2 - memory.OVERHEAD_BYTES) / (half - memory.OVERHEAD_BYTES) < 2.1
    # SD-size, 2048^2, fp32: the untiled decode needs several GiB; exact 512 px tiles far less
    tiled = memory.estimate_tiled_bytes("decode", (1, 4, 256, 256), torch.float32, SD, 512)
    assert tiled < d2 / 2
    assert memory.estimate_bytes("encode", (1, 3, 2048, 2048), torch.float32, SD) > 4 * 2**30


def test_estimates_count_attention_scores_as_the_guard_bounds_them():
    from vae_core.attention import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor, score_rows

    cfg = tiny_vae().config  # widths 8..32: the mid-block attention is the largest layer at these sizes
    shape = (1, 4, 64, 64)  # 4096 positions: the whole (N, N) matrix is 128 MiB, under the cap
    fused = memory.estimate_bytes("decode", shape, torch.float32, cfg, score_rows(AttnProcessor2_0()))
    math = memory.estimate_bytes("decode", shape, torch.float32, cfg, score_rows(AttnProcessor()))
    sliced = memory.estimate_bytes("decode", shape, torch.float32, cfg, score_rows(SlicedAttnProcessor(64)))
    scores = 4096 * 4096 * 8  # fp32 scores and fp32 softmax
    assert math >= scores * memory.UNTILED_CALIBRATION["decode"]  # the scores become the largest layer
    assert fused <= sliced < math
    # 65536 positions: the whole matrix would be 32 GiB; the guard slices it, and the estimate says so
    big = (1, 4, 256, 256)
    whole = memory.estimate_bytes("decode", big, torch.float32, cfg, score_rows(AttnProcessor()))
    assert whole <= (memory.ATTENTION_SCORE_CAP + 2**30) * memory.UNTILED_CALIBRATION["decode"]
    assert memory.estimate_tiled_bytes("decode", big, torch.float32, cfg, 128, memory.ALL_ROWS) < 2 * 2**30


def test_free_memory_cpu_is_known():
    free = memory.free_memory(torch.device("cpu"))
    assert free is None or free > 0


def test_plan_untiled_when_it_fits_tiled_when_not(small_tiles):
    model = tiny_vae()
    z = torch.randn(1, 4, 9, 13)
    plan = planner.plan_decode(model, z, free_bytes=2**40)
    assert not plan.tiled and plan.tile_size is None
    need = memory.estimate_bytes("decode", z.shape, torch.float32, model.config)
    plan = planner.plan_decode(model, z, free_bytes=int(need * 0.5))
    assert plan.tiled and plan.method == "exact" and plan.tile_size in planner.TILE_CANDIDATES
    assert "exact tiling" in plan.reason or "trying anyway" in plan.reason


def test_run_decode_tiles_when_memory_is_short(small_tiles, caplog):
    model = tiny_vae()
    z = torch.randn(2, 4, 9, 13)
    with torch.no_grad():
        ref = model._pixels(z)
    calls = []
    with caplog.at_level(logging.INFO, logger="vae_core.planner"):
        out, report = planner.run_decode(model, z, free_bytes=1, callback=lambda d, t: calls.append(d))
    assert REPORT_KEYS <= set(report)
    assert report["tiled"] and report["method"] == "exact" and report["tile_size"] == 24
    assert len(calls) > 1, "must actually have run more than one tile"
    # fp32 exact tiling: see test_exact_tiling.assert_fp32_close for the tolerance
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * max(1.0, ref.abs().max().item()))
    assert any("exact tiling" in r.message or "trying anyway" in r.message for r in caplog.records)


def test_run_encode_untiled_report():
    model = tiny_vae()
    x = torch.rand(1, 3, 32, 40) * 2 - 1
    out, report = planner.run_encode(model, x, free_bytes=2**40)
    with torch.no_grad():
        ref = model._moments(x)
    assert report["tiled"] is False and report["tile_size"] is None and report["fp32_retry"] is False
    assert report["estimated_bytes"] > 0 and report["seconds"] >= 0
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # same code path, bit-identical


def test_out_of_memory_is_retried_tiled(monkeypatch, caplog):
    model = tiny_vae()
    z = torch.randn(1, 4, 9, 13)
    with torch.no_grad():
        ref = model._pixels(z)

    def oom(_z):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(model, "_pixels", oom)
    monkeypatch.setattr(planner, "TILE_CANDIDATES", (64, 40, 24))
    calls = []
    with caplog.at_level(logging.WARNING, logger="vae_core.planner"):
        out, report = planner.run_decode(model, z, free_bytes=2**40, callback=lambda d, t: calls.append(d))
    assert report["tiled"] and report["method"] == "exact"
    assert len(calls) > 1
    assert any("out of memory" in r.message for r in caplog.records)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * max(1.0, ref.abs().max().item()))


def test_user_tiling_on_the_model_is_honoured():
    model = tiny_vae()
    model.enable_tiling(method="blend", tile_sample_min_size=32)
    z = torch.randn(1, 4, 9, 13)
    out, report = planner.run_decode(model, z, free_bytes=2**40)
    assert report["tiled"] and report["method"] == "blend" and report["tile_size"] == 32
    with torch.no_grad():
        torch.testing.assert_close(out, model.tiled_decode(z).sample, rtol=0, atol=0)


def test_model_tiling_only_applies_to_inputs_larger_than_a_tile():
    model = tiny_vae()
    model.enable_tiling(method="exact", tile_sample_min_size=512)
    z = torch.randn(1, 4, 9, 13)  # 72x104 px: smaller than one 512 px tile
    out, report = planner.run_decode(model, z, free_bytes=2**40)
    assert report["tiled"] is False
    with torch.no_grad():
        torch.testing.assert_close(out, model._pixels(z), rtol=0, atol=0)


def test_planned_exact_runs_give_checkpoints_what_free_memory_leaves(small_tiles, monkeypatch):
    # The planner's free memory, not the machine's, sets how much the tiler may store; after an
    # out-of-memory error it retries with the leanest plan.
    from vae_core import exact_tiling

    model = tiny_vae()
    z = torch.randn(1, 4, 40, 40)
    seen = []
    real = exact_tiling.exact_tiled_decode

    def spy(m, t, **kw):
        seen.append(kw.get("store_budget"))
        return real(m, t, **kw)

    monkeypatch.setattr(exact_tiling, "exact_tiled_decode", spy)
    need = memory.estimate_bytes("decode", tuple(z.shape), torch.float32, model.config)
    free = int(need / memory.SAFETY) - 1  # untiled just does not fit; the tile chosen leaves some over
    _out, report = planner.run_decode(model, z, free_bytes=free)
    assert report["tiled"] and len(seen) == 1
    assert seen[0] == exact_tiling.store_budget_for("decode", model, z, report["tile_size"], free)
    assert 0 < seen[0] < free
    assert exact_tiling.store_budget_for("decode", model, z, 24, None) == 0

    def oom(_z):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(model, "_pixels", oom)
    seen.clear()
    _out, report = planner.run_decode(model, z, free_bytes=2**40)
    assert report["tiled"] and seen == [0]
