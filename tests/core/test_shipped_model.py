"""Tests of the small demo VAE shipped in models/vae/: what its file says it is (family "demo",
fp16 storage), held-out fidelity and colour against its model card, tiling on a real photo, and
the training script's --smoke run.

Not unit tests of the core: those use tiny random configs. `load_shipped_vae()` is the helper
other tests may import to get this trained model.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
SHIPPED = MODELS / "vae" / "autoencoderkl-demo-f8.safetensors"
SCRIPTS = ROOT / "scripts"

sys.path.insert(0, str(ROOT))
from vae_core import AutoencoderKL  # noqa: E402

# The card's PSNR is computed by the same fp32 CPU forward on the same uint8 inputs; a rerun can
# differ only through kernel choice (thread count, SIMD path), i.e. fp32 rounding, which moves
# the uint8 output by at most a code value here and there (~0.01 dB). 0.5 dB is far above that
# and far below what a broken load (wrong key mapping, lost scaling, wrong norm groups) costs.
PSNR_MARGIN_DB = 0.5
# The SSIM margin follows from the same argument (SSIM of near-identical outputs moves < 1e-3).
SSIM_MARGIN = 0.01
# A mean channel shift moves by far less than one code value under fp32 rounding; 0.5/255 is
# a quarter of the 2/255 target and would catch a lost bias or a swapped channel at once.
SHIFT_MARGIN = 0.5
# The first shipped model (1.13 M parameters, fp32) scored these on the held-out photos: a
# retrained model must not ship below them, whatever its own card says.
FIRST_MODEL_PSNR = {"chelsea": 23.76, "coffee": 22.49}


@functools.lru_cache(maxsize=1)
def load_shipped_vae() -> AutoencoderKL:
    """The shipped demo VAE (fp32, eval mode), loaded through the core's single-file loader.

    Cached: callers must not mutate it (use enable_tiling on a copy.deepcopy if needed)."""
    if not SHIPPED.is_file():
        raise FileNotFoundError(f"{SHIPPED} is missing; train it with scripts/train_small_vae.py --out models")
    return AutoencoderKL.from_single_file(SHIPPED).eval()


def card_metrics() -> dict:
    return json.loads((MODELS / "metrics.json").read_text())


def _trainer():
    """scripts/train_small_vae.py as a module."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    import train_small_vae

    return train_small_vae


def _small_pair(**wider):
    """A seeded two-level model of the trainer's architecture and an empty one that differs by `wider`."""
    tsv = _trainer()
    small = dict(tsv.MODEL_CONFIG, block_out_channels=(16, 16), norm_num_groups=8, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    torch.manual_seed(0)
    return small, AutoencoderKL(**small).eval(), AutoencoderKL(**dict(small, **wider)).eval()


def _images():
    pytest.importorskip("skimage")
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    import images  # scripts/images.py

    return images


def _to_x(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(arr, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _round_trip(arr: np.ndarray):
    """The shipped VAE's reconstruction of a uint8 photo (posterior mean) and its mean RGB shift."""
    vae = load_shipped_vae()
    with torch.no_grad():
        rec = _to_uint8(vae.decode(vae.encode(_to_x(arr)).latent_dist.mode()).sample)
    return rec, (rec.astype(np.float64) - arr.astype(np.float64)).reshape(-1, 3).mean(axis=0)


def _heldout(name: str) -> np.ndarray:
    images = _images()
    return images.center_crop_multiple(images.load_rgb(name), 8)


# -- the files ------------------------------------------------------------------------------


def test_shipped_files_and_config():
    from safetensors import safe_open

    from vae_core.latent_formats import FAMILIES

    metrics = card_metrics()
    assert SHIPPED.stat().st_size <= 5_000_000, "the shipped VAE must stay within 5 MB"
    with safe_open(str(SHIPPED), framework="pt") as f:
        meta = f.metadata()
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}, f"the demo VAE is stored in fp16 (card: {metrics['storage']}), found {dtypes}"
    assert meta["vae_core.family"] == "demo"
    assert "not SD-compatible" in meta["vae_core.description"]
    # models/vae is registered as a ComfyUI `vae` path: nothing but weights may sit there
    assert sorted(p.name for p in (MODELS / "vae").iterdir()) == [SHIPPED.name]
    vae = load_shipped_vae()
    assert vae.info.get("config_origin") == "metadata"
    assert vae.config.downscale_factor == 8 and vae.config.latent_channels == metrics["config"]["latent_channels"]
    assert vae.config.shift_factor is None
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"], rel=1e-6)
    # the "demo" latent format holds the same factor, rounded to 5 significant digits
    assert FAMILIES["demo"].scaling_factor == pytest.approx(metrics["scaling_factor"], rel=1e-4)
    assert FAMILIES["demo"].shift_factor is None
    assert FAMILIES["demo"].latent_channels == metrics["config"]["latent_channels"]
    assert vae.info["family"] == "demo" and vae.info["family_reason"] == "file metadata (vae_core.family)"
    assert "not SD-compatible" in vae.info["description"]
    assert vae.dtype == torch.float32, "the loader must upcast the fp16-stored weights to fp32"
    assert sum(p.numel() for p in vae.parameters()) == metrics["params"]
    assert (MODELS / "samples" / "chelsea.png").is_file()
    assert (MODELS / "MODEL_CARD.md").is_file()


# -- fidelity on held-out photos ------------------------------------------------------------


def test_the_demo_family_is_known_but_named_in_no_channel_hint():
    from vae_core.latent_formats import describe_channels, get_family

    assert get_family("demo").label == "demo (not SD-compatible)"
    assert "demo" not in describe_channels(4)  # "a 4-channel latent (SD1.x/SDXL)" stays as it was


def test_card_covers_each_heldout_photo_and_never_regresses_on_the_first_model():
    images = _images()
    card = card_metrics()
    assert sorted(card["heldout"]) == sorted(images.names("test"))
    for name, floor in FIRST_MODEL_PSNR.items():
        assert card["heldout"][name]["psnr"] >= floor, f"{name}: the card's PSNR is below the first model's"


@pytest.mark.parametrize("name", sorted(json.loads((MODELS / "metrics.json").read_text())["heldout"]))
def test_heldout_reconstruction_matches_card(name):
    from skimage.metrics import structural_similarity

    images = _images()
    if not images.available(name):
        pytest.skip(f"{name} is a Debian photo not unpacked here; run scripts/train_small_vae.py "
                    f"--fetch-data (apt-get download) to test it")
    card = card_metrics()["heldout"][name]
    arr = _heldout(name)
    assert list(arr.shape[:2]) == card["shape"]
    rec, shift = _round_trip(arr)
    p = _psnr(arr, rec)
    s = structural_similarity(arr, rec, channel_axis=2, data_range=255)
    print(f"{name}: PSNR {p:.3f} dB (card {card['psnr']:.3f}), SSIM {s:.4f} (card {card['ssim']:.4f}), "
          f"RGB shift {shift.round(2).tolist()} (card {np.round(card['colour_shift'], 2).tolist()})")
    assert p >= card["psnr"] - PSNR_MARGIN_DB
    assert s >= card["ssim"] - SSIM_MARGIN
    assert np.abs(shift - np.array(card["colour_shift"])).max() <= SHIFT_MARGIN


def _sided_cases():
    sides = card_metrics().get("heldout_sides") or {}
    return sorted((int(side), name) for side, res in sides.items() for name in res)


def test_card_measures_each_heldout_photo_at_the_issues_sizes():
    """Issue 17's targets hold at 256-512 px: the card carries every held-out photo at both sides,
    and its verdict counts them (a photo at 25 dB as evaluated but below it at 256 px fails)."""
    tsv = _trainer()
    card = card_metrics()
    assert sorted(card["heldout_sides"]) == ["256", "512"]
    for res in card["heldout_sides"].values():
        assert sorted(res) == sorted(card["heldout"])
    ok = {"psnr": 26.0, "colour_shift": [0.5, -0.5, 0.0]}
    assert tsv.meets_targets({"heldout": {"a": ok}, "heldout_sides": {"256": {"a": ok}}})
    assert not tsv.meets_targets({"heldout": {"a": ok}, "heldout_sides": {"256": {"a": dict(ok, psnr=24.9)}}})
    assert not tsv.meets_targets({"heldout": {"a": ok}, "heldout_sides": {"512": {"a": dict(ok, colour_shift=[2.1, 0, 0])}}})
    assert tsv.target_parts({"heldout": {"a": ok}, "heldout_sides": {"512": {"a": dict(ok, colour_shift=[2.1, 0, 0])}}}) \
        == (True, False)
    assert tsv.target_parts({"heldout": {"a": dict(ok, psnr=24.9)}}) == (False, True)
    text = (MODELS / "MODEL_CARD.md").read_text()
    assert tsv.meets_targets(card) == ("**met**" in text)
    psnr_ok, colour_ok = tsv.target_parts(card)
    assert f"PSNR >= 25 dB: {'met' if psnr_ok else 'not met'};" in text
    assert f"shift <= 2/255: {'met' if colour_ok else 'not met'})" in text


@pytest.mark.parametrize("side,name", _sided_cases())
def test_heldout_reconstruction_at_the_issues_sizes_matches_card(side, name):
    images = _images()
    if not images.available(name):
        pytest.skip(f"{name} is a Debian photo not unpacked here; run scripts/train_small_vae.py --fetch-data")
    card = card_metrics()["heldout_sides"][str(side)][name]
    arr = images.center_crop_multiple(images.fit_longer_side(images.load_rgb(name), side), 8)
    assert list(arr.shape[:2]) == card["shape"] and max(arr.shape[:2]) <= side
    rec, shift = _round_trip(arr)
    assert _psnr(arr, rec) >= card["psnr"] - PSNR_MARGIN_DB
    assert np.abs(shift - np.array(card["colour_shift"])).max() <= SHIFT_MARGIN


def test_whole_sides_add_whole_shrunk_images_to_batches_of_one(monkeypatch):
    """--whole-sides: each image is also drawn whole at those longer sides (multiples of 8), but only
    into batches of one; without the option every draw is a square crop as before."""
    tsv = _trainer()
    photo = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    monkeypatch.setattr(tsv.images, "load_rgb", lambda name: photo)
    sampler = tsv.CropSampler(["photo"], np.random.default_rng(1), 128, whole_sides=(200, 1000))
    assert [tuple(w.shape) for w in sampler.whole[0]] == [(3, 120, 200)]  # 1000 > 500: not kept
    shapes = {tuple(sampler.batch(128, 1).shape[2:]) for _ in range(60)}
    assert shapes == {(128, 128), (120, 128)}  # a 128 crop of the whole 120x200 image keeps its height
    assert {tuple(sampler.batch(128, 2).shape[2:]) for _ in range(20)} == {(128, 128)}
    plain = tsv.CropSampler(["photo"], np.random.default_rng(1), 128)
    assert {tuple(plain.batch(128, 1).shape[2:]) for _ in range(30)} == {(128, 128)}
    assert "whole, shrunk to 256 and 360 px" in tsv.whole_text({"whole_sides": [256, 360]})
    assert tsv.whole_text({}) == ""


# -- tiling on a real photo -----------------------------------------------------------------


def test_blend_tiled_decode_of_a_real_photo_is_close_to_untiled(record_property):
    """diffusers' blend tiling is an approximation (each tile normalises with its own GroupNorm
    statistics and seams are cross-faded); on a trained model and a real photo the difference
    must stay finite and modest. The number is reported, not tuned for."""
    import copy

    arr = _heldout("chelsea")  # 296 x 448 -> latent 37 x 56
    vae = copy.deepcopy(load_shipped_vae())
    with torch.no_grad():
        z = vae.encode(_to_x(arr)).latent_dist.mode()
        untiled = vae.decode(z).sample
        vae.enable_tiling(tile_sample_min_size=128)  # 16-latent tiles, 4-latent overlap
        calls = []
        tiled = vae.tiled_decode(z, callback=lambda done, total: calls.append((done, total))).sample
    assert tiled.shape == untiled.shape
    assert len(calls) > 1 and calls[-1][0] == calls[-1][1], f"expected several tiles, got {calls}"
    p = _psnr(_to_uint8(untiled), _to_uint8(tiled))
    record_property("blend_tiled_vs_untiled_psnr_db", p)
    record_property("tiles", calls[-1][1])
    print(f"blend tiled decode vs untiled: {p:.2f} dB over {calls[-1][1]} tiles")
    assert math.isfinite(p)
    # Below ~20 dB the seams would be the dominant error, worse than the model itself.
    assert p > 20.0


def test_blend_tiled_encode_of_a_real_photo_is_close_to_untiled(record_property):
    import copy

    arr = _heldout("coffee")  # 400 x 600
    vae = copy.deepcopy(load_shipped_vae())
    with torch.no_grad():
        z = vae.encode(_to_x(arr)).latent_dist.mode()
        vae.enable_tiling(tile_sample_min_size=192)
        calls = []
        zt = vae.tiled_encode(_to_x(arr), callback=lambda done, total: calls.append((done, total))).latent_dist.mode()
        vae.disable_tiling()
        rec, rec_t = vae.decode(z).sample, vae.decode(zt).sample
    assert len(calls) > 1, f"expected several tiles, got {calls}"
    p = _psnr(_to_uint8(rec), _to_uint8(rec_t))
    record_property("blend_tiled_encode_vs_untiled_psnr_db", p)
    print(f"blend tiled encode vs untiled (after an untiled decode): {p:.2f} dB over {calls[-1][1]} tiles")
    assert math.isfinite(p)
    assert p > 20.0


def test_exact_tiled_decode_and_encode_of_a_real_photo_equal_untiled():
    """Exact tiling on a trained model and a real photo: the untiled result within fp32 rounding.

    1e-4 on [-1, 1] is ~800 fp32 ulps at 1.0: the per-tile GroupNorm statistics are merged in
    float64 and the convolutions see other tile shapes, so only summation order differs
    (measured: 6e-6 for the decode, 2.5e-5 on latents of magnitude ~14)."""
    import copy

    arr = _heldout("chelsea")
    vae = copy.deepcopy(load_shipped_vae())
    x = _to_x(arr)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        untiled = vae.decode(z).sample
        vae.enable_tiling(method="exact", tile_sample_min_size=128)
        calls = []
        tiled = vae.tiled_decode(z, callback=lambda done, total: calls.append(done)).sample
        enc_calls = []
        z_tiled = vae.tiled_encode(x, callback=lambda done, total: enc_calls.append(done)).latent_dist.mode()
    assert len(calls) > 1 and len(enc_calls) > 1, "exact tiling must run more than one tile"
    assert (tiled - untiled).abs().max().item() <= 1e-4
    assert (z_tiled - z).abs().max().item() <= 1e-4 * max(1.0, z.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decode_of_a_real_photo(dtype, record_property):
    """bf16/fp16 decode through the planner against fp32, on 8-bit output. 40 dB is an RMS error of
    ~2.5/255: bf16 keeps an 8-bit significand (relative rounding 2^-9, ~0.5/255 per operation at
    full scale), fp16 an 11-bit one; either should stay well under that (measured: 57 and 64 dB)."""
    from vae_core import planner

    arr = _heldout("chelsea")
    vae = load_shipped_vae()
    with torch.no_grad():
        z = vae.encode(_to_x(arr)).latent_dist.mode()
        reference = vae.decode(z).sample
    out, report = planner.run_decode(vae, z, dtype=dtype, force_upcast=False)
    assert report["dtype"] == str(dtype).replace("torch.", "") and not report["fp32_retry"]
    assert vae.dtype == torch.float32, "the half-precision run must leave the model in fp32"
    p = _psnr(_to_uint8(reference), _to_uint8(out.float()))
    record_property(f"{dtype}_vs_fp32_psnr_db", p)
    assert p >= 40.0


# -- the training script --------------------------------------------------------------------


def test_train_script_smoke(tmp_path):
    pytest.importorskip("skimage")
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "train_small_vae.py"), "--smoke", "--out", str(tmp_path), "--threads", "1",
         "--ema-decay", "0.999", "--mse-weight", "4"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    weights = tmp_path / "vae" / "autoencoderkl-demo-f8.safetensors"
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == [weights.name]
    vae = AutoencoderKL.from_single_file(weights)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 1
    assert list(vae.config.block_out_channels) == list(metrics["config"]["block_out_channels"])
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"], rel=1e-6)
    for name in ("MODEL_CARD.md", "train_log.csv", "loss_curve.png", "samples/chelsea.png"):
        assert (tmp_path / name).is_file(), name
    # a non-default option must reach the record and the card's reproduce command
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert metrics["ema_decay"] == 0.999
    assert "(decay 0.999 per step)" in card and " --ema-decay 0.999 " in card
    assert metrics["mse_weight"] == 4.0
    assert "L1 + 4 * mean squared error + 0.5 * L1" in card and " --mse-weight 4" in card
    assert vae.info["family"] == "demo" and "not SD-compatible" in vae.info["description"]
    assert vae.dtype == torch.float32 and metrics["storage"].startswith("fp16")
    with torch.no_grad():
        out = vae.decode(torch.zeros(1, vae.config.latent_channels, 4, 4)).sample
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    # the card measures the held-out photos at issue 17's sizes, and --remeasure (the evaluation
    # rerun on the file in OUT/vae/) gives the same numbers and the same card when nothing changed
    assert sorted(metrics["heldout_sides"]) == ["256", "512"]
    assert "At issue 17's sizes" in card
    proc = subprocess.run([sys.executable, str(SCRIPTS / "train_small_vae.py"), "--remeasure", "--out", str(tmp_path),
                           "--threads", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert again["heldout"] == metrics["heldout"] and again["heldout_sides"] == metrics["heldout_sides"]
    assert (tmp_path / "MODEL_CARD.md").read_text() == card


def test_deepen_adds_identity_resnets_and_refuses_other_models():
    """--layers-per-block N with a shallower --init: the deeper model must start from exactly the
    shallower one's outputs (else a fine-tune starts by forgetting), and a model whose widths
    differ must be refused rather than half-copied."""
    tsv = _trainer()
    small, src, dst = _small_pair(layers_per_block=2)
    added = tsv.deepen(src, dst)
    assert added == ["decoder.up_blocks.0.resnets.2", "decoder.up_blocks.1.resnets.2",
                     "encoder.down_blocks.0.resnets.1", "encoder.down_blocks.1.resnets.1"]
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z_src, z_dst = src.encode(x).latent_dist.mode(), dst.encode(x).latent_dist.mode()
        assert torch.equal(z_src, z_dst)
        assert torch.equal(src.decode(z_src).sample, dst.decode(z_dst).sample)
    # the added resnets are trainable blocks, not frozen zeros: their conv1 kept its random init
    assert dst.get_submodule(added[0]).conv1.weight.abs().sum() > 0
    wider = AutoencoderKL(**dict(small, block_out_channels=(16, 32), layers_per_block=2))
    with pytest.raises(ValueError, match=r"cannot deepen: .*\(the widths must match\)"):
        tsv.deepen(src, wider)
    with pytest.raises(ValueError, match="cannot deepen: .* not in the deeper model"):
        tsv.deepen(dst, src)


def test_widen_latent_starts_from_the_narrower_models_outputs_and_can_learn_the_new_channels():
    """--latent-channels N with a narrower --init: the wider model must decode exactly what the
    narrower one does (the old channels' moments unchanged, the new ones unread by the decoder), the
    new channels' noise must start at the old ones' level, and their path into the decoder must get
    a gradient (a zero column whose gradient is zero would never learn)."""
    tsv = _trainer()
    _, src, dst = _small_pair(latent_channels=8)
    assert tsv.widen_latent(src, dst) == 4
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        p_src, p_dst = src.encode(x).latent_dist, dst.encode(x).latent_dist
        torch.testing.assert_close(p_dst.mean[:, :4], p_src.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(p_dst.logvar[:, :4], p_src.logvar, rtol=0, atol=1e-5)
        # the new channels carry the image (a random projection of the encoder's features) ...
        assert p_dst.mean[:, 4:].std() > 0.1 * p_src.mean.std()
        # ... with the old channels' mean log-variance as their noise level
        torch.testing.assert_close(p_dst.logvar[:, 4:], p_src.logvar.mean(1, keepdim=True).expand(-1, 4, -1, -1),
                                   rtol=0, atol=1e-5)
        z = torch.randn(1, 8, 4, 4)
        z_old = z.clone()
        z_old[:, 4:] = torch.randn(1, 4, 4, 4)  # whatever the new channels hold, the decoder ignores it
        torch.testing.assert_close(dst.decode(z).sample, src.decode(z[:, :4]).sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(dst.decode(z_old).sample, dst.decode(z).sample, rtol=0, atol=0)
    dst.train()
    out = dst(x, sample_posterior=False).sample
    out.square().mean().backward()
    assert dst.decoder.conv_in.weight.grad[:, 4:].abs().sum() > 0
    # the elements new_latent_elements() marks (they step faster) are exactly those not copied from src
    masks = tsv.new_latent_elements(dst, 4)
    have = dict(src.named_parameters())
    moments = list(range(4)) + list(range(8, 12))  # where src's means and log-variances sit in dst
    copied = {"encoder.conv_out.weight": lambda t: t[moments], "encoder.conv_out.bias": lambda t: t[moments],
              "quant_conv.weight": lambda t: t[moments][:, moments], "quant_conv.bias": lambda t: t[moments],
              "post_quant_conv.weight": lambda t: t[:4, :4], "post_quant_conv.bias": lambda t: t[:4],
              "decoder.conv_in.weight": lambda t: t[:, :4]}
    assert set(masks) == set(copied)
    for name, p in dst.named_parameters():
        if name in masks:
            assert masks[name].shape == p.shape and masks[name].dtype == torch.bool
            assert not copied[name](masks[name]).any() and masks[name].sum() == p.numel() - have[name].numel()
            assert torch.equal(copied[name](p.detach()), have[name].detach())
    with pytest.raises(ValueError, match="cannot widen the latent from 8 to 4"):
        tsv.widen_latent(dst, src)


def test_widen_width_starts_from_the_narrower_models_outputs_and_can_learn_the_new_channels():
    """--groups N with an --init of fewer groups: every level widens in proportion (each group keeps
    its channel count), and the wider model must compute what the narrower one does: the old groups
    hold exactly the old channels, the old rows read no new channel, and the attention's 1/sqrt(C)
    score scale is made up for in its query rows. The new channels must be live (random, with a
    gradient), and copied_elements() must mark exactly the elements that were not copied."""
    tsv = _trainer()
    small, src, dst = _small_pair(norm_num_groups=12, block_out_channels=(24, 24))
    shapes = {name: p.shape for name, p in src.named_parameters()}
    assert tsv.widen_width(src, dst) == 16
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        p_src, p_dst = src.encode(x).latent_dist, dst.encode(x).latent_dist
        torch.testing.assert_close(p_dst.mean, p_src.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(p_dst.logvar, p_src.logvar, rtol=0, atol=1e-5)
        z = torch.randn(1, 4, 4, 4)
        torch.testing.assert_close(dst.decode(z).sample, src.decode(z).sample, rtol=0, atol=1e-5)
        # the new channels compute something (the decoder's new rows kept their random weights)
        feats = {}
        dst.decoder.up_blocks[-1].register_forward_hook(lambda mod, inp, out: feats.update(top=out))
        dst.decode(z)
        assert feats["top"].shape[1] == 24 and feats["top"][:, 16:].std() > 0.01
    dst.train()
    out = dst(x, sample_posterior=False).sample
    out.square().mean().backward()
    assert dst.decoder.conv_out.weight.grad[:, 16:].abs().sum() > 0  # the old output starts to read them
    assert dst.decoder.mid_block.attentions[0].to_q.weight.grad[16:].abs().sum() > 0
    have = dict(src.named_parameters())
    masks = tsv.copied_elements(shapes, dst)
    assert set(masks) == {name for name, p in dst.named_parameters() if p.shape != shapes[name]}
    for name, p in dst.named_parameters():
        if name in masks:
            m = masks[name]
            block = tuple(slice(0, n) for n in shapes[name])
            assert m.dtype == torch.bool and m.shape == p.shape
            assert not m[block].any() and m.sum() == p.numel() - have[name].numel()
            if ".to_q." not in name:  # the query rows were rescaled, the rest copied as they were
                assert torch.equal(p.detach()[block], have[name].detach())
    # an earlier widening's masks ride along inside the copied block
    earlier = {"decoder.conv_in.weight": torch.ones(shapes["decoder.conv_in.weight"], dtype=torch.bool)}
    both = tsv.copied_elements(shapes, dst, earlier)
    assert both["decoder.conv_in.weight"].all()
    with pytest.raises(ValueError, match="cannot widen the widths from 12 to 8 groups"):
        tsv.widen_width(dst, src)
    odd = AutoencoderKL(**dict(small, norm_num_groups=12, block_out_channels=(24, 36)))
    with pytest.raises(ValueError, match=r"12 groups of \[2, 2\] channels per level are \(24, 24\)"):
        tsv.widen_width(src, odd)
    deeper = AutoencoderKL(**dict(small, norm_num_groups=12, block_out_channels=(24, 24), layers_per_block=2))
    with pytest.raises(ValueError, match="layers_per_block differs"):
        tsv.widen_width(src, deeper)


def test_the_card_says_when_a_fine_tune_widened_the_latent():
    tsv = _trainer()

    m = {"init": "demo6-f8.safetensors", "init_git": "f33a875", "config": {"latent_channels": 16},
         "init_latent_channels": 4, "new_lr_scale": 20.0}
    text = tsv.init_text(m)
    assert "with 4 latent channels, widened here to 16 (`--latent-channels 16`)" in text
    assert "stepped 20x faster" in text and "git f33a875" in text
    same = tsv.init_text(dict(m, init_latent_channels=16))
    assert "widened" not in same and "(the same architecture;" in same
    assert tsv.init_text({"config": {"latent_channels": 4}}) == "From random weights. "
    both = tsv.init_text(dict(m, init_groups=16, config={"latent_channels": 16, "norm_num_groups": 20,
                                                          "block_out_channels": [40, 60, 80, 80]}))
    assert ("with 4 latent channels, widened here to 16 (`--latent-channels 16`) and 16 GroupNorm groups and "
            "widths [32, 48, 64, 64], widened here to 20 groups and widths [40, 60, 80, 80] (`--groups 20`") in both
    assert "the new channels started unread by the old ones" in both


def test_global_colour_term_costs_a_uniform_cast_and_is_off_by_default():
    """--global-colour-weight adds the L1 of each crop's mean colour: zero for a perfect
    reconstruction, the size of the cast for a uniformly tinted one, and off unless asked."""
    tsv = _trainer()

    assert tsv.TrainConfig().global_colour_weight == 0.0
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    cast = torch.tensor([0.0, -0.1, 0.0]).view(1, 3, 1, 1)  # a green deficit of 0.1 everywhere
    diff = (tsv.image_colour(x + cast) - tsv.image_colour(x)).abs()
    assert diff.shape == (2, 5)
    torch.testing.assert_close(diff[:, :3], cast.abs().view(1, 3).expand(2, 3))
    # YIQ chroma of a pure green deficit: I = -0.274 * -0.1, Q = -0.523 * -0.1
    torch.testing.assert_close(diff[:, 3:], torch.tensor([[0.0274, 0.0523]] * 2), rtol=0, atol=1e-6)
    assert (tsv.image_colour(x) - tsv.image_colour(x.clone())).abs().max() == 0


def test_mse_weight_adds_exactly_that_multiple_of_the_squared_error_and_is_off_by_default():
    """--mse-weight w adds w * mean((y - x)^2) to the loss of the same reconstruction (the same
    posterior sample), nothing else; the default adds nothing (the smoke test checks the card says so)."""
    tsv = _trainer()
    assert tsv.TrainConfig().mse_weight == 0.0
    _, vae, _ = _small_pair()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    base = tsv.TrainConfig(bf16=False)

    def loss_of(cfg):
        with torch.no_grad():
            return tsv.vae_loss(vae, x, cfg, torch.Generator().manual_seed(3))[0]

    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(3))
        sq = (vae.decode(z).sample - x).square().mean()
    plain, weighted = loss_of(base), loss_of(dataclasses.replace(base, mse_weight=4.0))
    assert sq > 0
    torch.testing.assert_close(weighted - plain, 4.0 * sq, rtol=1e-5, atol=0)


def test_card_training_span_counts_every_run_of_the_lineage():
    """The card's Limits line sums the lineage from FINE_TUNES: it must name each earlier fine-tune
    and this run, and say only what it knows for a commit outside the table."""
    tsv = _trainer()

    m = {"wall_s": 6000.5, "init": "demo4-f8.safetensors", "init_git": "894ae08"}
    assert tsv._training_span(m) == "18 min from scratch, then four fine-tunes of 30, 95, 88 and 100 min"
    assert tsv._training_span({**m, "init_git": "2d26bec"}) == "18 min from scratch, then one fine-tune of 100 min"
    assert tsv._training_span({**m, "init_git": "0000000"}) == "a 100 min fine-tune of the model at git 0000000"
    assert tsv._training_span({**m, "init": None}) == "100 min from random weights"
    # the shipped card was written by this code, for its own lineage
    shipped = json.loads((ROOT / "models" / "metrics.json").read_text())
    assert tsv._training_span(shipped) in (ROOT / "models" / "MODEL_CARD.md").read_text().replace("\n  ", " ")


def test_card_lineage_tells_every_earlier_model_once_in_order_and_the_shipped_card_matches():
    """A card fine-tuned from LINEAGE[i] tells the summaries of LINEAGE[1..i] in order, each once,
    then its own run's note; the shipped card's lineage paragraph is what this code writes for it."""
    tsv = _trainer()
    flat = lambda text: " ".join(text.split())  # the card wraps lines; Markdown reads them as one
    gits = [s.git for s in tsv.LINEAGE]
    assert len(set(gits)) == len(gits) and set(tsv.RUN_NOTES) <= set(gits)
    for i, shipped in enumerate(tsv.LINEAGE):
        text = tsv.history(shipped.git)
        if shipped.git not in tsv.RUN_NOTES:
            assert text == ""
            continue
        at = [text.index(s.summary) for s in tsv.LINEAGE[1:i + 1]]
        assert at == sorted(at) and all(text.count(s.summary) == 1 for s in tsv.LINEAGE[1:i + 1])
        assert text.endswith(tsv.RUN_NOTES[shipped.git])
        assert not any(s.summary in text for s in tsv.LINEAGE[i + 1:])
        assert tsv.before_title(shipped.git) == shipped.title
    assert tsv.history("0000000") == "" and tsv.before_title("0000000") == "The model this one replaces"
    shipped = json.loads((ROOT / "models" / "metrics.json").read_text())
    card = flat((ROOT / "models" / "MODEL_CARD.md").read_text())
    assert flat(tsv.history(shipped["init_git"])) in card
    assert tsv.before_title(shipped["init_git"]) in card


def test_jitter_share_sets_how_many_colour_crops_are_recoloured_and_the_card_says_so(monkeypatch):
    """--jitter-share: the share of colour crops that get the colour jitter (1: every one, so no
    crop shows its photo's own colours); 0 keeps the old defaults. The card's sentence follows."""
    tsv = _trainer()

    photo = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)  # one colour "photo"
    monkeypatch.setattr(tsv.images, "load_rgb", lambda name: photo)
    for share, full_hue, expected in ((1.0, True, 1.0), (0.0, True, 0.5), (0.0, False, 0.25), (0.8, False, 0.8)):
        sampler = tsv.CropSampler(["photo"], np.random.default_rng(1), 16, full_hue, share)
        calls = []
        monkeypatch.setattr(sampler, "recolour", lambda x, colour: calls.append(colour) or x)
        sampler.batch(16, 400)
        assert abs(len(calls) / 400 - expected) < 0.07, (share, full_hue, len(calls))
    assert "all of the colour crops" in tsv.jitter_text({"full_hue": True, "jitter_share": 1.0})
    assert "half of the colour crops" in tsv.jitter_text({"full_hue": True})
    assert "a quarter of the colour crops" in tsv.jitter_text({"full_hue": False, "jitter_share": 0.0})
    assert "75% of the colour crops" in tsv.jitter_text({"full_hue": True, "jitter_share": 0.75})


def test_average_from_ships_the_mean_of_the_late_ema_snapshots(tmp_path, monkeypatch):
    """--average-from P: the weights train() returns are the mean of the EMA snapshots taken at the
    evaluations with progress >= P and of the EMA at the last step; earlier snapshots are left out."""
    tsv = _trainer()

    saved = []  # (step, EMA state) at each evaluation
    monkeypatch.setattr(tsv, "save_checkpoint", lambda vae, path, extra=None: saved.append(
        (extra["step"], {k: v.detach().clone() for k, v in vae.state_dict().items()})))
    monkeypatch.setattr(tsv, "evaluate", lambda vae, heldout: {"x": {"psnr": 0.0, "colour_shift": [0.0] * 3}})
    cfg = tsv.TrainConfig(steps=6, minutes=1e6, threads=1, debian=False, phases=((0.0, 32, 1),), eval_every=1,
                          eval_max_side=64, average_from=0.5, lr=1e-3, ema_decay=0.5)
    vae, steps, _wall, _rows, averaged = tsv.train(cfg, tmp_path, tmp_path / "log.csv")
    assert steps == 6 and [s for s, _ in saved] == [1, 2, 3, 4, 5, 6]
    late = [state for step, state in saved if step / 6 >= 0.5]  # steps 3-6; the last EMA is step 6's again
    assert averaged == len(late) + 1 == 5
    expected = {k: (sum(st[k].double() for st in late) + saved[-1][1][k].double()) / averaged for k in late[0]}
    got = vae.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k].double(), v, rtol=0, atol=1e-6)
    # the average is not simply the last EMA: the snapshots differ
    assert any((late[0][k] - saved[-1][1][k]).abs().max() > 0 for k in late[0])


def test_decoder_limit_probe_lowers_the_loss_it_optimises():
    """scripts/probe_decoder_limit.py optimises the latent of a photo with the decoder fixed: its
    reconstruction must come out closer to the photo (in L1, the loss it descends) than the encoder's."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    import probe_decoder_limit as probe

    model = copy.deepcopy(load_shipped_vae()).requires_grad_(False)  # the cached one must not change
    x = _to_x(probe.load("chelsea", 96))
    torch.manual_seed(0)
    y0, y, l1_before, l1_after = probe.probe(model, x, steps=10, lr=0.02)
    assert y.shape == y0.shape == x.shape
    assert l1_after < l1_before, (l1_before, l1_after)


def test_error_spectrum_bands_sum_to_the_mean_square_and_place_a_stripe_by_its_period():
    """scripts/error_spectrum.py: the bands cover every frequency once (Parseval), and a stripe of
    period 6 px (1/6 cycles/px) lands in the 1/8-1/4 band, one of period 40 px in the lowest."""
    _trainer()  # puts scripts/ on the path
    import error_spectrum as es

    rng = np.random.default_rng(0)
    noise = rng.normal(size=(40, 56, 3))
    assert sum(es.band_energy(noise)) == pytest.approx(float((noise ** 2).mean()), rel=1e-12)
    cols = np.arange(120)
    for period, band in ((6, (1 / 8, 1 / 4)), (40, (0, 1 / 32))):
        stripe = np.repeat(np.sin(2 * np.pi * cols / period)[None, :, None], 48, axis=0).repeat(3, axis=2)
        energy = dict(zip(es.BANDS, es.band_energy(stripe)))
        assert energy[band] == pytest.approx(0.5, rel=1e-9)  # a unit sine's mean square
        assert sum(v for b, v in energy.items() if b != band) < 1e-20
