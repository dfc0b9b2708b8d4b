"""What the nodes do with data: crop, latent checks, posterior, tiling, progress and cancel,
Set Attention Processor's copy, the model cache, and the host memory-manager plumbing (CPU)."""
from __future__ import annotations

import os
import time

import pytest
import torch

# fp32 on the CPU, identical inputs and code paths: these comparisons are exact or at rounding level.
FP32_ATOL = 1e-5


@pytest.fixture()
def latent(nc, loader, image):
    return nc.AutoencoderKLEncode().encode(image, loader)["result"][0]


def test_loader_returns_a_host_vae_and_a_card(nc, pack, loader):
    import comfy.sd

    assert isinstance(loader, comfy.sd.VAE)
    out = nc.AutoencoderKLLoader().load("akl_tiny.safetensors")
    card = out["ui"]["akl_card"][0]
    for key in ("name", "family", "latent_channels", "scaling_factor", "shift_factor", "dtype", "parameters",
                "format", "layout"):
        assert key in card
    assert card["latent_channels"] == 4 and card["dtype"] == "fp32" and card["layout"] == "ldm"
    import json

    json.dumps(out["ui"])  # JSON-able for the web extension


def test_loader_dtype_choices(nc, tiny_file):
    vae = nc.AutoencoderKLLoader().load("akl_tiny.safetensors", dtype="bf16")["result"][0]
    assert vae.vae_dtype == torch.bfloat16 and vae.core.dtype == torch.bfloat16
    auto = nc.AutoencoderKLLoader().load("akl_tiny.safetensors", dtype="auto")["result"][0]
    assert auto.vae_dtype == torch.float32  # the host's choice on the CPU


def test_bf16_on_a_cpu_without_native_bf16_says_so_and_decodes(nc, pack, vae_dir, image, monkeypatch, caplog):
    """Such a CPU (AMD Zen 2/3, older Intel) used to stop a bf16 decode inside oneDNN; now it runs
    at fp32's speed and the load says what bf16 buys there."""
    import logging

    from tiny_vaes import make_tiny

    make_tiny(pack, seed=3).save_single_file(vae_dir / "akl_tiny_bf16_cpu.safetensors")  # a file no cache holds
    monkeypatch.setitem(pack.vae_core.cpu_half.NATIVE, torch.bfloat16, False)
    with caplog.at_level(logging.INFO):
        vae = nc.AutoencoderKLLoader().load("akl_tiny_bf16_cpu.safetensors", dtype="bf16")["result"][0]
    assert "no native bf16 convolutions" in caplog.text
    latent = nc.AutoencoderKLEncode().encode(image, vae)["result"][0]
    pixels = nc.AutoencoderKLDecode().decode(latent, vae)["result"][0]
    # the core's own bf16 decode of the same latent (its accuracy: tests/core/test_cpu_half.py)
    with torch.no_grad():
        raw = vae.core.decode(latent["samples"].to(torch.bfloat16)).sample.float()
    ref = ((raw + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert pixels.shape == ref.shape == (*image.shape[:3], 3) and torch.isfinite(pixels).all()
    # the node adds only the host's [-1, 1] -> [0, 1] step, which may round once more in bf16
    assert (pixels.float() - ref).abs().max().item() <= 2**-8


def test_loader_loads_diffusers_folders(nc, tiny_diffusers_dir):
    vae = nc.AutoencoderKLLoader().load("akl_tiny_diffusers/")["result"][0]
    assert vae.latent_channels == 4 and vae.card()["layout"] == "diffusers"


def test_loader_error_names_the_file(nc, vae_dir):
    bad = vae_dir / "akl_not_a_vae.safetensors"
    bad.write_bytes(b"{}" * 10)
    with pytest.raises(ValueError, match="akl_not_a_vae.safetensors"):
        nc.AutoencoderKLLoader().load("akl_not_a_vae.safetensors")
    with pytest.raises(FileNotFoundError, match="not found in the vae model folders"):
        nc.AutoencoderKLLoader().load("missing.safetensors")


def test_encode_crops_to_multiple_of_8_and_uses_rgb(nc, loader, image):
    # 75 x 91 pixels -> centre crop to 72 x 88 (offsets 1 and 1), like the host's VAEEncode
    big = torch.nn.functional.pad(image.movedim(-1, 1), (1, 2, 1, 2), mode="replicate").movedim(1, -1)
    assert big.shape[1:3] == (75, 91)
    z_big = nc.AutoencoderKLEncode().encode(big, loader)["result"][0]["samples"]
    z_ref = nc.AutoencoderKLEncode().encode(image[..., :3], loader)["result"][0]["samples"]
    assert z_big.shape == (2, 4, 9, 11)
    torch.testing.assert_close(z_big, z_ref, atol=FP32_ATOL, rtol=0)


def test_latent_is_raw_and_float32_on_the_intermediate_device(latent, loader, image):
    import comfy.model_management as mm

    z = latent["samples"]
    assert set(latent) == {"samples"}
    assert z.dtype == torch.float32 and z.device == mm.intermediate_device()
    # raw: exactly the posterior mode of the core, no scaling_factor
    x = image[..., :3].movedim(-1, 1) * 2 - 1
    with torch.no_grad():
        ref = loader.core.encode(x).latent_dist.mode()
    torch.testing.assert_close(z, ref, atol=FP32_ATOL, rtol=0)


def test_decode_accepts_noise_mask_and_batch_index_and_leaves_the_latent_alone(nc, loader, latent):
    rich = {"samples": latent["samples"], "noise_mask": torch.ones(2, 1, 72, 88), "batch_index": [3, 4]}
    before = dict(rich)
    image = nc.AutoencoderKLDecode().decode(rich, loader)["result"][0]
    assert image.shape == (2, 72, 88, 3) and 0 <= image.min() and image.max() <= 1
    assert rich == before  # the input LATENT (held by other branches) is not modified


def test_latent_channel_mismatch_message(nc, loader, tiny16_file):
    z16 = {"samples": torch.zeros(1, 16, 8, 8)}
    with pytest.raises(ValueError) as err:
        nc.AutoencoderKLDecode().decode(z16, loader)
    msg = str(err.value)
    assert "16-channel latent (SD3/FLUX" in msg and "4-channel VAE (SD1" in msg and "SDXL" in msg
    vae16 = nc.AutoencoderKLLoader().load("akl_tiny16.safetensors")["result"][0]
    with pytest.raises(ValueError, match=r"4-channel latent \(SD1.*16-channel VAE \(SD3"):
        nc.AutoencoderKLDecodeTiled().decode({"samples": torch.zeros(1, 4, 8, 8)}, vae16, 64, 16)


def test_latent_channel_mismatch_names_the_vaes_own_family(pack, nc):
    """The demo VAE's channel count says nothing of its family (16 since the eighth model, like SD3
    and FLUX.1): the error names the family its file declares, where the count would mislead."""
    message = pack.nodes.vae_object.latent_mismatch_message
    assert "16-channel VAE (family demo)" in message(4, 16, vae_family="demo")
    assert "16-channel VAE (SD3/FLUX" in message(4, 16, vae_family="flux")  # the count already says it
    assert "16-channel VAE (SD3/FLUX" in message(4, 16)
    demo = nc.AutoencoderKLLoader().load("autoencoderkl-demo-f8.safetensors")["result"][0]
    wrong = 4 if demo.latent_channels != 4 else 16
    with pytest.raises(ValueError, match=rf"a {wrong}-channel latent .* was given to a "
                                         rf"{demo.latent_channels}-channel VAE \(family demo\)"):
        nc.AutoencoderKLDecode().decode({"samples": torch.zeros(1, wrong, 8, 8)}, demo)


def test_posterior_sample_is_seeded(nc, loader, image):
    enc = nc.AutoencoderKLEncode()
    mode = enc.encode(image, loader)["result"][0]["samples"]
    a = enc.encode(image, loader, posterior="sample", seed=1)["result"][0]["samples"]
    b = enc.encode(image, loader, posterior="sample", seed=1)["result"][0]["samples"]
    c = enc.encode(image, loader, posterior="sample", seed=2)["result"][0]["samples"]
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, mode)


def test_run_report(nc, loader, latent):
    report = nc.AutoencoderKLDecode().decode(latent, loader)["ui"]["akl_run"][0]
    for key in ("tiled", "tile_size", "method", "fp32_retry", "estimated_bytes", "seconds", "peak_bytes"):
        assert key in report
    assert report["tiled"] is False and report["seconds"] > 0 and report["fp32_retry"] is False


# -- tiling, progress, cancel ------------------------------------------------------------------


@pytest.fixture()
def progress_events():
    import comfy.utils

    events = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: events.append((value, total)))
    yield events
    comfy.utils.set_progress_bar_global_hook(old)


def test_tiled_decode_blend_equals_the_cores_tiling_and_reports_progress(nc, loader, latent, progress_events):
    out = nc.AutoencoderKLDecodeTiled().decode(latent, loader, 64, 16, "blend")
    grid = out["ui"]["akl_grid"][0]
    assert grid["tiles"] > 1 and (grid["rows"], grid["cols"]) == (2, 2)
    # one progress event per tile, ending at total
    assert [e for e in progress_events if e[1] == grid["tiles"]][-1] == (4, 4)
    assert len([e for e in progress_events if e[1] == grid["tiles"]]) == grid["tiles"]
    # the same as vae_core's own diffusers-style tiling with 64 px tiles and a 16/64 overlap
    ref_model = __import__("copy").deepcopy(loader.core)
    ref_model.enable_tiling(tile_sample_min_size=64, tile_overlap_factor=0.25)
    with torch.no_grad():
        ref = ref_model.tiled_decode(latent["samples"]).sample
    ref = torch.clamp((ref + 1) / 2, 0, 1).movedim(1, -1)
    torch.testing.assert_close(out["result"][0], ref, atol=FP32_ATOL, rtol=0)
    assert loader.core.use_tiling is False  # the shared model was not reconfigured


def test_tiled_encode_blend_reports_its_grid(nc, loader, image, progress_events):
    out = nc.AutoencoderKLEncodeTiled().encode(image, loader, 64, 16, "blend")
    assert out["ui"]["akl_grid"][0]["tiles"] == 4
    assert out["result"][0]["samples"].shape == (2, 4, 9, 11)


def test_tiled_exact_equals_untiled(nc, loader, latent, image):
    full = nc.AutoencoderKLDecode().decode(latent, loader)["result"][0]
    tiled = nc.AutoencoderKLDecodeTiled().decode(latent, loader, 64, 0, "exact")
    assert tiled["ui"]["akl_run"][0]["tiles"] > 1
    torch.testing.assert_close(tiled["result"][0], full, atol=1e-4, rtol=0)  # fp32 reassociation only


def test_half_precision_nan_in_a_tiled_node_run_is_retried_in_fp32(nc, latent, monkeypatch):
    vae = nc.AutoencoderKLLoader().load("akl_tiny.safetensors", dtype="fp16")["result"][0]
    core = vae.core
    monkeypatch.setattr(core.config, "force_upcast", False)  # else fp16 is upcast before it can fail
    real = core._pixels

    def pixels(z):  # what an fp16 overflow does: NaN everywhere, only in half precision
        out = real(z)
        return out.fill_(float("nan")) if z.dtype == torch.float16 else out

    monkeypatch.setattr(core, "_pixels", pixels)
    out = nc.AutoencoderKLDecodeTiled().decode(latent, vae, 64, 16, "blend")
    report = out["ui"]["akl_run"][0]
    assert report["fp32_retry"] is True and report["tiled"] and report["method"] == "blend"
    assert torch.isfinite(out["result"][0]).all()
    assert next(core.parameters()).dtype == torch.float16  # the shared model keeps its dtype


def test_out_of_memory_in_a_tiled_node_run_is_retried_with_exact_tiles(nc, pack, loader, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(pack.nodes.run.tiling, "blend_tiled", oom)
    monkeypatch.setattr(pack.vae_core.planner, "TILE_CANDIDATES", (96, 64))
    latent = {"samples": torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))}  # 192 px
    out = nc.AutoencoderKLDecodeTiled().decode(latent, loader, 128, 32, "blend")
    report = out["ui"]["akl_run"][0]
    assert (report["tiled"], report["method"], report["tile_size"], report["overlap"]) == (True, "exact", 96, None)
    assert out["ui"]["akl_grid"][0]["tiles"] == 4  # the grid shown is the one that ran
    full = nc.AutoencoderKLDecode().decode(latent, loader)["result"][0]
    torch.testing.assert_close(out["result"][0], full, atol=1e-4, rtol=0)


def test_cancel_stops_a_tiled_decode_within_one_tile(nc, loader, latent, progress_events):
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            nc.AutoencoderKLDecodeTiled().decode(latent, loader, 64, 16)
    finally:
        mm.interrupt_current_processing(False)
    assert len(progress_events) == 0  # stopped after the first tile, before reporting it


# -- Set Attention Processor -----------------------------------------------------------------


def test_set_attention_processor_returns_a_copy_sharing_weights(nc, pack, loader, latent):
    before = {k: type(v).__name__ for k, v in loader.attn_processors.items()}
    out = nc.AutoencoderKLSetAttentionProcessor().set_processor(loader, "sliced", slice_size=7)
    new = out["result"][0]
    assert new is not loader
    assert {type(v).__name__ for v in new.attn_processors.values()} == {"SlicedAttnProcessor"}
    assert {k: type(v).__name__ for k, v in loader.attn_processors.items()} == before
    # shared weights: the same tensors, and a ModelPatcher clone the host unloads as one model
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(loader.core.parameters(), new.core.parameters()))
    assert new.patcher.is_clone(loader.patcher) and new.patcher is not loader.patcher
    img_new = nc.AutoencoderKLDecode().decode(latent, new)["result"][0]
    # after the copy ran, the original runs with its own processors again
    img_old = nc.AutoencoderKLDecode().decode(latent, loader)["result"][0]
    procs = {type(m.processor).__name__ for m in loader.core.modules() if hasattr(m, "processor")}
    assert procs == set(before.values())
    torch.testing.assert_close(img_new, img_old, atol=1e-5, rtol=0)  # same maths, other summation order
    assert out["ui"]["akl_card"][0]["attention"].startswith("sliced")


def test_set_attention_processor_rejects_unknown_names(nc, loader):
    with pytest.raises(ValueError, match="not available"):
        nc.AutoencoderKLSetAttentionProcessor().set_processor(loader, "flash9000")


# -- model cache -------------------------------------------------------------------------------


def test_cache_loads_once_and_reloads_on_mtime_or_size_change(nc, pack, vae_dir):
    from tiny_vaes import make_tiny

    cache = pack.nodes.cache.MODELS
    path = vae_dir / "akl_cache.safetensors"
    make_tiny(pack, seed=5).save_single_file(path)
    node = nc.AutoencoderKLLoader()
    loads = cache.loads
    a = node.load("akl_cache.safetensors")["result"][0]
    b = node.load("akl_cache.safetensors")["result"][0]
    assert a is b and cache.loads == loads + 1
    sig = nc.AutoencoderKLLoader.IS_CHANGED("akl_cache.safetensors")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # mtime changed, same size
    c = node.load("akl_cache.safetensors")["result"][0]
    assert c is not b and cache.loads == loads + 2
    assert nc.AutoencoderKLLoader.IS_CHANGED("akl_cache.safetensors") != sig  # the host re-runs the loader
    make_tiny(pack, seed=6, block_out_channels=(8, 16, 32, 64)).save_single_file(path)  # size changed
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # even with the old mtime
    d = node.load("akl_cache.safetensors")["result"][0]
    assert d is not c and d.core.config.block_out_channels[-1] == 64


# -- host memory manager (CPU device) ----------------------------------------------------------


def test_weights_go_through_the_hosts_memory_manager(nc, loader, latent):
    import comfy.model_management as mm
    import comfy.model_patcher

    assert isinstance(loader.patcher, comfy.model_patcher.ModelPatcher)
    assert loader.patcher.load_device == mm.vae_device() and loader.patcher.offload_device == mm.vae_offload_device()
    mm.unload_all_models()
    assert not any(m.model is loader.patcher for m in mm.current_loaded_models)
    image = nc.AutoencoderKLDecode().decode(latent, loader)["result"][0]
    assert any(m.model is loader.patcher for m in mm.current_loaded_models)
    assert image.device == mm.intermediate_device()
    mm.unload_all_models()  # the host can offload it; the next run loads it again
    nc.AutoencoderKLDecode().decode(latent, loader)
    assert any(m.model is loader.patcher for m in mm.current_loaded_models)


def test_nodes_work_under_the_hosts_inference_mode(host, nc, pack, vae_dir, image):
    """The host executes nodes inside torch.inference_mode: load and run there, as on the server."""
    from tiny_vaes import make_tiny

    make_tiny(pack, seed=9).save_single_file(vae_dir / "akl_infmode.safetensors")
    with torch.inference_mode():
        vae = nc.AutoencoderKLLoader().load("akl_infmode.safetensors")["result"][0]
        z = nc.AutoencoderKLEncode().encode(image, vae)["result"][0]
        a = nc.AutoencoderKLDecode().decode(z, vae)["result"][0]
        b = nc.AutoencoderKLDecodeTiled().decode(z, vae, 64, 16)["result"][0]
        c = host.VAEDecode().decode(vae, z)[0]
    assert a.shape == b.shape == c.shape == (2, 72, 88, 3)
    assert not any(p.is_inference() for p in vae.core.parameters())
