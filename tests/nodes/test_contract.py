"""The node surface that shared workflows and API prompts rely on: ids, inputs, outputs,
labels, and validation messages (never silent rewrites)."""
from __future__ import annotations

import pytest

REQUIRED = {
    "AutoencoderKLLoader": {"vae_name"},
    "AutoencoderKLEncode": {"pixels", "vae"},
    "AutoencoderKLDecode": {"samples", "vae"},
    "AutoencoderKLEncodeTiled": {"pixels", "vae", "tile_size", "overlap"},
    "AutoencoderKLDecodeTiled": {"samples", "vae", "tile_size", "overlap"},
    "AutoencoderKLSetAttentionProcessor": {"vae", "processor"},
    "AutoencoderKLSampleImage": {"image"},
}
OPTIONAL = {
    "AutoencoderKLLoader": {"dtype": "auto"},
    "AutoencoderKLEncode": {"posterior": "mode", "seed": 0},
    "AutoencoderKLDecode": {},
    "AutoencoderKLEncodeTiled": {"method": "exact"},
    "AutoencoderKLDecodeTiled": {"method": "exact"},
    "AutoencoderKLSetAttentionProcessor": {"slice_size": 1024},
    "AutoencoderKLSampleImage": {},
}
OUTPUTS = {
    "AutoencoderKLLoader": ("VAE",),
    "AutoencoderKLEncode": ("LATENT",),
    "AutoencoderKLDecode": ("IMAGE",),
    "AutoencoderKLEncodeTiled": ("LATENT",),
    "AutoencoderKLDecodeTiled": ("IMAGE",),
    "AutoencoderKLSetAttentionProcessor": ("VAE",),
    "AutoencoderKLSampleImage": ("IMAGE",),
}
DISPLAY = {
    "AutoencoderKLLoader": "Load VAE (AutoencoderKL)",
    "AutoencoderKLEncode": "VAE Encode (AutoencoderKL)",
    "AutoencoderKLDecode": "VAE Decode (AutoencoderKL)",
    "AutoencoderKLEncodeTiled": "VAE Encode Tiled (AutoencoderKL)",
    "AutoencoderKLDecodeTiled": "VAE Decode Tiled (AutoencoderKL)",
    "AutoencoderKLSetAttentionProcessor": "Set VAE Attention Processor (AutoencoderKL)",
    "AutoencoderKLSampleImage": "AutoencoderKL Sample Image",
}


@pytest.fixture(scope="module")
def mappings(pack, tiny_file):
    return pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS


def test_node_ids_and_display_names(mappings):
    classes, names = mappings
    assert set(classes) == set(REQUIRED)
    assert names == DISPLAY


@pytest.mark.parametrize("node_id", sorted(REQUIRED))
def test_inputs_outputs_and_labels(mappings, node_id):
    cls = mappings[0][node_id]
    types = cls.INPUT_TYPES()
    assert set(types["required"]) == REQUIRED[node_id]
    optional = types.get("optional", {})
    assert set(optional) == set(OPTIONAL[node_id])
    for name, default in OPTIONAL[node_id].items():
        assert optional[name][1]["default"] == default, name
        # an optional input must be optional in the function too, so old API prompts keep working
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            assert len(spec) == 2 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert cls.RETURN_TYPES == OUTPUTS[node_id]
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) and all(cls.OUTPUT_TOOLTIPS)
    assert cls.DESCRIPTION and cls.CATEGORY == "latent/AutoencoderKL"
    fn = getattr(cls, cls.FUNCTION)
    import inspect

    params = inspect.signature(fn).parameters
    for name in OPTIONAL[node_id]:
        assert params[name].default is not inspect.Parameter.empty, f"{node_id}.{cls.FUNCTION}({name}) needs a default"


def test_vae_name_lists_files_and_diffusers_folders(mappings, tiny_file, tiny_diffusers_dir):
    choices = mappings[0]["AutoencoderKLLoader"].INPUT_TYPES()["required"]["vae_name"][0]
    assert "akl_tiny.safetensors" in choices
    assert "akl_tiny_diffusers/" in choices


def test_tiled_method_choices(mappings):
    methods = mappings[0]["AutoencoderKLDecodeTiled"].INPUT_TYPES()["optional"]["method"][0]
    assert methods[0] == "blend"
    assert set(methods) <= {"blend", "exact"}


def test_attention_processor_choices(mappings):
    choices = mappings[0]["AutoencoderKLSetAttentionProcessor"].INPUT_TYPES()["required"]["processor"][0]
    assert {"sdpa", "math", "sliced"} <= set(choices)


@pytest.mark.parametrize("node_id", ["AutoencoderKLEncodeTiled", "AutoencoderKLDecodeTiled"])
@pytest.mark.parametrize("tile_size,overlap,needle", [
    (100, 16, "tile_size=100 is not a multiple of 8"),
    (32, 0, "tile_size=32 is outside 64..4096"),
    (8192, 64, "tile_size=8192 is outside"),
    (256, 12, "overlap=12 is not a multiple of 8"),
    (256, -8, "overlap=-8 is negative"),
    (256, 192, "overlap=192 is more than half of tile_size=256"),
])
def test_invalid_tiles_fail_validation_with_a_message(mappings, node_id, tile_size, overlap, needle):
    cls = mappings[0][node_id]
    msg = cls.VALIDATE_INPUTS(tile_size=tile_size, overlap=overlap)
    assert isinstance(msg, str) and needle in msg
    assert "use" in msg  # says what to do next


@pytest.mark.parametrize("node_id", ["AutoencoderKLEncodeTiled", "AutoencoderKLDecodeTiled"])
def test_valid_tiles_pass_validation(mappings, node_id):
    cls = mappings[0][node_id]
    assert cls.VALIDATE_INPUTS(tile_size=512, overlap=64) is True
    assert cls.VALIDATE_INPUTS(tile_size=64, overlap=32) is True
    assert cls.VALIDATE_INPUTS(tile_size=None, overlap=None) is True  # linked inputs: checked at run time
    assert "method='nope'" in cls.VALIDATE_INPUTS(tile_size=512, overlap=64, method="nope")


def test_invalid_tiles_are_refused_at_run_time_not_rewritten(pack, loader, image):
    nc = pack.nodes.node_classes
    with pytest.raises(ValueError, match="overlap=192 is more than half"):
        nc.AutoencoderKLEncodeTiled().encode(image, loader, 256, 192)
    z = {"samples": __import__("torch").zeros(1, 4, 8, 8)}
    with pytest.raises(ValueError, match="tile_size=100 is not a multiple of 8"):
        nc.AutoencoderKLDecodeTiled().decode(z, loader, 100, 16)


def test_grid_matches_the_tiles_run(pack):
    grid = pack.nodes.grid
    g = grid.tile_grid(1024, 1536, 512, 64, "blend")
    # tiles start every 448 px: rows at 0, 448, 896; cols at 0, 448, 896, 1344
    assert (g["rows"], g["cols"], g["tiles"]) == (3, 4, 12)
    assert grid.tile_grid(512, 512, 512, 64)["tiles"] == 1
    assert g["estimated_bytes"] > 0


def test_pack_registers_its_models_folder(pack):
    import os

    import folder_paths

    models = os.path.join(os.path.dirname(pack.__file__), "models", "vae")
    if not os.path.isdir(models):
        pytest.skip("no models/vae folder in this checkout yet (the demo VAE ships there)")
    assert os.path.abspath(models) in [os.path.abspath(p) for p in folder_paths.get_folder_paths("vae")]
