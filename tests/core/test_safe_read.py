"""vae_core.safe_read and the config bounds, without the host: the plain-read safetensors reader gives
what safetensors gives, every header lie is a VAELoadError naming the file, the view and finite
checks are exact on real layouts, and `config.parameter_count` equals a built model's count."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from vae_core import AutoencoderKL, safe_read
from vae_core.config import ACT_FNS, AutoencoderKLConfig, parameter_count
from vae_core.layers import ACTIVATIONS
from vae_core.loading import VAELoadError


def test_act_fn_names_are_the_layers_activations():
    assert sorted(ACT_FNS) == sorted(ACTIVATIONS)


@pytest.mark.parametrize("cfg", [
    dict(block_out_channels=(8, 16, 32, 32), norm_num_groups=8),
    dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=3, latent_channels=16, in_channels=4,
         out_channels=1, use_quant_conv=False, use_post_quant_conv=False),
    dict(block_out_channels=(8, 8, 16), norm_num_groups=8, layers_per_block=2, mid_block_add_attention=False),
    dict(block_out_channels=(4,), norm_num_groups=2, latent_channels=1),
])
def test_parameter_count_equals_the_built_models(cfg):
    levels = len(cfg["block_out_channels"])
    cfg = dict(cfg, down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels)
    model = AutoencoderKL(**cfg)
    assert parameter_count(model.config) == sum(p.numel() for p in model.parameters())


def test_the_sd_config_counts_83_million_parameters():
    # SD's VAE (stabilityai/sd-vae-ft-mse) has 83,653,863 parameters
    sd = AutoencoderKLConfig(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
    assert parameter_count(sd) == 83_653_863


# -- the reader ------------------------------------------------------------------------------------


def test_plain_reads_give_what_safetensors_gives(tmp_path):
    sd = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2).bfloat16(),
          "f64": torch.randn(2).double(), "i64": torch.arange(5), "u8": torch.arange(4, dtype=torch.uint8),
          "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    if hasattr(torch, "float8_e4m3fn"):
        sd["f8"] = torch.randn(6).to(torch.float8_e4m3fn)
    path = tmp_path / "all.safetensors"
    save_file(sd, str(path), metadata={"format": "pt", "k": "v"})
    ours, meta = safe_read.read_safetensors(path)
    ref = load_file(str(path))
    assert meta == {"format": "pt", "k": "v"} and set(ours) == set(ref)
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape
        as_bytes = (lambda t: t.reshape(-1).view(torch.uint8))  # bit-exact, and float8 has no equal()
        assert torch.equal(as_bytes(ours[k]), as_bytes(v)), k


def _write_raw(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("entry,words", [
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 1000]}, ("data_offsets", "within the 16 data bytes")),
    ({"dtype": "F32", "shape": [100], "data_offsets": [0, 16]}, ("declares shape (100,)", "holds 16 bytes")),
    ({"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}, ("dtype 'Q4'",)),
    ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, ("non-negative integers",)),
    ({"dtype": "F32", "shape": [4], "data_offsets": [8, 4]}, ("data_offsets",)),
    ("not an object", ("described by a str",)),
])
def test_header_lies_are_named_errors(tmp_path, entry, words):
    path = tmp_path / "lie.safetensors"
    _write_raw(path, {"w": entry}, bytes(16))
    with pytest.raises(VAELoadError) as err:
        safe_read.read_safetensors(path)
    assert str(path) in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_overlapping_tensors_and_nan_in_a_header_are_refused(tmp_path):
    path = tmp_path / "overlap.safetensors"
    _write_raw(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16))
    with pytest.raises(VAELoadError, match="overlaps the tensor before it"):
        safe_read.read_safetensors(path)
    raw = b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}'
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(VAELoadError, match="header is not valid JSON"):
        safe_read.read_safetensors(path)


def test_a_deeply_nested_header_is_a_named_error(tmp_path):
    path = tmp_path / "deep.safetensors"
    raw = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(VAELoadError, match="its header is nested too deeply"):
        safe_read.read_safetensors(path)


def test_a_header_longer_than_the_file_is_truncation(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(VAELoadError, match="truncated safetensors file: its header claims 1,000,000,000 bytes"):
        safe_read.read_safetensors(path)


def test_the_reader_refuses_what_does_not_fit_in_memory(tmp_path, monkeypatch):
    from vae_core import memory

    path = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(1024)}, str(path))
    monkeypatch.setattr(memory, "free_memory", lambda device: 1000)  # bytes
    with pytest.raises(VAELoadError, match="needs 0.00 GiB but only 0.00 GiB of system memory is available"):
        safe_read.read_safetensors(path)


# -- views and the finite check ---------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: torch.zeros(4, 5), lambda: torch.zeros(4, 5).t(), lambda: torch.zeros(2, 3, 4, 5)[:, 1:, ::2],
    lambda: torch.zeros(2, 8, 3, 3).contiguous(memory_format=torch.channels_last), lambda: torch.zeros(6)[1:],
    lambda: torch.zeros(1, 5).expand(1, 5), lambda: torch.zeros(3, 1, 4),
])
def test_real_layouts_are_not_overlapping(make):
    assert safe_read._non_overlapping(make())


@pytest.mark.parametrize("make", [
    lambda: torch.zeros(1).expand(10), lambda: torch.zeros(7).as_strided((4, 4), (1, 1)),
    lambda: torch.zeros(20).as_strided((3, 3), (1, 2)), lambda: torch.zeros(3, 1).expand(3, 4),
])
def test_crafted_views_are_overlapping(make):
    assert not safe_read._non_overlapping(make())


@pytest.mark.parametrize("where", [0, 12345, -1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_chunked_finite_check_finds_one_bad_value_anywhere(where, bad):
    t = torch.zeros(64, 3, 50, 7)  # 67,200 values, checked in chunks of 1,000
    t.view(-1)[where] = bad
    assert not safe_read.all_finite(t, chunk=1000)
    assert not safe_read.all_finite(t.permute(3, 1, 0, 2), chunk=1000)  # non-contiguous
    assert not safe_read.all_finite(t.view(-1), chunk=1000)
    t.view(-1)[where] = 0.0
    assert safe_read.all_finite(t, chunk=1000) and safe_read.all_finite(t.view(-1), chunk=1000)
    assert safe_read.all_finite(t[0, 0], chunk=10)  # rows longer than a chunk


def test_describe_bytes_never_returns_the_bytes():
    for head in (b"root:x:0:0:root:/root", b"\x7fELFsecret", b"{\"secret\": 1}", b"\x00\x01secret\xff"):
        assert "secret" not in safe_read.describe_bytes(head) and "root" not in safe_read.describe_bytes(head)


def test_small_expanded_buffers_pass_and_large_ones_are_refused(tmp_path):
    """A full checkpoint may hold a text encoder's expanded position ids (stride 0 on a size-1 or small
    dimension); a view describing MBs over a few stored bytes is refused by name."""
    path = tmp_path / "ids.ckpt"
    sd = {"ids": torch.arange(77).expand(1, -1), "rows": torch.zeros(1, 16).expand(8, 16), "w": torch.zeros(3)}
    torch.save(sd, str(path))
    loaded = torch.load(str(path), weights_only=True)
    safe_read.check_views(loaded, path, path.stat().st_size)
    loaded["big"] = torch.zeros(1).expand(1 << 19)  # 2 MiB described by 4 bytes
    with pytest.raises(VAELoadError, match="'big' of shape \\(524288,\\) is a stride-0 view"):
        safe_read.check_views(loaded, path, path.stat().st_size)


def test_a_full_checkpoint_reads_only_its_vae(tmp_path):
    """The UNet and text encoders of a full checkpoint stay on disk (meta tensors: names, shapes and
    dtypes only), so loading a VAE from a 7 GB SDXL file does not read 7 GB; key-based family
    detection still sees them."""
    from vae_core import convert

    m = AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2)
    full = {"first_stage_model." + k: v.contiguous() for k, v in convert.diffusers_to_ldm(m.state_dict()).items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.ones(256, 256, 3, 3)
    full["conditioner.embedders.1.model.ln_final.weight"] = torch.ones(8)
    path = tmp_path / "full.safetensors"
    save_file(full, str(path))
    sd, _ = safe_read.read_safetensors(path)
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].is_meta
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].shape == (256, 256, 3, 3)
    assert not sd["first_stage_model.encoder.conv_in.weight"].is_meta
    assert all(not v.is_meta for v in safe_read.read_safetensors(path, vae_only=False)[0].values())
    loaded = AutoencoderKL.from_single_file(path, config=m.config)
    assert loaded.info["family"] == "sdxl"  # from the conditioner's key
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), m.state_dict().values()))
