"""FlaxAutoencoderKL against diffusers 0.39.0's FlaxAutoencoderKL (the last diffusers with one), run in
the torch-free reference venv that scripts/setup_flax.sh makes, as a subprocess exchanging .npz files:
the same params (our file read by diffusers, diffusers' file read by us), outputs and init_weights shapes.

Only the SD layout is compared: diffusers' Flax class always had quant convs and mid attention and
ignored act_fn, so the FLUX-style and attention-free layouts have no diffusers Flax counterpart.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from flax_helpers import as_torch, assert_close_fp32, compiled, image, require_jax

require_jax()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from test_parity_torch import rel_rms  # noqa: E402
from vae_core.flax import FlaxAutoencoderKL  # noqa: E402
from vae_core.flax.convert import flatten  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REF_PYTHON = Path(os.environ.get("FLAXREF_PYTHON", ROOT / ".venv-flaxref" / "bin" / "python"))
WORKER = Path(__file__).resolve().parent / "flaxref_worker.py"
SEED = 7


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    if not REF_PYTHON.is_file():
        pytest.skip(f"the diffusers 0.39 Flax reference venv is missing ({REF_PYTHON}): run scripts/setup_flax.sh "
                    "(scripts/test.sh does), or set FLAXREF_PYTHON")
    c = compiled("sd_layout")
    d = tmp_path_factory.mktemp("flaxref")
    c.model.save_pretrained(d / "ours", c.params)
    x = jnp.asarray(image().numpy())
    z = c.encode(c.params, x).latent_dist.mean
    np.savez(d / "inputs.npz", x=np.asarray(x), z=np.asarray(z))
    jobs = [
        {"folder": str(d / "ours"), "inputs": str(d / "inputs.npz"), "dtype": "float32", "seed": SEED,
         "out": str(d / "fp32.npz"), "resave": str(d / "theirs")},
        {"folder": str(d / "ours"), "inputs": str(d / "inputs.npz"), "dtype": "bfloat16", "seed": None,
         "out": str(d / "bf16.npz"), "resave": None},
    ]
    (d / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([str(REF_PYTHON), str(WORKER), str(d / "jobs.json")], cwd=str(d), env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the reference worker failed:\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"dir": d, "x": x, "z": z, "report": report, "fp32": dict(np.load(d / "fp32.npz")),
            "bf16": dict(np.load(d / "bf16.npz")),
            "shapes": json.loads(Path(str(d / "fp32.npz") + ".shapes.json").read_text())}


def test_reference_ran_without_torch(reference):
    assert reference["report"] == {"torch_importable": False, "jobs": 2}


def test_same_init_weights_shapes(reference):
    model = compiled("sd_layout").model
    ours = {"/".join(k): list(v.shape) for k, v in flatten(jax.eval_shape(model.init_weights,
                                                                          jax.random.PRNGKey(0))).items()}
    assert ours == reference["shapes"]


def test_same_outputs_fp32(reference):
    c, ref = compiled("sd_layout"), reference["fp32"]
    d = c.encode(c.params, reference["x"]).latent_dist
    for field in ("mean", "logvar", "std", "var"):
        assert_close_fp32(as_torch(getattr(d, field)), as_torch(ref[field]))
    assert_close_fp32(as_torch(c.decode(c.params, reference["z"])), as_torch(ref["decode"]))


def test_same_seeded_sample_and_call(reference):
    c, ref = compiled("sd_layout"), reference["fp32"]
    d = c.encode(c.params, reference["x"]).latent_dist
    assert_close_fp32(as_torch(d.sample(jax.random.PRNGKey(SEED))), as_torch(ref["sample"]))
    ours = c.call_sampled(c.params, reference["x"], jax.random.PRNGKey(SEED))
    assert_close_fp32(as_torch(ours), as_torch(ref["call_sampled"]))


def test_bf16_is_as_close_to_fp32_as_diffusers_bf16(reference):
    c, ref32, ref16 = compiled("sd_layout", "bfloat16"), reference["fp32"], reference["bf16"]
    mean = np.asarray(c.encode(c.params, reference["x"]).latent_dist.mean, np.float32)
    # the encoder runs the same bf16 ops as diffusers' (no folded upsampling): one bf16 ulp apart at most
    scale = float(np.abs(ref16["mean"]).max())
    assert float(np.abs(mean - ref16["mean"]).max()) <= 2.0 ** -8 * scale
    # the decoder's upsampling convs are folded (in fp32, then cast), so bf16 rounds elsewhere than in
    # diffusers: hold our bf16 error against fp32 to diffusers' own bf16 error on the same weights
    ours = rel_rms(c.decode(c.params, reference["z"]), ref32["decode"])
    theirs = rel_rms(ref16["decode"], ref32["decode"])
    assert 0.0 < ours <= 1.25 * theirs, (ours, theirs)


def test_diffusers_written_file_loads_with_the_same_params(reference):
    c = compiled("sd_layout")
    model, params = FlaxAutoencoderKL.from_pretrained(reference["dir"] / "theirs")
    assert model.config == c.model.config
    ours, theirs = flatten(c.params), flatten(params)
    assert set(ours) == set(theirs)
    for k in ours:
        assert np.array_equal(np.asarray(ours[k]), np.asarray(theirs[k])), "/".join(k)
