"""Resource attacks against the real server (issue 13), in the session's one server: each small hostile
file ends in a clear error within time and memory bounds while the server's address space is capped
(a regression fails with an allocation error instead of taking GBs from the shared machine), the
server keeps serving and the next good prompt runs; /history stays strict JSON; a file rewritten in
place during loads never kills the server (SIGBUS); the cache sees a `cp -p` rewrite."""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

HOSTILE = Path(__file__).resolve().parents[1] / "hostile"
if str(HOSTILE) not in sys.path:
    sys.path.insert(0, str(HOSTILE))

import hostile_files as hf  # noqa: E402
from bounds import ServerWatch  # noqa: E402

TIMEOUT = 240
GOOD = "akl_bounds_good.safetensors"


@pytest.fixture(scope="module")
def server(comfy_server):
    hf.write_good(comfy_server.vae_dir / GOOD, seed=41)
    return comfy_server


def _graph(vae_name: str) -> dict:
    return {
        "1": {"class_type": "AutoencoderKLLoader", "inputs": {"vae_name": vae_name}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "AutoencoderKLDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def _run(server, vae_name: str) -> dict:
    pid = server.post_prompt(_graph(vae_name))["prompt_id"]
    entry = server.wait_for(pid, timeout=TIMEOUT)
    entry["prompt_id"] = pid
    return entry


def _error(entry: dict) -> str:
    assert entry["status"]["status_str"] == "error", entry["status"]
    return next(m[1]["exception_message"] for m in entry["status"]["messages"] if m[0] == "execution_error")


def _good_prompt_runs(server) -> dict:
    entry = _run(server, GOOD)
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry["outputs"]["1"]["akl_card"][0]


def _strict_json(raw: bytes):
    """Parse as the browser's JSON.parse does: NaN and Infinity are errors."""
    def refuse(name):
        raise ValueError(f"{name} in the response: JSON.parse would fail")

    return json.loads(raw, parse_constant=refuse)


ATTACKS = {
    "stride0.ckpt": (hf.stride0_ckpt, ("stride-0 view",)),
    "overlap.ckpt": (hf.overlap_ckpt, ("overlapping view",)),
    "zip_bomb.ckpt": (hf.zip_bomb_ckpt, ("compressed",)),
    "depth20000.safetensors": (lambda p: hf.with_config(p, layers_per_block=20000), ("layers_per_block=20000",)),
    "many_keys.safetensors": (hf.many_resnets, ("layers_per_block=20001",)),
    "width4096.safetensors": (lambda p: hf.with_config(p, block_out_channels=[4096] * 4, norm_num_groups=32),
                              ("asks for more than it holds",)),
    "latent1e6.safetensors": (lambda p: hf.with_config(p, latent_channels=1e6), ("latent_channels=1000000.0",)),
    "groups0.safetensors": (lambda p: hf.with_config(p, norm_num_groups=0), ("norm_num_groups=0",)),
    "act_fn5.safetensors": (lambda p: hf.with_config(p, act_fn=5), ("act_fn=5",)),
    "sample_inf.safetensors": (lambda p: hf.with_config(p, sample_size=math.inf), ("sample_size=inf",)),
    "scaling_abc.safetensors": (lambda p: hf.with_config(p, scaling_factor="abc"), ("scaling_factor='abc'",)),
    "deep_json.safetensors": (hf.deep_json_config, ("nested too deeply",)),
    "zero_dim.safetensors": (hf.zero_dim_conv, ("expected 4-D",)),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", sorted(ATTACKS))
def test_a_small_hostile_file_is_a_bounded_clear_error_and_the_server_keeps_serving(server, kind):
    writer, words = ATTACKS[kind]
    name = f"akl_bounds_{kind}"
    writer(server.vae_dir / name)
    with ServerWatch(server.pid) as cost:
        msg = _error(_run(server, name))
    cost.check(f"server: {name}")
    assert name in msg and all(w in msg for w in words), msg
    assert len(msg) < 3000, len(msg)
    _good_prompt_runs(server)


@pytest.mark.timeout(300)
def test_nan_in_metadata_is_an_error_and_history_stays_strict_json(server):
    name = "akl_bounds_nan_scaling.safetensors"
    hf.with_config(server.vae_dir / name, scaling_factor=math.nan, shift_factor=math.inf)
    with ServerWatch(server.pid) as cost:
        entry = _run(server, name)
    cost.check("server: NaN scaling")
    assert "scaling_factor=nan" in _error(entry)
    with urllib.request.urlopen(server.url + "/history", timeout=30) as resp:
        history = _strict_json(resp.read())
    assert entry["prompt_id"] in history
    _good_prompt_runs(server)


@pytest.mark.timeout(300)
def test_a_20mb_family_string_stays_out_of_the_ui_and_history(server):
    name = "akl_bounds_long_family.safetensors"
    hf.with_metadata(server.vae_dir / name, vae_core__family="sdxl" + "z" * (20 << 20))
    with ServerWatch(server.pid) as cost:
        entry = _run(server, name)
    cost.check("server: 20 MB family string", rss_bound=512 << 20)
    assert entry["status"]["status_str"] == "success", entry["status"]
    with urllib.request.urlopen(server.url + "/history/" + entry["prompt_id"], timeout=30) as resp:
        raw = resp.read()
    assert len(raw) < 64 << 10, len(raw)  # the whole entry, prompt and outputs included
    card = _strict_json(raw)[entry["prompt_id"]]["outputs"]["1"]["akl_card"][0]
    assert card["family"] is None and "names no known family" in card["family_reason"]


@pytest.mark.timeout(300)
def test_a_file_rewritten_in_place_during_loads_never_kills_the_server(server):
    """A thread cuts the file to a third and writes it back, in place, over and over while prompts
    load it (each one is a new file to the cache). With mmap a read past the cut is SIGBUS, ending
    the server; with plain reads every prompt succeeds or fails with a clear error. Whether a cut
    lands inside a read is up to timing; the outcome checked is that the server survives them all."""
    name = "akl_bounds_rewritten.safetensors"
    path = server.vae_dir / name
    hf.write_good(path, seed=42, block_out_channels=(32, 64, 64, 64), norm_num_groups=32)  # ~6 MB
    good = path.read_bytes()
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            os.truncate(path, len(good) // 3)
            stop.wait(0.003)
            with open(path, "r+b") as f:
                f.write(good)
            stop.wait(0.003)

    worker = threading.Thread(target=churn, daemon=True)
    outcomes = []
    with ServerWatch(server.pid) as cost:
        worker.start()
        try:
            for _ in range(12):
                entry = _run(server, name)
                outcomes.append(entry["status"]["status_str"])
                if outcomes[-1] == "error":
                    msg = _error(entry)
                    assert name in msg and ("truncated" in msg or "changed or shrank" in msg
                                            or "corrupt" in msg), msg
        finally:
            stop.set()
            worker.join()
    cost.check("server: file rewritten during loads", time_bound=200.0)
    print(f"\nrewritten in place during 12 loads: {outcomes.count('success')} succeeded, "
          f"{outcomes.count('error')} failed cleanly")
    assert server.is_running()
    path.write_bytes(good)
    assert _run(server, name)["status"]["status_str"] == "success"


@pytest.mark.timeout(300)
def test_a_cp_p_rewrite_with_the_same_size_and_mtime_is_seen(server):
    name = "akl_bounds_cp_p.safetensors"
    path, other = server.vae_dir / name, server.vae_dir.parent / "akl_bounds_cp_p_other.safetensors"
    hf.write_good(path, seed=43, scaling_factor=0.18215)
    hf.write_good(other, seed=44, scaling_factor=0.13025)
    assert path.stat().st_size == other.stat().st_size
    first = _run(server, name)["outputs"]["1"]["akl_card"][0]
    st = path.stat()
    shutil.copyfile(other, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = _run(server, name)["outputs"]["1"]["akl_card"][0]
    assert (first["scaling_factor"], second["scaling_factor"]) == (0.18215, 0.13025)


@pytest.mark.timeout(300)
def test_a_link_to_a_private_file_is_described_not_echoed_and_a_false_family_claim_is_overridden(server, tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$Zq9SECRETHASH$abcdef:19000:0:99999:7:::\n" * 3)
    link = server.vae_dir / "akl_bounds_shadow.safetensors"
    if not link.is_symlink():
        os.symlink(secret, link)
    msg = _error(_run(server, link.name))
    assert link.name in msg and "a text file" in msg, msg
    assert "SECRET" not in msg and "Zq9" not in msg and "99999" not in msg, msg
    name = "akl_bounds_flux_claim.safetensors"
    hf.with_metadata(server.vae_dir / name, vae_core__family="flux")  # 4 latent channels; FLUX.1 has 16
    entry = _run(server, name)
    assert entry["status"]["status_str"] == "success", entry["status"]
    card = entry["outputs"]["1"]["akl_card"][0]
    assert card["family"] != "flux" and card["scaling_factor"] != 0.3611 and card["shift_factor"] is None
    assert "16 latent channels, not 4" in card["family_reason"]
    _good_prompt_runs(server)
