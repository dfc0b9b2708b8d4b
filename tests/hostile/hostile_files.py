"""Bad VAE files for the hostile tests (in-process and against a real server): each writer puts one
kind of broken or malicious file at a path; BROKEN lists them with the words their error must hold.

Needs only torch, safetensors and vae_core, so the end-to-end tests can write files into a server's
model folder too. Not a fixture module: plain functions.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vae_core import AutoencoderKL, convert  # noqa: E402

# Tiny KL-VAE (f = 8, a few thousand parameters); 8 groups is what shape inference recovers.
TINY = dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def tiny_model(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**{**TINY, **overrides}).eval()


def ldm_state_dict(seed: int = 0) -> Dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in convert.diffusers_to_ldm(tiny_model(seed).state_dict()).items()}


def write_good(path: Path, seed: int = 0, **overrides) -> Path:
    """A loadable tiny VAE (LDM layout, config in the metadata)."""
    tiny_model(seed, **overrides).save_single_file(path)
    return path


def _bump_mtime(path: Path) -> None:
    """Make sure a rewritten file does not keep the old (mtime, size) signature on coarse clocks."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))


def fix(path: Path, seed: int = 0) -> Path:
    """Replace whatever is at `path` by a good tiny VAE, as a user re-downloading the file would."""
    write_good(path, seed)
    _bump_mtime(path)
    return path


class Exploit:
    """Unpickling this creates `marker` (Path.touch): a test proves it never happens."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# -- writers -------------------------------------------------------------------------------------


def truncated(path: Path) -> None:
    good = path.with_suffix(".tmp")
    write_good(good)
    data = good.read_bytes()
    good.unlink()
    path.write_bytes(data[: len(data) // 2])


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def json_renamed(path: Path) -> None:
    path.write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}))


def corrupt_header(path: Path) -> None:
    """A safetensors header that is not JSON (bytes overwritten inside it)."""
    good = path.with_suffix(".tmp")
    write_good(good)
    data = bytearray(good.read_bytes())
    good.unlink()
    data[9:40] = b"\x00" * 31
    path.write_bytes(bytes(data))


def unet(path: Path) -> None:
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)}, str(path))


def clip(path: Path) -> None:
    save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(8, 4),
               "text_model.embeddings.position_ids": torch.zeros(1, 8)}, str(path))


def lora(path: Path) -> None:
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, str(path))


def wrong_dtype(path: Path) -> None:
    sd = ldm_state_dict()
    sd["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"].to(torch.int32)
    save_file(sd, str(path))


def wrong_shape(path: Path) -> None:
    sd = ldm_state_dict()
    sd["decoder.up.1.block.0.conv2.weight"] = torch.zeros(16, 16, 3, 1)
    meta = {"vae_core.config": json.dumps(tiny_model().config.to_dict())}
    save_file(sd, str(path), metadata=meta)


def nan_weights(path: Path) -> None:
    sd = ldm_state_dict()
    sd["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    save_file(sd, str(path))


def evil_pickle(path: Path, marker: Path) -> None:
    sd: dict = dict(ldm_state_dict())
    sd["payload"] = Exploit(str(marker))
    torch.save({"state_dict": sd}, str(path))


# name -> (writer, file suffix, words the error must hold besides the file name)
BROKEN: Dict[str, Tuple[Callable[[Path], None], str, Tuple[str, ...]]] = {
    "truncated": (truncated, ".safetensors", ("truncated",)),
    "zero_bytes": (zero_bytes, ".safetensors", ("empty", "0 bytes")),
    "json_renamed": (json_renamed, ".safetensors", ("JSON",)),
    "corrupt_header": (corrupt_header, ".safetensors", ("corrupt",)),
    "unet": (unet, ".safetensors", ("diffusion model", "not a VAE")),
    "clip": (clip, ".safetensors", ("text encoder", "not a VAE")),
    "lora": (lora, ".safetensors", ("LoRA", "not a VAE")),
    "wrong_dtype": (wrong_dtype, ".safetensors", ("floating point", "int32")),
    "wrong_shape": (wrong_shape, ".safetensors", ("wrong shapes", "expected")),
    "nan_weights": (nan_weights, ".safetensors", ("NaN or inf", "decoder.conv_out.weight")),
}
