"""The ComfyUI host starts and exposes its built-in nodes."""


def test_object_info_has_builtin_vae_decode(comfy_server):
    info = comfy_server.object_info()
    assert "VAEDecode" in info
    node = info["VAEDecode"]
    assert node["output"] == ["IMAGE"]
    assert set(node["input"]["required"]) == {"samples", "vae"}
