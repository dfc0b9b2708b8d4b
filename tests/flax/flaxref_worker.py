"""Runs diffusers 0.39's FlaxAutoencoderKL in the reference venv (.venv-flaxref, no torch) for
tests/flax/test_diffusers_flax.py; not a test module, and it imports nothing from this repository.

    python flaxref_worker.py JOB.json     # writes each job's outputs to its "out" .npz
A job: {"folder": saved by our save_pretrained, "inputs": .npz with x and z, "dtype": "float32"|"bfloat16",
"seed": int, "out": .npz, "resave": folder for diffusers' own save_pretrained of the params it loaded}.
"""
from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from diffusers import FlaxAutoencoderKL
from flax.traverse_util import flatten_dict


def run(job: dict) -> None:
    dtype = getattr(jnp, job["dtype"])
    model, params = FlaxAutoencoderKL.from_pretrained(job["folder"], dtype=dtype)
    data = np.load(job["inputs"])
    x, z = jnp.asarray(data["x"]), jnp.asarray(data["z"])

    @jax.jit
    def encode(p, x):
        d = model.apply({"params": p}, x, method=model.encode).latent_dist
        return d.mean, d.logvar, d.std, d.var

    @jax.jit
    def decode(p, z):
        return model.apply({"params": p}, z, method=model.decode).sample

    mean, logvar, std, var = encode(params, x)
    out = {"mean": mean, "logvar": logvar, "std": std, "var": var, "decode": decode(params, z)}
    if job.get("seed") is not None:
        # the posterior's seeded sample, drawn by diffusers' own FlaxDiagonalGaussianDistribution
        from diffusers.models.vae_flax import FlaxDiagonalGaussianDistribution

        moments = jnp.concatenate([mean, logvar], axis=-1)
        out["sample"] = FlaxDiagonalGaussianDistribution(moments).sample(jax.random.PRNGKey(job["seed"]))
        call = jax.jit(lambda p, x, key: model.apply({"params": p}, x, sample_posterior=True,
                                                     rngs={"gaussian": key}).sample)
        out["call_sampled"] = call(params, x, jax.random.PRNGKey(job["seed"]))
    shapes = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))
    out_shapes = {"/".join(k): list(v.shape) for k, v in flatten_dict(shapes).items()}
    np.savez(job["out"], **{k: np.asarray(v, dtype=np.float32) for k, v in out.items()})
    with open(job["out"] + ".shapes.json", "w") as f:
        json.dump(out_shapes, f)
    if job.get("resave"):
        model.save_pretrained(job["resave"], params=params)


def main() -> None:
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    for job in jobs:
        run(job)
    import importlib.util

    print(json.dumps({"torch_importable": importlib.util.find_spec("torch") is not None,
                      "jobs": len(jobs)}))


if __name__ == "__main__":
    main()
