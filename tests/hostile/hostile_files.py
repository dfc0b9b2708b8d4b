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


# -- resource attacks (issue 13): small files that ask for GBs, minutes or a crash ----------------
# Each is a few KB to a few MB on disk; what it would cost an unbounded loader is in its docstring.

STRIDE0_SHAPE = (2**15, 2**15)  # 2**30 float32 values = 4 GiB if materialised


def _torch_save(sd: dict, path: Path, legacy: bool = False) -> None:
    torch.save(sd, str(path), _use_new_zipfile_serialization=not legacy)


def stride0_ckpt(path: Path, legacy: bool = False) -> None:
    """One stored float repeated 2**30 times by a stride-0 view: 4 GiB if anything touches it."""
    sd = dict(ldm_state_dict())
    sd["decoder.conv_out.weight"] = torch.zeros(1).expand(*STRIDE0_SHAPE)
    _torch_save(sd, path, legacy)


def overlap_ckpt(path: Path, legacy: bool = False) -> None:
    """65,536 stored floats seen as a 2**15 x 2**15 matrix through strides (1, 1): 4 GiB of views."""
    sd = dict(ldm_state_dict())
    sd["decoder.conv_out.weight"] = torch.zeros(2**16).as_strided(STRIDE0_SHAPE, (1, 1))
    _torch_save(sd, path, legacy)


BOMB_NUMEL = 2**29  # float32: a 2 GiB storage, deflated to ~2 MB


class _BombStorage:
    """Stands for the one storage of the bomb's pickle (pickled as a persistent id, as torch.save does)."""


class _BombTensor:
    def __reduce_ex__(self, protocol):
        import collections

        return (torch._utils._rebuild_tensor_v2, (_BombStorage, 0, (BOMB_NUMEL,), (1,), False, collections.OrderedDict()))


class _BombPickler(__import__("pickle").Pickler):
    def persistent_id(self, obj):
        if obj is _BombStorage:
            return ("storage", torch.FloatStorage, "0", "cpu", BOMB_NUMEL)
        return None


def zip_bomb_ckpt(path: Path) -> None:
    """A torch zip checkpoint whose one storage is a deflated entry of 2 GiB of zeros (~2 MB on disk).
    Written without ever holding the 2 GiB: one deflate block of 1 MiB of zeros, repeated."""
    import io
    import pickle
    import zipfile
    import zlib

    template = io.BytesIO()
    torch.save({"k": torch.zeros(1)}, template)
    buf = io.BytesIO()
    _BombPickler(buf, protocol=2).dump({"decoder.conv_out.weight": _BombTensor()})
    chunk = bytes(1 << 20)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)  # the same bytes for every 1 MiB of zeros
    repeats = BOMB_NUMEL * 4 // len(chunk)
    tail = comp.flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(repeats):
        crc = zlib.crc32(chunk, crc)
    with zipfile.ZipFile(io.BytesIO(template.getvalue())) as src, zipfile.ZipFile(path, "w") as zf:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                zi = zipfile.ZipInfo(info.filename)
                zi.compress_type, zi.CRC = zipfile.ZIP_DEFLATED, crc
                zi.file_size, zi.compress_size = BOMB_NUMEL * 4, len(block) * repeats + len(tail)
                zi.header_offset = zf.fp.tell()
                zf.fp.write(zi.FileHeader(zip64=True))
                for _ in range(repeats):
                    zf.fp.write(block)
                zf.fp.write(tail)
                zf.filelist.append(zi)
                zf.NameToInfo[zi.filename] = zi
                zf.start_dir = zf.fp.tell()
            else:
                data = buf.getvalue() if info.filename.endswith("/data.pkl") else src.read(info)
                zf.writestr(zipfile.ZipInfo(info.filename), data)


def with_config(path: Path, **fields) -> None:
    """A good tiny file whose metadata config has `fields` changed (values may be NaN, strings, ...)."""
    cfg = {**tiny_model().config.to_dict(), **fields}
    save_file(ldm_state_dict(), str(path), metadata={"vae_core.config": json.dumps(cfg)})


def with_metadata(path: Path, **metadata: str) -> None:
    """A good tiny file (no config in the metadata) with extra metadata strings."""
    save_file(ldm_state_dict(), str(path), metadata={k.replace("__", "."): v for k, v in metadata.items()})


def deep_json_config(path: Path, depth: int = 100_000) -> None:
    """A metadata config nested `depth` lists deep (RecursionError in a plain json.loads)."""
    save_file(ldm_state_dict(), str(path), metadata={"vae_core.config": "[" * depth + "]" * depth})


def many_resnets(path: Path, extra: int = 20_000) -> None:
    """20,000 tiny 1x1x1x1 'resnet' keys in level 0 and no config: inferred as 20,002 resnets per level
    (a skeleton of minutes and GBs if built)."""
    sd = dict(ldm_state_dict())
    for i in range(2, 2 + extra):
        sd[f"encoder.down.0.block.{i}.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    save_file(sd, str(path))


def zero_dim_conv(path: Path) -> None:
    sd = dict(ldm_state_dict())
    sd["encoder.conv_in.weight"] = torch.tensor(1.0)
    save_file(sd, str(path))


def write_text(path: Path, text: str) -> None:
    path.write_text(text)


def legacy_bomb_ckpt(path: Path, numel: int = 2**31) -> None:
    """A legacy (pre-1.6, non-zip) torch pickle declaring one 8 GiB storage, holding 64 bytes of it.
    torch allocates the declared size before reading it; the allocation is virtual (never touched)."""
    import collections
    import io
    import pickle
    import struct

    class Storage:
        pass

    class Tensor:
        def __reduce_ex__(self, protocol):
            return (torch._utils._rebuild_tensor_v2, (Storage, 0, (numel,), (1,), False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel, None) if obj is Storage else None

    buf = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001,  # torch's legacy magic number and protocol version
                   {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, buf, protocol=2)
    Pickler(buf, protocol=2).dump({"decoder.conv_out.weight": Tensor()})
    pickle.dump(["0"], buf, protocol=2)
    buf.write(struct.pack("<q", numel) + bytes(64))
    path.write_bytes(buf.getvalue())
