"""The "AutoencoderKL Sample Image" node: it lists the pack's bundled photos, loads one as the host's
IMAGE, and refuses any other name (it never reads the host's input folder or outside the pack)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def node(pack):
    return pack.nodes.node_classes.NODE_CLASS_MAPPINGS["AutoencoderKLSampleImage"]


def test_lists_the_bundled_photos_only(pack, node):
    choices, opts = node.INPUT_TYPES()["required"]["image"]
    samples = pack.nodes.sample_image.SAMPLES_DIR
    assert "chelsea.png" in choices and opts["default"] == "chelsea.png"
    assert "LICENSE.md" not in choices
    assert choices == sorted(p.name for p in Path(samples).iterdir()
                             if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))


def test_loads_the_photo_as_image(pack, node):
    (image,) = node().load("chelsea.png")
    want = np.asarray(Image.open(f"{pack.nodes.sample_image.SAMPLES_DIR}/chelsea.png").convert("RGB"))
    assert image.shape == (1, *want.shape) and image.dtype.is_floating_point
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert np.array_equal(np.round(image[0].numpy() * 255).astype(np.uint8), want)


@pytest.mark.parametrize("name", ["../vae/autoencoderkl-demo-f8.safetensors", "LICENSE.md", "/etc/passwd", "nope.png"])
def test_other_names_are_refused(node, name):
    with pytest.raises(ValueError, match="not a photo bundled in .*choose one of"):
        node().load(name)
    assert node.IS_CHANGED(name) != node.IS_CHANGED(name)  # NaN: re-run, so the error is reported


def test_unchanged_file_is_cached(node):
    assert node.IS_CHANGED("chelsea.png") == node.IS_CHANGED("chelsea.png")
