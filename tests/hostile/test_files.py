"""Hostile and broken files through Load VAE (AutoencoderKL), in-process: names that reach outside the
model folders, a pickle that would run code, broken files; and that a failure leaves nothing behind
(no cache entry, no model in the host's memory manager) so the next load of the fixed file works.

The core's own refusals are tested in tests/core/test_loading.py; here they go through the node."""
from __future__ import annotations

import math
import os

import pytest
import torch

from hostile_files import BROKEN, evil_pickle, fix, write_good

LOADER_NAMES = [
    "../akl_outside.safetensors",           # host lookup would quietly map this to 'akl_outside.safetensors'
    "sub/../../akl_outside.safetensors",
    "/etc/passwd",
    "../",                                  # a folder name: joined as given before the fix
    "../outside_dir/",
    "C:\\Windows\\win.ini",
    "..\\akl_outside.safetensors",
    "",
]


def _cache_keys(pack):
    return {k[0] for k in pack.nodes.cache.MODELS._entries}


def _loaded_patchers():
    import comfy.model_management as mm

    return [m.model for m in mm.current_loaded_models]


@pytest.mark.parametrize("name", LOADER_NAMES)
def test_names_reaching_outside_the_model_folders_are_refused(nc, hostile_vae_dir, name):
    # a real VAE sits just outside the vae folder, where '../' names would reach
    outside = hostile_vae_dir.parent / "outside_dir"
    outside.mkdir(exist_ok=True)
    if not (outside / "config.json").exists():
        fix(outside.parent / "akl_outside.safetensors")
        from hostile_files import tiny_model

        tiny_model().save_pretrained(outside)
        tiny_model().save_pretrained(hostile_vae_dir.parent)  # '../' would be a diffusers folder too
    with pytest.raises(ValueError) as err:
        nc.AutoencoderKLLoader().load(name)
    assert "refused" in str(err.value) or "not a file or folder name" in str(err.value)
    assert "choose" in str(err.value)  # says what to do
    # IS_CHANGED (called by the host before running) must not raise either: NaN = always re-run
    assert math.isnan(nc.AutoencoderKLLoader.IS_CHANGED(name))


def test_symlink_inside_the_vae_folder_is_followed_like_the_host_does(nc, hostile_vae_dir, tmp_path):
    """Documented: a symlink the server's owner put in a model folder is followed (the host's own
    loaders do the same, and model folders on other disks rely on it). Prompts cannot make links,
    and names with '..' or absolute paths are refused, so a prompt cannot reach other files."""
    target = write_good(tmp_path / "elsewhere.safetensors", seed=4)
    link = hostile_vae_dir / "akl_linked.safetensors"
    if not link.exists():
        os.symlink(target, link)
    vae = nc.AutoencoderKLLoader().load("akl_linked.safetensors")["result"][0]
    assert vae.latent_channels == 4
    # a link to something that is not a VAE gives the usual clear error, naming the link
    bad_link = hostile_vae_dir / "akl_link_to_text.safetensors"
    (tmp_path / "notes.txt").write_text("not weights")
    if not bad_link.exists():
        os.symlink(tmp_path / "notes.txt", bad_link)
    with pytest.raises(ValueError, match="akl_link_to_text.safetensors"):
        nc.AutoencoderKLLoader().load("akl_link_to_text.safetensors")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_malicious_pickle_through_the_node_runs_nothing(nc, pack, hostile_vae_dir, tmp_path, suffix):
    marker = tmp_path / "pwned"
    name = f"akl_evil{suffix}"
    evil_pickle(hostile_vae_dir / name, marker)
    before = _loaded_patchers()
    with pytest.raises(ValueError) as err:
        nc.AutoencoderKLLoader().load(name)
    msg = str(err.value)
    assert name in msg and "refused" in msg and "weights_only" in msg and ".safetensors" in msg
    assert not marker.exists(), "the pickle's code ran"
    assert os.path.realpath(hostile_vae_dir / name) not in _cache_keys(pack)
    assert _loaded_patchers() == before


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_file_fails_clearly_and_the_fixed_file_then_loads(nc, pack, hostile_vae_dir, kind):
    writer, suffix, words = BROKEN[kind]
    name = f"akl_broken_{kind}{suffix}"
    path = hostile_vae_dir / name
    writer(path)
    before = _loaded_patchers()
    loads = pack.nodes.cache.MODELS.loads
    with pytest.raises(ValueError) as err:
        nc.AutoencoderKLLoader().load(name)
    msg = str(err.value)
    assert name in msg, msg
    for word in words:
        assert word in msg, (word, msg)
    # nothing half-loaded is left behind
    assert os.path.realpath(path) not in _cache_keys(pack)
    assert pack.nodes.cache.MODELS.loads == loads
    assert _loaded_patchers() == before
    # a second try gives the same error (no stale state), then the fixed file loads and decodes
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        nc.AutoencoderKLLoader().load(name)
    fix(path)
    vae = nc.AutoencoderKLLoader().load(name)["result"][0]
    image = nc.AutoencoderKLDecode().decode({"samples": torch.zeros(1, 4, 2, 2)}, vae)["result"][0]
    assert image.shape == (1, 16, 16, 3) and torch.isfinite(image).all()


def test_a_good_file_broken_later_is_not_served_from_the_cache(nc, pack, hostile_vae_dir):
    """The cache keys on mtime, size and content: a file that goes bad after a successful load gives the error,
    not the old model; fixed again, it loads again."""
    path = hostile_vae_dir / "akl_goes_bad.safetensors"
    write_good(path, seed=7)
    first = nc.AutoencoderKLLoader().load("akl_goes_bad.safetensors")["result"][0]
    BROKEN["truncated"][0](path)
    with pytest.raises(ValueError, match="akl_goes_bad.safetensors.*truncated"):
        nc.AutoencoderKLLoader().load("akl_goes_bad.safetensors")
    fix(path, seed=8)
    again = nc.AutoencoderKLLoader().load("akl_goes_bad.safetensors")["result"][0]
    assert again is not first
    assert not torch.equal(next(again.core.parameters()), next(first.core.parameters()))
