"""Resource attacks through Load VAE (AutoencoderKL), in-process (issue 13): small files that ask for
GBs or minutes (stride-0 and overlapping views, a zip bomb, absurd depth in metadata or in keys), a
file that shrinks while it is read (SIGBUS with mmap), damaged configs, NaN and oversized metadata,
links to private files, and a cache that must see content changes.

Every attack runs inside `bounds.bounded()`: the address space is capped 1 GiB above its size, so a
regression fails with an allocation error instead of taking GBs from the shared machine; its time and
peak RSS growth are asserted under generous safety bounds. After each one, the fixed file loads and
decodes (nothing cached from the failure)."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

import hostile_files as hf
from bounds import bounded

LIMIT = pytest.mark.timeout(120)  # outer bound: the attacks took 3+ minutes before the fix


def _cache_paths(pack):
    return {k[0] for k in pack.nodes.cache.MODELS._entries}


def _refused(nc, pack, path, *words):
    """Load `path` through the node under the bounds; the error must name the file and hold `words`;
    nothing is cached; then the fixed file loads and decodes. Returns the message."""
    loads = pack.nodes.cache.MODELS.loads
    with bounded() as cost:
        with pytest.raises(ValueError) as err:
            nc.AutoencoderKLLoader().load(path.name)
    cost.check(path.name)
    msg = str(err.value)
    assert path.name in msg, msg
    for word in words:
        assert word in msg, (word, msg)
    assert pack.nodes.cache.MODELS.loads == loads and os.path.realpath(path) not in _cache_paths(pack)
    _fixed_loads(nc, path)
    return msg


def _fixed_loads(nc, path):
    hf.fix(path, seed=21)
    vae = nc.AutoencoderKLLoader().load(path.name)["result"][0]
    image = nc.AutoencoderKLDecode().decode({"samples": torch.zeros(1, 4, 2, 2)}, vae)["result"][0]
    assert image.shape == (1, 16, 16, 3) and torch.isfinite(image).all()


# -- views and archives that describe more than they hold ------------------------------------------


@LIMIT
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("attack,words", [
    (hf.stride0_ckpt, ("stride-0 view", "decoder.conv_out.weight", "4 stored bytes")),
    (hf.overlap_ckpt, ("overlapping view", "decoder.conv_out.weight")),
], ids=["stride0", "overlap"])
def test_views_of_gbs_over_a_few_stored_bytes_are_refused(nc, pack, hostile_vae_dir, attack, words, legacy):
    path = hostile_vae_dir / f"akl_bounds_{attack.__name__}_{int(legacy)}.ckpt"
    attack(path, legacy=legacy)
    assert path.stat().st_size < 2 << 20  # 4 GiB described by < 2 MB
    _refused(nc, pack, path, "refused", *words)


@LIMIT
def test_a_zip_bomb_checkpoint_is_refused_before_inflating(nc, pack, hostile_vae_dir):
    path = hostile_vae_dir / "akl_bounds_bomb.ckpt"
    hf.zip_bomb_ckpt(path)
    assert path.stat().st_size < 4 << 20  # 2 GiB deflated
    _refused(nc, pack, path, "compressed", "2,147,483,648 bytes", "torch.save never compresses")


@LIMIT
def test_a_legacy_pickle_declaring_8_gib_is_a_clean_error_in_bounded_memory(nc, pack, hostile_vae_dir):
    """Legacy pickles declare storage sizes that torch allocates before reading: the allocation is
    virtual (refused outright under the test's address-space cap), and the short read is an error."""
    path = hostile_vae_dir / "akl_bounds_legacy_bomb.ckpt"
    hf.legacy_bomb_ckpt(path)
    assert path.stat().st_size < 4096
    _refused(nc, pack, path, "corrupt or truncated legacy torch pickle")


# -- configs that ask for more than the file holds --------------------------------------------------


@LIMIT
@pytest.mark.parametrize("fields,words", [
    ({"layers_per_block": 20000}, ("layers_per_block=20000", "expected 1 to 64")),
    ({"block_out_channels": [65536, 65536], "down_block_types": ["DownEncoderBlock2D"] * 2,
      "up_block_types": ["UpDecoderBlock2D"] * 2}, ("block_out_channels[0]=65536", "out of range")),
    ({"latent_channels": 1e6}, ("latent_channels=1000000.0", "must be an integer")),
    # within every bound, yet 30x the weights the file holds: refused from the count, before building
    ({"layers_per_block": 60}, ("describes", "parameters", "the file holds only", "asks for more than it holds")),
    ({"block_out_channels": [4096] * 4, "norm_num_groups": 32}, ("asks for more than it holds",)),
], ids=["depth20000", "width65536", "latent1e6", "depth60", "width4096"])
def test_a_config_asking_for_more_than_the_file_holds_is_refused_before_building(nc, pack, hostile_vae_dir,
                                                                                  fields, words):
    path = hostile_vae_dir / f"akl_bounds_cfg_{abs(hash(json.dumps(fields))) % 10**6}.safetensors"
    hf.with_config(path, **fields)
    _refused(nc, pack, path, *words)


@LIMIT
def test_depth_inferred_from_20000_tiny_keys_is_refused(nc, pack, hostile_vae_dir):
    path = hostile_vae_dir / "akl_bounds_many_keys.safetensors"
    hf.many_resnets(path)
    assert path.stat().st_size < 4 << 20
    _refused(nc, pack, path, "layers_per_block=20001", "out of range")


# -- damaged configs: a VAELoadError naming the file and the field, never cached -----------------------

DAMAGED = {
    "groups0": ({"norm_num_groups": 0}, ("norm_num_groups=0", "out of range")),
    "groups-8": ({"norm_num_groups": -8}, ("norm_num_groups=-8",)),
    "groups3": ({"norm_num_groups": 3}, ("not divisible by norm_num_groups=3",)),
    "act_fn5": ({"act_fn": 5}, ("act_fn=5", "not supported")),
    "act_fn_long": ({"act_fn": "x" * 10**6}, ("act_fn=", "not supported")),
    "sample_inf": ({"sample_size": math.inf}, ("sample_size=inf", "must be an integer")),
    "sample_empty": ({"sample_size": []}, ("sample_size has 0 entries",)),
    "scaling_abc": ({"scaling_factor": "abc"}, ("scaling_factor='abc'", "must be a number")),
    "scaling_nan": ({"scaling_factor": math.nan}, ("scaling_factor=nan", "must be finite")),
    "shift_inf": ({"shift_factor": math.inf}, ("shift_factor=inf", "must be finite")),
    "mean_nan": ({"latents_mean": [0.0, math.nan, 0.0, 0.0]}, ("latents_mean[1]=nan",)),
    "quant_str": ({"use_quant_conv": "yes"}, ("use_quant_conv='yes'", "true or false")),
    "widths_int": ({"block_out_channels": 5}, ("block_out_channels=5", "must be a list")),
}


@LIMIT
@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_a_damaged_config_is_an_error_naming_the_file_and_the_field(nc, pack, hostile_vae_dir, kind):
    fields, words = DAMAGED[kind]
    path = hostile_vae_dir / f"akl_bounds_damaged_{kind}.safetensors"
    hf.with_config(path, **fields)
    msg = _refused(nc, pack, path, *words)
    assert len(msg) < 2000, len(msg)  # a 1 MB act_fn is not echoed whole


@LIMIT
def test_deeply_nested_json_and_a_zero_dim_conv_weight_are_named_errors(nc, pack, hostile_vae_dir):
    path = hostile_vae_dir / "akl_bounds_deep.safetensors"
    hf.deep_json_config(path)
    _refused(nc, pack, path, "vae_core.config", "nested too deeply")
    path = hostile_vae_dir / "akl_bounds_zero_dim.safetensors"
    hf.zero_dim_conv(path)
    _refused(nc, pack, path, "'encoder.conv_in.weight' has shape ()", "expected 4-D")


@LIMIT
def test_a_deeply_nested_config_json_in_a_folder_is_a_named_error(nc, pack, hostile_vae_dir):
    folder = hostile_vae_dir / "akl_bounds_deep_folder"
    hf.tiny_model().save_pretrained(folder)
    good = (folder / "config.json").read_text()
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with bounded() as cost:
        with pytest.raises(ValueError, match="config.json: the config is not valid JSON: nested too deeply"):
            nc.AutoencoderKLLoader().load("akl_bounds_deep_folder/")
    cost.check("deep config.json")
    (folder / "config.json").write_text(good)
    assert nc.AutoencoderKLLoader().load("akl_bounds_deep_folder/")["result"][0].latent_channels == 4


def test_an_unknown_family_argument_names_the_file(hostile_vae_dir):
    from vae_core import AutoencoderKL
    from vae_core.loading import VAELoadError

    path = hf.write_good(hostile_vae_dir / "akl_bounds_family_arg.safetensors")
    with pytest.raises(VAELoadError, match=r"akl_bounds_family_arg\.safetensors: family='sd4'.*unknown model family"):
        AutoencoderKL.from_single_file(path, family="sd4")


# -- what reaches the UI and /history ----------------------------------------------------------------


@LIMIT
def test_a_20mb_family_string_in_metadata_is_ignored_and_never_reaches_the_card(nc, hostile_vae_dir, caplog):
    path = hostile_vae_dir / "akl_bounds_long_family.safetensors"
    hf.with_metadata(path, vae_core__family="flux" + "x" * (20 << 20))
    with bounded() as cost:
        out = nc.AutoencoderKLLoader().load(path.name)
    cost.check("20 MB family string", rss_bound=512 << 20)  # the string itself is read: 20 MB, plus copies
    card = out["ui"]["akl_card"][0]
    text = json.dumps(card, allow_nan=False)  # strict JSON, as the browser's JSON.parse needs
    assert len(text) < 4000, len(text)
    assert card["family"] is None and "names no known family" in card["family_reason"]
    assert any("ignored the claim" in r.getMessage() and len(r.getMessage()) < 2000 for r in caplog.records)


@LIMIT
def test_a_family_claim_contradicting_the_channels_is_overridden_with_a_warning(nc, hostile_vae_dir, caplog):
    path = hostile_vae_dir / "akl_bounds_flux_claim.safetensors"
    hf.with_metadata(path, vae_core__family="flux")  # 4 latent channels; FLUX.1 has 16
    card = nc.AutoencoderKLLoader().load(path.name)["ui"]["akl_card"][0]
    assert card["latent_channels"] == 4 and card["family"] != "flux"
    assert card["scaling_factor"] != 0.3611 and card["shift_factor"] is None  # not FLUX.1's scale/shift
    assert "'flux'" in card["family_reason"] and "16 latent channels, not 4" in card["family_reason"]
    assert any("ignored the claim 'flux'" in r.getMessage() for r in caplog.records)
    json.dumps(card, allow_nan=False)


def test_modelspec_architecture_quoted_in_the_reason_is_capped(nc, hostile_vae_dir):
    path = hostile_vae_dir / "akl_bounds_long_arch.safetensors"
    hf.with_metadata(path, modelspec__architecture="stable-diffusion-v1" + "y" * (1 << 20))
    card = nc.AutoencoderKLLoader().load(path.name)["ui"]["akl_card"][0]
    assert len(json.dumps(card, allow_nan=False)) < 4000


# -- no bytes of a linked file in an error -----------------------------------------------------------

SECRET = "root:$6$Zq9SECRETHASH$abcdef:19000:0:99999:7:::\n"


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_link_to_a_private_text_file_is_described_not_echoed(nc, hostile_vae_dir, tmp_path, suffix):
    target = tmp_path / f"shadow{suffix}.txt"
    target.write_text(SECRET * 3)
    link = hostile_vae_dir / f"akl_bounds_shadow{suffix}"
    if not link.is_symlink():
        os.symlink(target, link)
    with pytest.raises(ValueError) as err:
        nc.AutoencoderKLLoader().load(link.name)
    msg = str(err.value)
    assert link.name in msg and "a text file" in msg, msg
    assert "SECRET" not in msg and "Zq9" not in msg and "$6$" not in msg and "99999" not in msg, msg


def test_a_link_to_an_unreadable_file_says_so(nc, hostile_vae_dir, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file, so permission cannot be denied here")
    target = tmp_path / "private.safetensors"
    target.write_text(SECRET)
    target.chmod(0)
    link = hostile_vae_dir / "akl_bounds_private.safetensors"
    if not link.is_symlink():
        os.symlink(target, link)
    with pytest.raises(ValueError, match="cannot read the file: Permission denied"):
        nc.AutoencoderKLLoader().load(link.name)


# -- a file that shrinks while it is read (SIGBUS with mmap) -------------------------------------------


@LIMIT
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_file_truncated_while_it_is_read_is_a_clean_error(nc, pack, hostile_vae_dir, monkeypatch, suffix):
    """The file is cut to a quarter just after the loader's first read of tensor data, as a copy or a
    download rewriting it in place would. With mmap (safe_open, the host's own loader) touching a page
    past the new end kills the process with SIGBUS; plain reads see the short read."""
    safe_read = pack.vae_core.safe_read  # the pack's copy, which the node uses

    path = hostile_vae_dir / f"akl_bounds_shrinks{suffix}"
    if suffix == ".ckpt":
        torch.save(hf.ldm_state_dict(), str(path))
    else:
        hf.write_good(path)
    real = safe_read._readinto
    cut = {"done": False}

    def truncate_then_read(f, view):
        if not cut["done"] and len(view) > 64:
            cut["done"] = True
            os.truncate(path, path.stat().st_size // 4)
        return real(f, view)

    monkeypatch.setattr(safe_read, "_readinto", truncate_then_read)
    if suffix == ".ckpt":  # torch reads a checkpoint itself: cut the file as it starts
        real_load = torch.load

        def truncate_then_load(f, *a, **kw):
            os.truncate(path, path.stat().st_size // 4)
            return real_load(f, *a, **kw)

        monkeypatch.setattr(torch, "load", truncate_then_load)
    loads = pack.nodes.cache.MODELS.loads
    with bounded() as cost:
        with pytest.raises(ValueError) as err:
            nc.AutoencoderKLLoader().load(path.name)
    cost.check("truncated while read")
    msg = str(err.value)
    assert path.name in msg and ("changed or shrank while it was being read" in msg or "truncated" in msg), msg
    assert pack.nodes.cache.MODELS.loads == loads
    monkeypatch.undo()
    _fixed_loads(nc, path)


def test_safetensors_are_read_without_mmap(hostile_vae_dir, monkeypatch):
    """The reader never maps the file: mmap.mmap and safetensors' safe_open are made to fail."""
    import mmap

    import safetensors

    from vae_core import AutoencoderKL

    path = hf.write_good(hostile_vae_dir / "akl_bounds_no_mmap.safetensors", seed=5)

    def refuse(*a, **kw):
        raise AssertionError("the loader mapped the file")

    monkeypatch.setattr(mmap, "mmap", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    model = AutoencoderKL.from_single_file(path)
    expected = hf.tiny_model(5).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


# -- the cache keys on content ----------------------------------------------------------------------


def test_a_rewrite_keeping_size_and_mtime_is_not_served_from_the_cache(nc, pack, hostile_vae_dir):
    """`cp -p` of another VAE of the same architecture: same size, same mtime, other weights."""
    path = hostile_vae_dir / "akl_bounds_cp_p.safetensors"
    other = hostile_vae_dir.parent / "akl_bounds_cp_p_other.safetensors"
    hf.write_good(path, seed=31)
    hf.write_good(other, seed=32)
    assert path.stat().st_size == other.stat().st_size
    first = nc.AutoencoderKLLoader().load(path.name)["result"][0]
    st = path.stat()
    shutil.copyfile(other, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    again = nc.AutoencoderKLLoader().load(path.name)["result"][0]
    assert again is not first
    assert torch.equal(next(again.core.parameters()), next(hf.tiny_model(32).parameters()))


def test_a_folder_whose_config_json_changed_but_not_its_newest_mtime_is_reloaded(nc, hostile_vae_dir):
    folder = hostile_vae_dir / "akl_bounds_cache_folder"
    hf.tiny_model().save_pretrained(folder)
    first = nc.AutoencoderKLLoader().load("akl_bounds_cache_folder/")["result"][0]
    cfg_path = folder / "config.json"
    st = cfg_path.stat()
    text = cfg_path.read_text()
    cfg_path.write_text(text.replace('"scaling_factor": 0.18215', '"scaling_factor": 0.13025'))
    assert "0.13025" in cfg_path.read_text()
    os.utime(cfg_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = nc.AutoencoderKLLoader().load("akl_bounds_cache_folder/")["result"][0]
    assert again is not first and again.core.config.scaling_factor == 0.13025
