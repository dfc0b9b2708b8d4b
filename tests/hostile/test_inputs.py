"""Bad inputs to the encode/decode nodes, in-process: each gets a clear error before any work, or a
documented handling. Already covered elsewhere (not repeated): latent channel mismatch and RGBA /
non-multiple-of-8 crops (tests/nodes/test_behaviour.py), tile_size/overlap validation
(tests/nodes/test_contract.py)."""
from __future__ import annotations

import pytest
import torch

GiB = 2**30


def _encode(nc, vae, image, node):
    if node == "Encode":
        return nc.AutoencoderKLEncode().encode(image, vae)["result"][0]["samples"]
    return nc.AutoencoderKLEncodeTiled().encode(image, vae, 64, 16)["result"][0]["samples"]


def _decode(nc, vae, z, node):
    if node == "Decode":
        return nc.AutoencoderKLDecode().decode({"samples": z}, vae)["result"][0]
    method = node.split("/")[1]
    return nc.AutoencoderKLDecodeTiled().decode({"samples": z}, vae, 64, 16, method)["result"][0]


ENCODERS = ["Encode", "EncodeTiled"]
DECODERS = ["Decode", "DecodeTiled/blend", "DecodeTiled/exact"]


@pytest.mark.parametrize("node", ENCODERS)
@pytest.mark.parametrize("hw", [(4, 4), (7, 64), (64, 7)])
def test_images_smaller_than_8px_are_refused(nc, good_vae, node, hw):
    with pytest.raises(ValueError, match=r"at least 8x8"):
        _encode(nc, good_vae, torch.rand(1, *hw, 3), node)


@pytest.mark.parametrize("node", ENCODERS)
@pytest.mark.parametrize("channels", [1, 2])
def test_grayscale_and_two_channel_images_are_refused_with_what_to_do(nc, good_vae, node, channels):
    with pytest.raises(ValueError, match=rf"{channels} channel\(s\).*needs 3 \(RGB\)\. Convert it to RGB"):
        _encode(nc, good_vae, torch.rand(1, 32, 32, channels), node)


@pytest.mark.parametrize("node", ENCODERS)
def test_empty_image_batch_is_refused(nc, good_vae, node):
    with pytest.raises(ValueError, match=r"image batch is empty \(\[0, 32, 32, 3\]\).*nothing to encode"):
        _encode(nc, good_vae, torch.rand(0, 32, 32, 3), node)


@pytest.mark.parametrize("node", DECODERS)
@pytest.mark.parametrize("shape,match", [
    ((0, 4, 8, 8), r"latent batch is empty"),
    ((1, 4, 0, 8), r"zero-sized side"),
])
def test_empty_latents_are_refused(nc, good_vae, node, shape, match):
    with pytest.raises(ValueError, match=match):
        _decode(nc, good_vae, torch.zeros(shape), node)


@pytest.mark.parametrize("node", DECODERS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_latents_are_refused_not_decoded_to_a_black_image(nc, good_vae, node, value):
    z = torch.zeros(1, 4, 12, 12)
    z[0, 1, 5, 7] = value
    with pytest.raises(ValueError, match=r"latent holds 1 non-finite values .*sampler"):
        _decode(nc, good_vae, z, node)


@pytest.mark.parametrize("node", ENCODERS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_images_are_refused(nc, good_vae, node, value):
    image = torch.rand(1, 96, 96, 3)
    image[0, 3, 4, 1] = value
    with pytest.raises(ValueError, match=r"image holds 1 non-finite values"):
        _encode(nc, good_vae, image, node)


def test_finite_latents_far_out_of_range_fail_instead_of_a_black_image(nc, good_vae):
    """1e38 is finite but overflows inside the VAE even in fp32: an error, never a silent NaN image."""
    with pytest.raises(ValueError, match=r"NaN/inf values even in fp32.*1e\+38"):
        _decode(nc, good_vae, torch.full((1, 4, 4, 4), 1e38), "Decode")


def test_ordinary_extreme_values_still_decode(nc, good_vae):
    """Large but sane latents (|z| = 50) give a valid image; the checks refuse only non-finite data."""
    image = _decode(nc, good_vae, torch.full((1, 4, 4, 4), 50.0), "Decode")
    assert torch.isfinite(image).all() and 0 <= image.min() and image.max() <= 1


# -- absurd sizes: refused before any allocation, from the estimate ---------------------------------


@pytest.fixture()
def little_ram(pack, monkeypatch):
    """Pretend the server has 2 GiB of system memory available."""
    monkeypatch.setattr(pack.nodes.run, "available_ram", lambda: 2 * GiB)
    return 2 * GiB


@pytest.mark.timeout(60)
@pytest.mark.parametrize("node", DECODERS)
def test_a_16384px_decode_that_cannot_fit_is_refused_up_front(nc, good_vae, little_ram, node):
    z = torch.zeros(1, 4, 2048, 2048)  # EmptyLatentImage at its maximum, 16384 x 16384
    with pytest.raises(ValueError) as err:
        _decode(nc, good_vae, z, node)
    msg = str(err.value)
    assert "16384x16384 px" in msg and "GiB of system memory" in msg and "2.0 GiB is available" in msg
    assert "refused before starting" in msg and "smaller" in msg


@pytest.mark.timeout(60)
@pytest.mark.parametrize("node", ENCODERS)
def test_an_encode_that_cannot_fit_is_refused_up_front(nc, good_vae, pack, monkeypatch, node):
    # the [-1, 1] copy of a 1024^2 image alone is 12 MiB; 8 MiB cannot hold it, tiled or not
    monkeypatch.setattr(pack.nodes.run, "available_ram", lambda: 8 * 2**20)
    with pytest.raises(ValueError, match=r"AutoencoderKL encode: 1 image\(s\) of 1024x1024 px .* refused"):
        _encode(nc, good_vae, torch.rand(1, 1024, 1024, 3), node)


def test_what_fits_still_runs_with_little_memory(nc, good_vae, little_ram):
    for node in DECODERS:
        assert _decode(nc, good_vae, torch.zeros(1, 4, 16, 16), node).shape == (1, 128, 128, 3)


def test_the_memory_estimate_grows_with_the_request(pack, good_vae):
    needed = pack.nodes.run._needed_ram
    small, _ = needed("decode", good_vae, (1, 4, 64, 64), None)
    big, how = needed("decode", good_vae, (1, 4, 2048, 2048), None)
    batch, _ = needed("decode", good_vae, (16, 4, 64, 64), None)
    # the IMAGE alone is 3 GiB at 16384^2 (and so is the decoder's fp32 output)
    assert big - small > 6 * GiB and "tiling" in how
    assert batch > small


# -- attention can never be quadratic by accident (issue 13) -----------------------------------------


@pytest.fixture()
def score_spy(pack, score_recorder):
    """(batch, queries, keys) of every score matrix the pack's plain-matmul kernel builds."""
    return score_recorder(pack.vae_core.attention)


def _math_vae(nc, vae):
    return nc.AutoencoderKLSetAttentionProcessor().set_processor(vae, "math")["result"][0]


# 16 x 16 latent: 256 positions, a (256, 256) fp32 score matrix and its softmax are 512 KiB; the budget
# injected below allows 8 query rows. At 2048^2 (65,536 positions) the whole matrix would be 32 GiB.
ROWS_ALLOWED = 8
SCORE_LIMIT = 256 * 8 * ROWS_ALLOWED


def test_math_attention_in_a_tiled_decode_that_fits_one_tile_is_sliced(nc, pack, good_vae, score_spy, monkeypatch):
    """Set Attention Processor 'math', then a latent into the Tiled Decode with tile 4096: the image fits one
    tile, so the node runs core.decode untiled; the attention guard still bounds the score matrix."""
    free = int(SCORE_LIMIT / pack.vae_core.memory.SAFETY) + 8
    monkeypatch.setattr(pack.nodes.run, "_free_bytes", lambda vae: free)
    vae = _math_vae(nc, good_vae)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out = nc.AutoencoderKLDecodeTiled().decode({"samples": z}, vae, 4096, 0, "exact")
    assert out["ui"]["akl_grid"][0]["tiles"] == 1
    assert score_spy and max(b * q * k * 8 for b, q, k in score_spy) <= SCORE_LIMIT
    ref = nc.AutoencoderKLDecode().decode({"samples": z}, good_vae)["result"][0]  # sdpa, the default
    torch.testing.assert_close(out["result"][0], ref, atol=1e-5, rtol=0)  # fp32; slicing changes rounding only


def test_math_attention_through_the_hosts_vae_decode_is_sliced(host, nc, pack, good_vae, score_spy, monkeypatch):
    """The host's VAEDecode calls our object's first_stage_model directly: the guard measures free memory
    itself there (here: injected small)."""
    monkeypatch.setattr(pack.vae_core.memory, "free_memory",
                        lambda device: int(SCORE_LIMIT / pack.vae_core.memory.SAFETY) + 8)
    vae = _math_vae(nc, good_vae)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    image = host.VAEDecode().decode(vae, {"samples": z})[0]
    assert image.shape == (1, 128, 128, 3) and torch.isfinite(image).all()
    assert score_spy and max(b * q * k * 8 for b, q, k in score_spy) <= SCORE_LIMIT


def test_the_memory_check_counts_attention(pack, good_vae, nc):
    needed = pack.nodes.run._needed_ram
    shape = (1, 4, 64, 64)
    fused, _ = needed("decode", good_vae, shape, None)
    math, _ = needed("decode", _math_vae(nc, good_vae), shape, None)
    assert math > fused  # 4096 positions: a 128 MiB score matrix (under the cap), counted


# -- long runs are announced; far-out inputs warned, not refused (issue 13) ---------------------------


def test_a_tiled_run_of_many_tiles_is_announced_up_front_and_still_cancels(nc, pack, good_vae, monkeypatch, caplog):
    import logging

    import comfy.model_management as mm

    monkeypatch.setattr(pack.nodes.run, "LONG_RUN_TILES", 8)  # stands for "some thousands"
    z = torch.zeros(1, 4, 24, 24)  # 192 px in 64 px blend tiles, 16 px overlap: 16 tiles
    with caplog.at_level(logging.WARNING):
        out = nc.AutoencoderKLDecodeTiled().decode({"samples": z}, good_vae, 64, 16, "blend")
    report = out["ui"]["akl_run"][0]
    assert report["tiles"] == 16
    up_front, eta = report["warnings"]
    assert "long run" in up_front and "16 tiles of 64 px (blend)" in up_front and "Cancel" in up_front
    assert eta.startswith("long run: 16 steps, about") and "left" in eta
    assert sum("long run" in r.getMessage() for r in caplog.records) == 2
    mm.interrupt_current_processing(True)  # Cancel still stops it
    try:
        with pytest.raises(mm.InterruptProcessingException):
            nc.AutoencoderKLDecodeTiled().decode({"samples": z}, good_vae, 64, 16, "blend")
    finally:
        mm.interrupt_current_processing(False)


def test_a_long_run_is_timed_after_three_slow_steps_without_waiting_for_one_percent(pack, monkeypatch):
    run = pack.nodes.run
    monkeypatch.setattr(run, "EARLY_ESTIMATE_S", 0.0)  # "slow enough to time": any elapsed time here
    notes = []
    cb = run.progress_callback(1000, notes, announce_over=10)
    cb(1, 1000)
    cb(2, 1000)
    assert notes == []  # fewer than three steps: too few to time
    cb(3, 1000)
    cb(4, 1000)
    assert len(notes) == 1 and notes[0].startswith("long run: 1000 steps, about") and "first 3" in notes[0]
    quiet = []
    short = run.progress_callback(10, quiet, announce_over=10)
    for i in range(1, 11):
        short(i, 10)
    assert quiet == []  # not a long run


def test_short_runs_carry_no_warning(nc, good_vae):
    report = nc.AutoencoderKLDecodeTiled().decode({"samples": torch.zeros(1, 4, 24, 24)}, good_vae, 64, 16,
                                                  "blend")["ui"]["akl_run"][0]
    assert report["warnings"] == []


def test_latents_far_outside_a_vaes_range_run_with_a_warning(nc, good_vae):
    z = torch.zeros(1, 4, 8, 8)
    z[0, 0, 0, 0] = -2e4
    for node in DECODERS:
        if node == "Decode":
            out = nc.AutoencoderKLDecode().decode({"samples": z}, good_vae)
        else:
            out = nc.AutoencoderKLDecodeTiled().decode({"samples": z}, good_vae, 64, 16, node.split("/")[1])
        warnings = out["ui"]["akl_run"][0]["warnings"]
        assert len(warnings) == 1 and "up to |2e+04|" in warnings[0], node
        assert "outside a VAE's range" in warnings[0]


@pytest.mark.parametrize("value", [-0.6, 1.7])
def test_images_outside_minus_half_to_one_and_a_half_run_with_a_warning(nc, good_vae, value):
    image = torch.full((1, 32, 32, 3), 0.5)
    image[0, 3, 4, 1] = value
    for node in ENCODERS:
        out = (nc.AutoencoderKLEncode().encode(image, good_vae) if node == "Encode"
               else nc.AutoencoderKLEncodeTiled().encode(image, good_vae, 64, 16))
        warnings = out["ui"]["akl_run"][0]["warnings"]
        assert len(warnings) == 1 and "far outside [0, 1]" in warnings[0], node
    inside = torch.full((1, 32, 32, 3), 1.4)  # slightly outside [0, 1] is common (upscalers): no warning
    assert nc.AutoencoderKLEncode().encode(inside, good_vae)["ui"]["akl_run"][0]["warnings"] == []
