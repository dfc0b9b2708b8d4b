"""The nodes and the one memory model: the tiled nodes' default method, batches split by memory
instead of refused (progress over the whole batch, the split in the run report), the RAM guard,
grid and host hooks asking vae_core.memory. Free memory is injected; nothing large is allocated."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def progress(pack):
    import comfy.utils

    events = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: events.append((value, total)))
    yield events
    comfy.utils.set_progress_bar_global_hook(old)


@pytest.fixture(scope="module")
def thin_vae(pack):
    """Our VAE object around a very thin f=8 model (4 channels per level): a 512^2 decode is cheap."""
    torch.manual_seed(0)
    core = pack.vae_core.AutoencoderKL(block_out_channels=(4, 4, 4, 4), layers_per_block=1, norm_num_groups=2,
                                       latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                                       up_block_types=("UpDecoderBlock2D",) * 4).eval()
    return pack.nodes.vae_object.build(core, name="thin")


def _inject_free(pack, monkeypatch, free: int) -> None:
    """Pretend the server has `free` bytes: system memory (the RAM guard) and the planner's figure."""
    monkeypatch.setattr(pack.nodes.run, "available_ram", lambda: free)
    monkeypatch.setattr(pack.nodes.run, "_free_bytes", lambda vae: free)


# -- the default method ----------------------------------------------------------------------------


def test_tiled_nodes_default_to_exact_when_the_prompt_omits_method(nc, loader):
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(0))  # 96 px: 4 tiles of 64
    out = nc.AutoencoderKLDecodeTiled().decode({"samples": z}, loader, 64, 16)  # no method, as an API prompt
    report = out["ui"]["akl_run"][0]
    assert report["method"] == "exact" and report["tiles"] == 4
    full = nc.AutoencoderKLDecode().decode({"samples": z}, loader)["result"][0]
    torch.testing.assert_close(out["result"][0], full, atol=1e-4, rtol=0)  # fp32 reassociation only
    enc = nc.AutoencoderKLEncodeTiled().encode(out["result"][0], loader, 64, 16)["ui"]["akl_run"][0]
    assert enc["method"] == "exact"


def test_saved_workflows_keep_the_method_they_stored(nc):
    """The editor stores widget values by position: tile_size, overlap, method. The order is kept, so
    a workflow saved with "blend" still loads blend; only new nodes (and prompts without it) get exact."""
    for node_id in ("AutoencoderKLEncodeTiled", "AutoencoderKLDecodeTiled"):
        types = nc.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
        widgets = [n for sec in ("required", "optional") for n, spec in types[sec].items()
                   if not isinstance(spec[0], str) or spec[0] in ("INT", "FLOAT", "STRING")]
        assert widgets == ["tile_size", "overlap", "method"], node_id
        assert types["optional"]["method"][1]["default"] == "exact"
    workflow = json.loads((REPO / "example_workflows" / "akl_tiled_round_trip.json").read_text())
    stored = {n["type"]: n["widgets_values"] for n in workflow["nodes"] if n["type"].endswith("Tiled")}
    assert stored and all(len(v) == 3 and v[2] in ("blend", "exact") for v in stored.values())


# -- batches split by memory -----------------------------------------------------------------------


def test_a_batch_of_16_512px_images_decodes_where_the_whole_batch_would_not_fit(nc, pack, thin_vae, progress,
                                                                               monkeypatch):
    memory, run = pack.vae_core.memory, pack.nodes.run
    z = torch.randn(16, 4, 64, 64, generator=torch.Generator().manual_seed(1))  # 16 x 512^2
    need_one, how = run._needed_ram("decode", thin_vae, tuple(z.shape), None)
    assert "one image at a time" in how
    free = int(need_one / run.RAM_FRACTION) + 1  # room for one image at a time, not for the whole batch
    whole = memory.chunk_bytes("decode", tuple(z.shape), 16, torch.float32, thin_vae.core.config)
    assert whole > memory.budget(free), "the whole batch must not fit, or this test proves nothing"
    _inject_free(pack, monkeypatch, free)

    out = nc.AutoencoderKLDecode().decode({"samples": z}, thin_vae)
    image, report = out["result"][0], out["ui"]["akl_run"][0]
    assert image.shape == (16, 512, 512, 3) and torch.isfinite(image).all()
    runs, chunk = report["batch_runs"], report["batch_chunk"]
    assert runs > 1 and 1 <= chunk < 16 and runs == -(-16 // chunk)
    assert f"in {runs} runs of up to {chunk} image" in report["reason"]
    assert report["estimated_bytes"] <= memory.budget(free)
    # progress covers the whole batch: it only grows, and ends at its total
    values = [v for v, _t in progress]
    assert values == sorted(values) and progress[-1][0] == progress[-1][1] and progress[-1][1] > runs
    # the split changes nothing: an image of the last run equals its own decode (fp32, same kernels)
    alone = nc.AutoencoderKLDecode().decode({"samples": z[-1:]}, thin_vae)["result"][0]
    torch.testing.assert_close(image[-1:], alone, atol=1e-5, rtol=0)
    json.dumps(out["ui"])


def test_a_tiled_node_splits_its_batch_too(nc, pack, loader, monkeypatch):
    memory = pack.vae_core.memory
    z = torch.randn(6, 4, 12, 12, generator=torch.Generator().manual_seed(2))
    cfg = loader.core.config
    run = dict(method="exact", tile_size=64, overlap=16)
    free = int(memory.chunk_bytes("decode", tuple(z.shape), 2, torch.float32, cfg, **run) / memory.SAFETY) + 1
    assert memory.largest_chunk("decode", tuple(z.shape), memory.budget(free), torch.float32, cfg, **run) == 2
    _inject_free(pack, monkeypatch, 2**40)
    monkeypatch.setattr(pack.nodes.run, "_free_bytes", lambda vae: free)
    out = nc.AutoencoderKLDecodeTiled().decode({"samples": z}, loader, 64, 16, "exact")
    report = out["ui"]["akl_run"][0]
    assert (report["batch_chunk"], report["batch_runs"], report["method"]) == (2, 3, "exact")
    assert out["ui"]["akl_grid"][0]["batch"] == 2  # the grid's per-tile figure is for one run
    full = nc.AutoencoderKLDecode().decode({"samples": z}, loader)["result"][0]
    torch.testing.assert_close(out["result"][0], full, atol=1e-4, rtol=0)


def test_a_batch_is_refused_only_when_one_image_cannot_fit(nc, pack, thin_vae, monkeypatch):
    run = pack.nodes.run
    z = torch.zeros(16, 4, 64, 64)
    need_one, _how = run._needed_ram("decode", thin_vae, tuple(z.shape), None)
    _inject_free(pack, monkeypatch, int(need_one / run.RAM_FRACTION) - 2**20)
    with pytest.raises(ValueError, match=r"16 image\(s\) of 512x512 px .*one image at a time.*refused before"):
        nc.AutoencoderKLDecode().decode({"samples": z}, thin_vae)


# -- one memory model ------------------------------------------------------------------------------


def test_host_hooks_and_the_grid_ask_the_memory_model(pack, loader):
    memory, grid = pack.vae_core.memory, pack.nodes.grid
    cfg = loader.core.config
    # the host divides its free memory by memory_used_* to split a batch: a per-image figure
    per_image = memory.estimate_bytes("decode", (1, 4, 64, 64), torch.float32, cfg, 0)
    assert loader.memory_used_decode((5, 4, 64, 64), torch.float32) == per_image
    assert loader.memory_used_encode((5, 3, 512, 512), torch.float32) == \
        memory.estimate_bytes("encode", (1, 3, 512, 512), torch.float32, cfg, 0)
    math = loader.with_attention("math")  # a plain-matmul processor counts its (bounded) score matrices
    assert math.memory_used_decode((1, 4, 64, 64), torch.float32) > per_image
    g = grid.tile_grid(512, 768, 256, 32, "blend", dtype_bytes=4, batch=3, model=grid.model_summary(cfg))
    assert g["estimated_bytes"] == memory.tile_working_bytes("decode", 256, 256, cfg, 4, 3)
