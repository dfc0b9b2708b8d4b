"""Our VAE object in the host's own VAE nodes, the host's VAE in ours, and parity with the host's
VAE in the host's own nodes on the same SD-layout weights. The host's nodes run in-process under
torch.inference_mode, as the host's executor runs them. scripts/test.sh runs this file on each real
host (0.3.75, and 0.8.0 with AKL_HOST_DIR)."""
from __future__ import annotations

import pytest
import torch

# Host and pack compute the same fp32 graph on the CPU; kernels may differ in summation order
# (conv algorithms, SDPA vs bmm attention), far below one 8-bit level.
ONE_LEVEL = 1.0 / 255.0
# Raw latents of random SD-size weights are O(1); the same fp32 graph with another summation order
# (SDPA vs the host's attention, conv algorithms) differs by a few 1e-6 there (measured at most 5e-6
# on 0.3.75 and 0.8.0); 1e-4 is fp32 noise of a deeper graph, far below what a decoder could show.
LATENT_ATOL = 1e-4


@pytest.fixture()
def mask():
    m = torch.zeros(1, 72, 88)
    m[:, 20:50, 30:60] = 1.0
    return m


def test_host_nodes_run_our_vae(host, nc, loader, image, mask):
    ours_z = nc.AutoencoderKLEncode().encode(image, loader)["result"][0]["samples"]
    ours_img = nc.AutoencoderKLDecode().decode({"samples": ours_z}, loader)["result"][0]
    with torch.inference_mode():
        z = host.VAEEncode().encode(loader, image)[0]["samples"]
        img = host.VAEDecode().decode(loader, {"samples": z})[0]
        zt = host.VAEEncodeTiled().encode(loader, image, 64, 16)[0]["samples"]
        imgt = host.VAEDecodeTiled().decode(loader, {"samples": z}, 64, 16)[0]
        inpaint = host.VAEEncodeForInpaint().encode(loader, image, mask, 6)[0]
    torch.testing.assert_close(z, ours_z, atol=1e-5, rtol=0)
    torch.testing.assert_close(img, ours_img, atol=1e-5, rtol=0)
    assert zt.shape == z.shape and imgt.shape == img.shape == (2, 72, 88, 3)
    assert inpaint["samples"].shape == z.shape and inpaint["noise_mask"].shape == (1, 1, 72, 88)


def test_host_decode_of_a_mismatched_latent_says_so(host, loader):
    with torch.inference_mode(), pytest.raises(ValueError, match="16-channel latent"):
        host.VAEDecode().decode(loader, {"samples": torch.zeros(1, 16, 8, 8)})


def run_vae_save(vae, prefix: str) -> str:
    """Run the host's VAESave through whichever API it has: a V1 node (an instance with FUNCTION and
    output_dir, 0.3.75 and 0.8.0) or a V3 node (classmethod execute, the output folder from
    folder_paths, newer hosts). Returns the folder it writes to."""
    import folder_paths
    from comfy_extras.nodes_model_merging import VAESave

    with torch.inference_mode():
        if hasattr(VAESave, "PREPARE_CLASS_CLONE"):  # V3 (it has a FUNCTION too, for V1 callers)
            # a class clone with empty hidden inputs (prompt, extra_pnginfo), as the executor makes
            VAESave.PREPARE_CLASS_CLONE(None).execute(vae=vae, filename_prefix=prefix)
            return folder_paths.get_output_directory()
        node = VAESave()
        getattr(node, VAESave.FUNCTION)(vae, prefix)
        return node.output_dir


def test_host_vaesave_writes_a_file_our_loader_reads_back(host, nc, pack, loader):
    import os

    out_dir = os.path.join(run_vae_save(loader, "vae/akl_saved"), "vae")
    saved = sorted(f for f in os.listdir(out_dir) if f.startswith("akl_saved"))[-1]
    path = os.path.join(out_dir, saved)
    # LDM layout, as the host's own VAEs are saved
    from safetensors.torch import load_file

    sd = load_file(path)
    assert "encoder.down.0.block.0.conv1.weight" in sd
    back = pack.vae_core.AutoencoderKL.from_single_file(path)
    for (k, a), b in zip(loader.core.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    os.remove(path)


def test_vaesave_through_the_v3_api_as_newer_hosts_define_it(host, pack, loader, monkeypatch):
    """Newer hosts define VAESave as a V3 node (classmethod execute, hidden prompt/extra_pnginfo, the
    output folder from folder_paths). A stand-in written from that shape, on the installed host's own
    comfy_api ComfyNode, takes run_vae_save's V3 path."""
    import os

    import comfy.utils
    import comfy_extras.nodes_model_merging as merging
    import folder_paths
    from comfy_api.latest import io

    class VAESaveV3(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="VAESave", category="advanced/model_merging",
                             inputs=[io.Vae.Input("vae"), io.String.Input("filename_prefix")],
                             hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo], is_output_node=True)

        @classmethod
        def execute(cls, vae, filename_prefix):
            assert cls.hidden.prompt is None and cls.hidden.extra_pnginfo is None
            folder, name, counter, _sub, _prefix = folder_paths.get_save_image_path(
                filename_prefix, folder_paths.get_output_directory())
            comfy.utils.save_torch_file(vae.get_sd(), os.path.join(folder, f"{name}_{counter:05}_.safetensors"))
            return io.NodeOutput()

    monkeypatch.setattr(merging, "VAESave", VAESaveV3)
    out_dir = os.path.join(run_vae_save(loader, "vae/akl_saved_v3"), "vae")
    saved = sorted(f for f in os.listdir(out_dir) if f.startswith("akl_saved_v3"))[-1]
    path = os.path.join(out_dir, saved)
    back = pack.vae_core.AutoencoderKL.from_single_file(path)
    for (k, a), b in zip(loader.core.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    os.remove(path)


def _sd_layout_weights(pack):
    """Random SD-size (ch 128, 2 res blocks, 4 latent channels) weights in the LDM layout."""
    torch.manual_seed(0)
    model = pack.vae_core.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return model


@pytest.fixture(scope="module")
def sd_file(pack, vae_dir):
    path = vae_dir / "akl_sd_random.safetensors"
    _sd_layout_weights(pack).save_single_file(path)
    return path


def _photo_like(h=64, w=64):
    g = torch.Generator().manual_seed(3)
    base = torch.rand(1, 3, 6, 6, generator=g)
    return torch.nn.functional.interpolate(base, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1).movedim(1, -1)


def test_parity_with_the_hosts_round_trip_on_sd_weights(host, nc, sd_file):
    """Same SD-layout file: host VAELoader -> VAEEncode -> VAEDecode vs ours, within 1/255."""
    image = _photo_like()
    with torch.inference_mode():
        host_vae = host.VAELoader().load_vae("akl_sd_random.safetensors")[0]
        host_img = host.VAEDecode().decode(host_vae, host.VAEEncode().encode(host_vae, image)[0])[0]
    ours = nc.AutoencoderKLLoader().load("akl_sd_random.safetensors", dtype="fp32")["result"][0]
    z = nc.AutoencoderKLEncode().encode(image, ours)["result"][0]
    our_img = nc.AutoencoderKLDecode().decode(z, ours)["result"][0]
    assert our_img.shape == host_img.shape == (1, 64, 64, 3)
    assert 0.02 < float(host_img.std())  # not a saturated, trivially equal image
    diff = (our_img - host_img).abs().max().item()
    assert diff <= ONE_LEVEL, diff

    # the host's VAE object fed to our nodes: converted once, same numbers
    from importlib import import_module

    vae_object = import_module(nc.__name__.rsplit(".", 1)[0] + ".vae_object")
    assert vae_object.as_akl(host_vae) is vae_object.as_akl(host_vae)
    z2 = nc.AutoencoderKLEncode().encode(image, host_vae)["result"][0]
    img2 = nc.AutoencoderKLDecode().decode(z2, host_vae)["result"][0]
    assert (img2 - host_img).abs().max().item() <= ONE_LEVEL
    with torch.inference_mode():  # and the host decodes our latent
        host_img2 = host.VAEDecode().decode(host_vae, z)[0]
    assert (host_img2 - our_img).abs().max().item() <= ONE_LEVEL
    # Set Attention Processor takes the host's VAE too, and leaves it as it was
    copy = nc.AutoencoderKLSetAttentionProcessor().set_processor(host_vae, "math")["result"][0]
    assert copy is not host_vae and type(host_vae).__name__ == "VAE"
    img3 = nc.AutoencoderKLDecode().decode(nc.AutoencoderKLEncode().encode(image, copy)["result"][0], copy)["result"][0]
    assert (img3 - host_img).abs().max().item() <= ONE_LEVEL


def test_host_nodes_give_the_same_images_with_our_vae_as_with_theirs(host, nc, sd_file, mask):
    """Done means: the host's own VAE nodes, fed our VAE instead of the host's (same file), give the
    same images within one 8-bit level and the same latents."""
    image = _photo_like(64, 80)
    m = torch.zeros(1, 64, 80)
    m[:, 16:40, 24:56] = 1.0
    with torch.inference_mode():
        theirs = host.VAELoader().load_vae(sd_file.name)[0]
    ours = nc.AutoencoderKLLoader().load(sd_file.name, dtype="fp32")["result"][0]
    assert type(ours).__name__ == "AutoencoderKLVAE" and type(theirs).__name__ == "VAE"

    def through_host_nodes(vae):
        with torch.inference_mode():
            z = host.VAEEncode().encode(vae, image)[0]
            return {
                "encode": z["samples"],
                "decode": host.VAEDecode().decode(vae, z)[0],
                "encode_tiled": host.VAEEncodeTiled().encode(vae, image, 64, 16)[0]["samples"],
                "decode_tiled": host.VAEDecodeTiled().decode(vae, z, 64, 16)[0],
                "inpaint": host.VAEEncodeForInpaint().encode(vae, image, m, 6)[0]["samples"],
                "inpaint_conditioning": host.InpaintModelConditioning().encode([], [], image, vae, m, True)[2]["samples"],
            }

    before = image.clone()
    a, b = through_host_nodes(theirs), through_host_nodes(ours)
    assert torch.equal(image, before)  # the IMAGE other nodes still read is untouched
    for key in ("decode", "decode_tiled"):
        assert a[key].shape == b[key].shape == (1, 64, 80, 3), key
        assert a[key].dtype == b[key].dtype, key
        assert float(a[key].std()) > 0.02, key  # not a saturated, trivially equal image
        diff = (a[key] - b[key]).abs().max().item()
        assert diff <= ONE_LEVEL, (key, diff)
    for key in ("encode", "encode_tiled", "inpaint", "inpaint_conditioning"):
        assert a[key].shape == b[key].shape == (1, 4, 8, 10), key
        # latents of the same fp32 graph; the images above bound what the difference does
        torch.testing.assert_close(b[key], a[key], atol=LATENT_ATOL, rtol=0, msg=key)


def test_our_loader_builds_what_the_hosts_cannot(host, nc, tiny_file):
    import comfy.sd
    import comfy.utils

    assert nc.AutoencoderKLLoader().load("akl_tiny.safetensors")["result"][0].latent_channels == 4
    sd = comfy.utils.load_torch_file(str(tiny_file))
    with pytest.raises(Exception):
        comfy.sd.VAE(sd=sd)  # the host only builds the SD layout (ch=128)


def test_the_host_counts_our_weights_without_copying_them(host, nc, pack, loader, image):
    """The host's module_size() reads state_dict(), where the core hands out NCHW copies of its
    channels_last weights; our VAE tells the host its size instead, so building, loading and
    running it never builds those copies (for an SD VAE they are 300 MiB)."""
    import copy

    import comfy.model_management as mm

    core = copy.deepcopy(loader.core)
    calls = []
    real = type(core).state_dict

    def counting(self, *args, **kwargs):
        if self is core:
            calls.append(kwargs.get("keep_vars", False))
        return real(self, *args, **kwargs)

    try:
        type(core).state_dict = counting
        vae = pack.nodes.vae_object.AutoencoderKLVAE(core, name="fresh")
        mm.load_models_gpu([vae.patcher], force_full_load=True)
        nc.AutoencoderKLEncode().encode(image[..., :3], vae)
    finally:
        type(core).state_dict = real
    assert all(calls), f"state_dict() copied the weights {calls.count(False)} times while loading and encoding"
    assert vae.patcher.model_size() == vae.model_size() == mm.module_size(vae.first_stage_model)
