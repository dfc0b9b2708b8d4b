"""Property-based tests (hypothesis) of the core: key conversion round-trips, config inference from
shapes, exact tiling equal to untiled for random sizes and tiles, and loaders that raise only their
documented errors (VAELoadError, a ValueError naming the file) on mutated files.

Example counts are small (2-core CI); hypothesis' database is off so runs are reproducible from the seed
it prints on failure."""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vae_core import AutoencoderKL, convert  # noqa: E402
from vae_core.loading import VAELoadError  # noqa: E402

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# -- random tiny architectures ---------------------------------------------------------------------


@st.composite
def configs(draw):
    levels = draw(st.integers(1, 4))
    widths = tuple(draw(st.lists(st.sampled_from([8, 16, 24, 32]), min_size=levels, max_size=levels)))
    # the group count shape inference recovers (largest divisor of the widths' gcd up to 32); the
    # group count leaves no trace in the shapes, so only this one can round-trip through a bare file
    g = 0
    for w in widths:
        g = math.gcd(g, w)
    groups = 32 if g % 32 == 0 else max(d for d in range(1, 33) if g % d == 0)
    return dict(
        block_out_channels=widths,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=draw(st.integers(1, 2)),
        latent_channels=draw(st.sampled_from([1, 4, 16])),
        in_channels=draw(st.sampled_from([1, 3, 4])),
        out_channels=draw(st.sampled_from([1, 3, 4])),
        norm_num_groups=groups,
        use_quant_conv=draw(st.booleans()),
        use_post_quant_conv=draw(st.booleans()),
        mid_block_add_attention=draw(st.booleans()),
    )


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(**cfg).eval()


@settings(max_examples=25, **SETTINGS)
@given(cfg=configs(), linear_attention=st.booleans())
def test_ldm_diffusers_round_trip_is_lossless(cfg, linear_attention):
    sd = _model(cfg).state_dict()
    ldm = convert.diffusers_to_ldm(sd)
    assert convert.is_ldm_layout(ldm) and not convert.is_diffusers_layout(ldm)
    if linear_attention and cfg["mid_block_add_attention"]:
        for k in [k for k in ldm if ".attn_1." in k and k.endswith("weight") and ldm[k].dim() == 4]:
            ldm[k] = ldm[k][:, :, 0, 0]  # some exports store the projections as linear weights
    back = convert.ldm_to_diffusers(ldm)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k].reshape(v.shape), v), k
        assert back[k].shape == v.shape, k


@settings(max_examples=25, **SETTINGS)
@given(cfg=configs(), ldm=st.booleans())
def test_config_inferred_from_shapes_is_the_config_that_made_them(cfg, ldm):
    model = _model(cfg)
    sd = model.state_dict()
    dsd, layout = convert.to_diffusers_layout(convert.diffusers_to_ldm(sd) if ldm else sd)
    assert layout == ("ldm" if ldm else "diffusers")
    inferred = convert.infer_config(dsd)
    for field, value in cfg.items():
        assert tuple(getattr(inferred, field)) == tuple(value) if isinstance(value, tuple) \
            else getattr(inferred, field) == value, field


# -- exact tiling ----------------------------------------------------------------------------------

TILE_CFG = dict(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, layers_per_block=1,
                latent_channels=4)


def _tiling_model():
    model = _model(TILE_CFG)
    # non-trivial GroupNorm affines: wrong pooled statistics cannot hide behind gamma=1, beta=0
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.data = 1.0 + 0.3 * torch.randn(m.weight.shape, generator=g)
            m.bias.data = 0.3 * torch.randn(m.bias.shape, generator=g)
    return model


@pytest.fixture(scope="module")
def tiling_model():
    return _tiling_model()


def _close(out, ref):
    # the tolerance of tests/core/test_exact_tiling.py: fp32 through ~30 layers with statistics pooled
    # in another order (observed ~1e-6 of the output scale); any tile seam is ~1e-1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * max(1.0, ref.abs().max().item()))


@settings(max_examples=12, **SETTINGS)
@given(h=st.integers(2, 14), w=st.integers(2, 14), batch=st.integers(1, 2), tile=st.integers(2, 12),
       seed=st.integers(0, 2**16))
def test_exact_tiled_decode_equals_untiled(tiling_model, h, w, batch, tile, seed):
    from vae_core.exact_tiling import exact_tiled_decode

    tile_px = 8 * tile
    z = torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = tiling_model._pixels(z)
    calls = []
    out = exact_tiled_decode(tiling_model, z, tile_size=tile_px, callback=lambda d, t: calls.append((d, t)))
    assert out.shape == ref.shape
    if max(h, w) * 8 > tile_px:
        assert len(calls) > 1, "more than one tile must have run"
    _close(out, ref)


@settings(max_examples=10, **SETTINGS)
@given(h=st.integers(8, 96), w=st.integers(8, 96), tile=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_exact_tiled_encode_equals_untiled(tiling_model, h, w, tile, seed):
    from vae_core.exact_tiling import exact_tiled_encode

    tile_px = 8 * tile
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        ref = tiling_model._moments(x)
    calls = []
    out = exact_tiled_encode(tiling_model, x, tile_size=tile_px, callback=lambda d, t: calls.append((d, t)))
    assert out.shape == ref.shape
    if max(h, w) > tile_px:
        assert len(calls) > 1, "more than one tile must have run"
    _close(out, ref)


# -- loaders on mutated files ------------------------------------------------------------------------

_FILES = {}


def _good_bytes(kind: str) -> bytes:
    """A loadable tiny VAE as .safetensors (LDM keys, config in metadata) or a torch zip checkpoint."""
    if kind not in _FILES:
        cfg = dict(TILE_CFG, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2)
        model = _model(cfg)
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "v"
            if kind == "safetensors":
                model.save_single_file(p)
            else:
                torch.save({"state_dict": convert.diffusers_to_ldm(model.state_dict())}, str(p))
            _FILES[kind] = p.read_bytes()
    return _FILES[kind]


def _header_edit(data: bytes, draw) -> bytes:
    """Edit the JSON header of a safetensors file and rewrite its length prefix."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = draw(st.sampled_from(sorted(header)))
    edit = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "metadata", "type"]))
    entry = header[key]
    if key == "__metadata__" or edit == "metadata":
        header["__metadata__"] = {"vae_core.config": draw(st.sampled_from(
            ["{", "[]", "{\"block_out_channels\": []}", "{\"latent_channels\": -3}", "null", "{\"x\": 1}"]))}
    elif edit == "dtype":
        entry["dtype"] = draw(st.sampled_from(["I8", "I32", "U8", "BOOL", "F64", "F8_E4M3", "XYZ", 7]))
    elif edit == "shape":
        if entry["shape"]:
            i = draw(st.integers(0, len(entry["shape"]) - 1))
            entry["shape"][i] = draw(st.sampled_from([0, 1, -1, entry["shape"][i] + 1, 2**40, "a"]))
        else:
            entry["shape"] = [draw(st.integers(0, 4))]
    elif edit == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = draw(st.sampled_from([[b, a], [a, b + 4], [a + 4, b], [0, 2**62], [a, a]]))
    elif edit == "drop":
        del header[key]
    else:
        header[key] = draw(st.sampled_from([[], "x", None, 3]))
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


class Mutated:
    """A mutated file; a short repr, so a failing example prints readably (the bytes are ~60 KB)."""

    def __init__(self, kind: str, how: str, data: bytes):
        self.kind, self.how, self.data = kind, how, data

    def __repr__(self) -> str:
        import hashlib

        return f"Mutated({self.kind}, {self.how}, {len(self.data)} bytes, sha1 {hashlib.sha1(self.data).hexdigest()[:12]})"


@st.composite
def mutated(draw):
    kind = draw(st.sampled_from(["safetensors", "safetensors", "zip"]))
    data = bytearray(_good_bytes(kind))
    how = draw(st.sampled_from(["flip", "truncate", "header"] if kind == "safetensors" else ["flip", "truncate"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            # mostly in the first KiB (headers, zip directory at the end is reached by the random draws too)
            i = draw(st.one_of(st.integers(0, min(1023, len(data) - 1)), st.integers(0, len(data) - 1)))
            data[i] ^= 1 << draw(st.integers(0, 7))
        return Mutated(kind, how, bytes(data))
    if how == "truncate":
        return Mutated(kind, how, bytes(data[: draw(st.integers(0, len(data) - 1))]))
    return Mutated(kind, how, _header_edit(bytes(data), draw))


@settings(max_examples=120, **SETTINGS)
@given(case=mutated())
def test_loaders_raise_only_documented_errors_on_mutated_files(case):
    kind, how, data = case.kind, case.how, case.data
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("mutated.safetensors" if kind == "safetensors" else "mutated.ckpt")
        path.write_bytes(data)
        try:
            model = AutoencoderKL.from_single_file(path)
        except VAELoadError as err:
            assert "mutated." in str(err), f"the error must name the file: {err}"
            return
        except ValueError as err:  # the documented parent type; it must still name the file
            assert "mutated." in str(err), f"{type(err).__name__} without the file name ({how}): {err}"
            return
        # a flip inside tensor data can leave a loadable file; it must then be a working VAE
        assert all(torch.isfinite(p).all() for p in model.parameters())
