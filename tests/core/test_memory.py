"""vae_core/memory.py, the one memory model, and what rests on it: the attention guard (no processor
builds a score matrix over the budget), batch splits in the planner, and vae_core's import graph.
Budgets are injected; nothing large is allocated (the 2048^2 cases only choose, never run)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from vae_core import attention, memory, planner
from vae_core.attention import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor, bounded_processor
from vae_core.exact_tiling import exact_tiled_decode

from core_helpers import tiny_vae

VAE_CORE = Path(memory.__file__).resolve().parent


# -- the import graph --------------------------------------------------------------------------------


def _imports(path: Path) -> set:
    """vae_core modules `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
    return found


def test_vae_core_has_no_import_circle():
    graph = {p.stem: _imports(p) & {q.stem for q in VAE_CORE.glob("*.py")} for p in VAE_CORE.glob("*.py")
             if p.stem != "__init__"}
    assert "planner" not in graph["exact_tiling"] and graph["memory"] == set()

    def visit(name, path):
        for dep in graph.get(name, ()):
            assert dep not in path, f"import circle: {' -> '.join(path + [dep])}"
            visit(dep, path + [dep])

    for name in graph:
        visit(name, [name])


# -- the attention guard -----------------------------------------------------------------------------


SD_MID_2048 = (1, 512, 256, 256)  # the SD decoder's mid block for a 2048^2 latent: 65,536 positions


def test_math_attention_on_a_2048_latent_is_sliced_not_quadratic():
    whole = memory.score_bytes(1, 65536, 65536, torch.float32)
    assert whole == 32 * 2**30  # fp32 scores + fp32 softmax: what `math` would build at once
    with memory.attention_free_bytes(64 * 2**30):  # even with plenty free, never more than the cap at once
        chosen = bounded_processor(AttnProcessor(), SD_MID_2048, torch.float32, "cpu")
    assert isinstance(chosen, SlicedAttnProcessor)
    assert memory.score_bytes(1, chosen.slice_size, 65536, torch.float32) <= memory.ATTENTION_SCORE_CAP
    with memory.attention_free_bytes(1 * 2**30):  # short of memory: a fraction of what is free
        small = bounded_processor(AttnProcessor(), SD_MID_2048, torch.float32, "cpu")
    assert memory.score_bytes(1, small.slice_size, 65536, torch.float32) <= memory.budget(2**30)


def test_every_processor_is_bounded():
    def foreign(attn, hidden_states, *args, **kwargs):  # e.g. a diffusers processor object: assumed quadratic
        raise AssertionError("not called")

    with memory.attention_free_bytes(2**30):
        assert isinstance(bounded_processor(foreign, SD_MID_2048, torch.float32, "cpu"), SlicedAttnProcessor)
        huge = bounded_processor(SlicedAttnProcessor(1 << 20), SD_MID_2048, torch.bfloat16, "cpu")
        assert isinstance(huge, SlicedAttnProcessor) and huge.slice_size < 1 << 20
        fused = AttnProcessor2_0()  # no score matrix: unchanged
        assert bounded_processor(fused, SD_MID_2048, torch.float32, "cpu") is fused
        small = AttnProcessor()  # fits: unchanged
        assert bounded_processor(small, (1, 512, 32, 32), torch.float32, "cpu") is small


def test_an_attention_that_cannot_fit_one_row_is_refused_clearly():
    with memory.attention_free_bytes(1024), pytest.raises(ValueError, match=r"65536 positions .*even one query row"):
        bounded_processor(AttnProcessor(), SD_MID_2048, torch.float32, "cpu")


@pytest.fixture()
def score_spy(score_recorder):
    """(batch, queries, keys) of every score matrix vae_core's plain-matmul kernel builds."""
    return score_recorder(attention)


@pytest.mark.parametrize("path", ["decode", "encode", "planner", "exact"])
def test_untiled_and_tiled_runs_stay_within_a_small_attention_budget(score_spy, path):
    model = tiny_vae()
    model.set_attn_processor("math")
    z = torch.randn(2, 4, 12, 16, generator=torch.Generator().manual_seed(0))  # 192 positions
    x = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    limit = 2 * 192 * 8 * 10  # ten query rows of scores for the batch of 2
    with torch.no_grad():
        ref = model._pixels(z) if path != "encode" else model._moments(x)
        score_spy.clear()
        with memory.attention_free_bytes(int(limit / memory.SAFETY) + 8):
            if path == "decode":
                out = model.decode(z).sample
            elif path == "encode":
                out = model.encode(x).latent_dist.parameters
            elif path == "planner":
                out, _report = planner.run_decode(model, z)
            else:
                out = exact_tiled_decode(model, z, tile_size=32)
    assert score_spy and max(b * q * k * 8 for b, q, k in score_spy) <= limit
    assert len(score_spy) > 1  # sliced: more than one matrix per attention call
    # slicing changes no value beyond kernel rounding (each query's softmax is independent); fp32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * max(1.0, ref.abs().max().item()))
    assert type(model.decoder.mid_block.attentions[0].processor) is AttnProcessor  # the model is unchanged


# -- batches -------------------------------------------------------------------------------------------


def test_chunk_estimates_grow_with_the_chunk_and_largest_chunk_is_the_largest_that_fits():
    cfg = tiny_vae().config
    shape = (9, 4, 16, 16)
    sizes = [memory.chunk_bytes("decode", shape, k, torch.float32, cfg) for k in range(1, 10)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    for k in (1, 4, 9):
        assert memory.largest_chunk("decode", shape, sizes[k - 1], torch.float32, cfg) == k
    assert memory.largest_chunk("decode", shape, sizes[0] - 1, torch.float32, cfg) == 0
    assert memory.chunk_bytes("decode", shape, 9, torch.float32, cfg) == memory.estimate_bytes("decode", shape,
                                                                                              torch.float32, cfg)


def test_the_planner_splits_a_batch_that_does_not_fit_whole():
    model = tiny_vae()
    z = torch.randn(6, 4, 9, 13, generator=torch.Generator().manual_seed(3))
    fits_two = memory.chunk_bytes("decode", tuple(z.shape), 2, torch.float32, model.config)
    free = int(fits_two / memory.SAFETY) + 1
    calls = []
    out, report = planner.run_decode(model, z, free_bytes=free, callback=lambda d, t: calls.append((d, t)))
    assert (report["tiled"], report["batch_chunk"], report["batch_runs"]) == (False, 2, 3)
    assert "in 3 runs of up to 2 images" in report["reason"]
    assert [d for d, _t in calls] == sorted(d for d, _t in calls) and calls[-1][0] == calls[-1][1]
    assert {t for _d, t in calls} == {calls[-1][1]}  # one total for the whole batch
    with torch.no_grad():
        ref = model._pixels(z)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)  # fp32, per-image identical maths


def test_when_one_image_does_not_fit_untiled_the_planner_tiles_and_splits():
    model = tiny_vae()
    z = torch.zeros(4, 4, 64, 64)  # 512^2 px; planned only, never run
    one = memory.chunk_bytes("decode", tuple(z.shape), 1, torch.float32, model.config)
    tiled = memory.chunk_bytes("decode", tuple(z.shape), 1, torch.float32, model.config, method="exact", tile_size=128)
    assert tiled < one
    free = int(tiled / memory.SAFETY) + 1
    plan = planner.plan_decode(model, z, free_bytes=free)
    assert plan.tiled and plan.method == "exact" and plan.chunk is not None and plan.chunk < 4
    assert plan.estimated_bytes <= memory.budget(free)
    assert f"runs of up to {plan.chunk} image" in plan.reason


def test_the_memory_model_reads_only_the_fields_the_web_grid_carries():
    # nodes/grid.py MODEL_FIELDS (what akl_grid sends to web/akl_lib.js); a new field read here must go there
    import inspect
    import re

    used = set(re.findall(r"config\.(\w+)", inspect.getsource(memory)))
    assert used == {"block_out_channels", "latent_channels", "in_channels", "out_channels", "mid_block_add_attention"}
    grid_src = (VAE_CORE.parent / "nodes" / "grid.py").read_text()
    assert all(f'"{f}"' in grid_src for f in used)


def test_a_foreign_processor_run_sliced_keeps_progress_within_its_total():
    model = tiny_vae()
    calls = []
    model.set_attn_processor(lambda attn, x, *a, **k: AttnProcessor()(attn, x))  # unknown: counted as matmul
    z = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(5))
    with memory.attention_free_bytes(int(192 * 8 * 10 / memory.SAFETY) + 8):  # ten rows of scores
        _out, report = planner.run_decode(model, z, callback=lambda d, t: calls.append((d, t)))
    assert calls[-1][0] == calls[-1][1] and all(d <= t for d, t in calls)


def test_a_processor_may_declare_its_score_rows():
    class Fused:
        score_rows = 0  # e.g. a wrapped fused kernel: no score matrix

        def __call__(self, attn, hidden_states, *args, **kwargs):
            raise AssertionError("not called")

    proc = Fused()
    with memory.attention_free_bytes(1024):
        assert bounded_processor(proc, SD_MID_2048, torch.float32, "cpu") is proc
