"""What the newest host expects of a VAE object, checked on ours with the installed host.

Written from reading the newest host's source with the search tools (Comfy-Org/ComfyUI; no code
copied), the newest we could read being 0.38.x:
- comfy/sd.py at 35ead008b9f8b0928fb0b674e97923d3ebd57be3: `VAE.__init__` (the defaults it sets
  before its early return on a state dict without VAE weights, and device/vae_dtype/output_device/
  patcher after it), `VAE.decode` (batches by `self.patcher.get_free_memory(self.device)`, writes
  each batch into slices of a buffer of `vae_output_dtype()` and calls `process_output` on the slice,
  discarding the result; `first_stage_model.decode(samples, **vae_options)`), `VAE.encode` and
  `encode_tiled` (read `format_encoded`), `decode_tiled` and the out-of-memory path (read
  `handles_tiling`), `vae_output_dtype()` (= `model_management.intermediate_dtype()`).
- comfy/model_patcher.py at 08d0e510f4e539a1db39072589817136ac6cfa7d: `ModelPatcher.get_free_memory`,
  `cached_patcher_init` (a factory and its arguments; `clone(disable_dynamic=True)` calls it with
  disable_dynamic, `deepclone_multigpu` without, then sets the clone's load_device).
- comfy/model_management.py at 02b2b3886164b1fa412d393a3ed0674b9d1cf010: `intermediate_dtype()`
  (fp16 with --fp16-intermediates).
- comfy/utils.py (the stored version): ProgressBar.update_absolute sends the first and the final
  update at once and throttles those between.
The newest host itself cannot be imported here (it needs comfy-aimdo and newer packages), so each
test runs the newest host's call pattern against our object inside the installed host (0.3.75, or
0.8.0 with AKL_HOST_DIR), and checks our object against a real `comfy.sd.VAE(sd={})` of that host.
"""
from __future__ import annotations

import inspect

import pytest
import torch

# Every attribute the newest comfy.sd.VAE.__init__ sets on an image VAE, and what a compatible value
# is for a 2D KL-VAE (read at 35ead008; written here as predicates, not copied).
_dtype = torch.dtype
NEWEST_VAE_ATTRIBUTES = {
    "memory_used_encode": callable,
    "memory_used_decode": callable,
    "downscale_ratio": lambda v: isinstance(v, int) and v > 0,
    "upscale_ratio": lambda v: isinstance(v, int) and v > 0,
    "latent_channels": lambda v: isinstance(v, int) and v > 0,
    "latent_dim": lambda v: v == 2,
    "output_channels": lambda v: v == 3,
    "pad_channel_value": lambda v: v is None,
    "process_input": callable,
    "process_output": callable,
    "working_dtypes": lambda v: isinstance(v, list) and v and all(isinstance(d, _dtype) for d in v),
    "disable_offload": lambda v: isinstance(v, bool),
    "not_video": lambda v: v is False,
    "size": lambda v: v is None or (isinstance(v, int) and v > 0),
    "downscale_index_formula": lambda v: v is None,
    "upscale_index_formula": lambda v: v is None,
    "extra_1d_channel": lambda v: v is None,
    "crop_input": lambda v: v is True,
    "handles_tiling": lambda v: v is False,
    "format_encoded": lambda v: v is None,
    "audio_sample_rate": lambda v: isinstance(v, int),
    "first_stage_model": lambda v: isinstance(v, torch.nn.Module),
    "device": lambda v: isinstance(v, torch.device),
    "vae_dtype": lambda v: isinstance(v, _dtype),
    "output_device": lambda v: isinstance(v, torch.device),
}


@pytest.fixture()
def host_empty_vae(host):
    import comfy.sd

    return comfy.sd.VAE(sd={})


def test_every_attribute_the_newest_host_sets_exists_with_a_compatible_value(loader):
    import comfy.model_patcher

    bad = {k: getattr(loader, k, "<missing>") for k, ok in NEWEST_VAE_ATTRIBUTES.items()
           if not hasattr(loader, k) or not ok(getattr(loader, k))}
    assert not bad, bad
    assert isinstance(loader.patcher, comfy.model_patcher.ModelPatcher)
    assert loader.patcher.model is loader.first_stage_model


def test_our_object_has_what_the_installed_hosts_empty_vae_has(host_empty_vae, loader):
    """Checked against a real comfy.sd.VAE(sd={}) of the installed host: each attribute it sets exists
    on ours; those our model does not override keep the host's very value."""
    ours_set = {"memory_used_encode", "memory_used_decode", "process_input", "process_output", "downscale_ratio",
                "upscale_ratio", "latent_channels", "output_channels", "working_dtypes", "disable_offload", "size",
                "first_stage_model", "latent_dim", "handles_tiling", "format_encoded"}
    host_attrs = vars(host_empty_vae)
    assert host_attrs, "the host's empty VAE set nothing: comfy.sd.VAE(sd={}) no longer returns early?"
    missing = sorted(k for k in host_attrs if not hasattr(loader, k))
    assert not missing, missing
    for k, v in host_attrs.items():
        if k in ours_set:  # ours describes our model: same kind of value (the host's None: "not built")
            mine = getattr(loader, k)
            assert v is None or (callable(mine) if callable(v) else type(mine) is type(v)), (k, mine, v)
        else:
            assert getattr(loader, k) == v, (k, getattr(loader, k), v)
    # the host's per-instance lambdas were removed: our methods answer
    for hook in ("process_input", "process_output", "memory_used_encode", "memory_used_decode"):
        assert hook not in vars(loader) and inspect.ismethod(getattr(loader, hook)), hook


def test_process_output_works_in_place_on_slices_of_the_output_buffer(nc, loader):
    """The newest host's decode: a buffer of vae_output_dtype(), each batch copied into a slice, then
    process_output(slice) with its result discarded."""
    torch.manual_seed(0)
    z = torch.randn(3, 4, 8, 10)
    expected = nc.AutoencoderKLDecode().decode({"samples": z}, loader)["result"][0]
    batch = 2  # as if get_free_memory allowed two at a time
    with torch.inference_mode():
        buffer = None
        for x in range(0, z.shape[0], batch):
            samples = z[x:x + batch].to(device=loader.device, dtype=loader.vae_dtype)
            out = loader.first_stage_model.decode(samples, **{}).to(device=loader.output_device,
                                                                    dtype=loader.vae_output_dtype(), copy=True)
            if buffer is None:
                buffer = torch.empty((z.shape[0],) + tuple(out.shape[1:]), device=loader.output_device,
                                     dtype=loader.vae_output_dtype())
            buffer[x:x + batch].copy_(out)
            loader.process_output(buffer[x:x + batch])  # result discarded, as the newest host does
        image = buffer.movedim(1, -1)
    assert image.shape == expected.shape == (3, 64, 80, 3)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    torch.testing.assert_close(image, expected, atol=1e-5, rtol=0)


def test_process_output_returns_its_tensor_and_process_input_never_writes_the_image(loader, image):
    x = torch.linspace(-1.5, 1.5, 12).reshape(1, 3, 2, 2)
    assert loader.process_output(x) is x
    torch.testing.assert_close(x, torch.linspace(-1.5, 1.5, 12).reshape(1, 3, 2, 2).add(1).div(2).clamp(0, 1))
    with torch.inference_mode():  # an inference tensor written outside inference mode
        y = torch.full((1, 3, 2, 2), -1.0)
    assert loader.process_output(y) is y and float(y.abs().max()) == 0.0
    # the host hands process_input a view of a node's IMAGE (cropped, moved): it must stay as it was
    before = image.clone()
    view = image[:, :64, :80, :3].movedim(-1, 1)
    out = loader.process_input(view)
    assert out.data_ptr() != view.data_ptr() and torch.equal(image, before)
    torch.testing.assert_close(out, view * 2 - 1)


def test_encode_results_are_read_through_format_encoded_and_handles_tiling_says_the_host_tiles(loader, image):
    """format_encoded is None (the host uses encode's result as is) and handles_tiling is False (the
    host's own tilers call first_stage_model.decode/encode; ours has no decode_tiled to call)."""
    with torch.inference_mode():
        samples = loader.encode(image)
        tiled = loader.encode_tiled(image, tile_x=64, tile_y=64, overlap=16)
        if loader.format_encoded is not None:  # the newest host's encode tail
            samples = loader.format_encoded(samples)
    assert samples.shape == tiled.shape == (2, 4, 9, 11)
    assert loader.handles_tiling is False and not hasattr(loader.first_stage_model, "decode_tiled")
    assert not getattr(loader.first_stage_model, "comfy_has_chunked_io", False)


def test_decode_takes_vae_options_as_the_host_passes_them(loader):
    z = torch.zeros(1, 4, 8, 8)
    with torch.inference_mode():
        a = loader.decode(z)
        b = loader.decode(z, vae_options={})
        c = loader.decode(z, {})
        d = loader.first_stage_model.decode(z.to(loader.vae_dtype), **{"unused_video_option": 1})
    assert a.shape == b.shape == c.shape == (1, 64, 64, 3) and torch.equal(a, b) and torch.equal(a, c)
    assert d.shape == (1, 3, 64, 64)
    for name in ("decode", "decode_tiled", "encode", "encode_tiled", "process_input", "process_output",
                 "memory_used_encode", "memory_used_decode"):
        params = inspect.signature(getattr(loader, name)).parameters.values()
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params), f"{name} takes no **kwargs"


def test_free_memory_comes_from_the_patcher_where_it_offers_it(pack, nc, loader, monkeypatch):
    """The newest host's ModelPatcher has get_free_memory (it adds what dynamic VRAM can free); ours
    is the host's ModelPatcher, and the planner asks it first."""
    host_memory = pack.nodes.host_memory
    asked = []

    def get_free_memory(device):
        asked.append(device)
        return 1 << 20  # 1 MiB: far less than an untiled 256 px decode needs

    monkeypatch.setattr(loader.patcher, "get_free_memory", get_free_memory, raising=False)
    assert host_memory.free_bytes(loader) == 1 << 20 and asked == [loader.device]
    out = nc.AutoencoderKLDecode().decode({"samples": torch.zeros(1, 4, 32, 32)}, loader)
    report = out["ui"]["akl_run"][0]
    assert len(asked) >= 2 and report["tiled"] is True, report


def test_free_memory_without_the_patchers_method_is_model_managements_within_ram(pack, loader, monkeypatch):
    import comfy.model_management as mm

    host_memory = pack.nodes.host_memory
    monkeypatch.delattr(type(loader.patcher), "get_free_memory", raising=False)
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: 7 << 30)
    monkeypatch.setattr(host_memory, "available_ram", lambda: 3 << 30)
    assert host_memory.free_bytes(loader) == 3 << 30  # the CPU: never more than the RAM guard allows
    monkeypatch.setattr(host_memory, "available_ram", lambda: None)
    assert host_memory.free_bytes(loader) == 7 << 30


def test_outputs_follow_the_hosts_intermediate_dtype(nc, loader, image, monkeypatch):
    import comfy.model_management as mm

    if not hasattr(mm, "intermediate_dtype"):  # 0.3.75, 0.8.0: float32, as their VAEs return
        assert loader.vae_output_dtype() == torch.float32
    monkeypatch.setattr(mm, "intermediate_dtype", lambda: torch.float16, raising=False)
    assert loader.vae_output_dtype() == torch.float16
    z = nc.AutoencoderKLEncode().encode(image, loader)["result"][0]["samples"]
    img = nc.AutoencoderKLDecode().decode({"samples": z}, loader)["result"][0]
    assert z.dtype == img.dtype == torch.float16


def test_cached_patcher_init_rebuilds_the_model_for_another_device(pack, loader, monkeypatch):
    """Where the host's ModelPatcher has cached_patcher_init, ours carries a factory; calling it as
    deepclone_multigpu and clone(disable_dynamic=True) do gives an independent model with the same
    weights that loads and runs on the new load device."""
    import comfy.model_management as mm
    import comfy.model_patcher

    vo = pack.nodes.vae_object
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "cached_patcher_init", None, raising=False)
    vae = vo.AutoencoderKLVAE(loader.core, name="clone test", dtype=torch.float32)
    factory, args = vae.patcher.cached_patcher_init[:2]
    fresh = factory(*args)
    also = factory(*args, disable_dynamic=True)
    assert isinstance(fresh, comfy.model_patcher.ModelPatcher) and isinstance(also, comfy.model_patcher.ModelPatcher)
    assert fresh.model is not vae.patcher.model and fresh.model.core is not loader.core
    for (k, a), b in zip(loader.core.state_dict().items(), fresh.model.core.state_dict().values()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), k
    fresh.load_device = torch.device("cpu")  # what deepclone_multigpu does next
    with vo.outside_inference_mode():
        mm.load_models_gpu([fresh], force_full_load=True)
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(fresh.model.decode(z), vae.first_stage_model.decode(z), atol=0, rtol=0)


def test_one_progress_update_per_tile_reaches_the_hosts_progress_bar(nc, loader, monkeypatch):
    """The e2e test (tests/e2e/test_workflows.py) accepts fewer websocket events on a host whose
    ProgressBar throttles; here, before any throttle, our tiler calls the host's ProgressBar once per
    tile, ending at total/total."""
    import comfy.utils

    seen = []
    original = comfy.utils.ProgressBar.update_absolute

    def spy(self, value, total=None, preview=None):
        seen.append((value, total))
        return original(self, value, total, preview)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", spy)
    image = torch.rand(1, 128, 160, 3, generator=torch.Generator().manual_seed(2))
    nc.AutoencoderKLEncodeTiled().encode(image, loader, 64, 16, method="blend")
    # blend: 160 x 128 pixels in 64 px tiles every 48 px: 3 rows x 4 columns
    assert seen == [(i, 12) for i in range(1, 13)], seen
