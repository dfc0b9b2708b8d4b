"""Reading untrusted weights files within bounds: every size a file declares is checked against the
file's real size (and the memory available) before anything is allocated, and nothing is mmap'ed.

Not a format converter (that is `convert.py`) nor the model builder (`loading.py`): this module only
reads bytes into tensors and checks what a file asks for against what it holds.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Dict, Optional, Tuple, Union

import torch

PathLike = Union[str, os.PathLike]

# safetensors' own reader refuses headers over 100 MB; a VAE's header is ~20 KB.
MAX_HEADER_BYTES = 100_000_000
# At most this share of the available memory may be read into tensors (the model is built beside them).
MEMORY_SHARE = 0.85
# Elements per step of the finite check, so it never allocates more than a few MB of booleans.
FINITE_CHUNK = 1 << 22
# A config may describe at most FIT_FACTOR x the file's weights + FIT_SLACK parameters before building.
FIT_FACTOR, FIT_SLACK = 2, 1 << 20
# Bytes an overlapping view may describe beyond its storage (real files: a few KB of expanded ids).
VIEW_SLACK = 1 << 20
# Bytes of header, metadata or config text quoted back in an error or the UI.
TEXT_CAP = 200

# safetensors dtype names (the format's spec) -> torch dtypes available in this torch.
_ST_DTYPES: Dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
        ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("BOOL", "bool"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ) if hasattr(torch, attr)
}


def _error(message: str) -> Exception:
    from .loading import VAELoadError  # loading imports this module: import at call time

    return VAELoadError(message)


def capped(text: Any, limit: int = TEXT_CAP) -> str:
    """`text` as a string of at most `limit` characters, saying how long it was when cut."""
    s = str(text)
    return s if len(s) <= limit else f"{s[:limit]}... ({len(s):,} characters in all)"


def describe_bytes(head: bytes) -> str:
    """What kind of file starts with `head`, in words; never the bytes themselves (the file may be a
    link to something private, and errors reach the UI and /history)."""
    for magic, what in ((b"\x7fELF", "an executable (ELF)"), (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
                        (b"\x1f\x8b", "a gzip archive"), (b"GGUF", "a GGUF model"), (b"%PDF", "a PDF document"),
                        (b"PK\x03\x04", "a zip archive")):
        if head.startswith(magic):
            return what
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "a JSON/text file"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return "binary data of an unknown kind"


# -- reading bytes without mmap ------------------------------------------------------------------


def _signature(st: os.stat_result) -> Tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


def _readinto(f: BinaryIO, view: memoryview) -> int:
    """Fill `view` from `f`; returns the bytes read (fewer only at the end of the file)."""
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            break
        done += n
    return done


def _changed(p: Path) -> Exception:
    return _error(f"{p}: the file changed or shrank while it was being read (is a download or copy still "
                  "writing it?); wait until it is complete, then run again")


def _check_unchanged(f: BinaryIO, p: Path, before: Tuple[int, int, int]) -> None:
    if _signature(os.fstat(f.fileno())) != before:
        raise _changed(p)


def _check_memory(p: Path, nbytes: int, what: str) -> None:
    from .memory import free_memory

    free = free_memory(torch.device("cpu"))
    if free is not None and nbytes > MEMORY_SHARE * free:
        raise _error(f"{p}: reading {what} needs {nbytes / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB of "
                     "system memory is available; free memory (close other programs or unload models) and retry")


def open_weights(p: Path) -> Tuple[BinaryIO, Tuple[int, int, int]]:
    """The file opened unbuffered, and its (size, mtime, inode) to tell later whether it changed."""
    try:
        f = open(p, "rb", buffering=0)
    except OSError as err:
        raise _error(f"{p}: cannot open the file: {err.strerror or type(err).__name__}") from None
    return f, _signature(os.fstat(f.fileno()))


# -- safetensors -----------------------------------------------------------------------------------


def _header_entry(p: Path, key: str, entry: Any, data_len: int) -> Tuple[torch.dtype, Tuple[int, ...], int, int]:
    where = f"{p}: corrupt safetensors header: tensor {capped(key, 80)!r}"
    if not isinstance(entry, dict):
        raise _error(f"{where} is described by a {type(entry).__name__}, expected an object")
    dtype = _ST_DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    if dtype is None:
        raise _error(f"{where} has dtype {capped(entry.get('dtype'), 40)!r}, which this torch cannot read "
                     f"(known: {', '.join(sorted(_ST_DTYPES))})")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise _error(f"{where} has shape {capped(shape, 80)}, expected a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len):
        raise _error(f"{where} has data_offsets {capped(offsets, 80)}, expected [begin, end] within the "
                     f"{data_len:,} data bytes the file holds; the file is truncated or damaged")
    numel = 1
    for s in shape:
        numel *= s
    itemsize = dtype.itemsize
    if numel * itemsize != offsets[1] - offsets[0]:
        raise _error(f"{where} declares shape {tuple(shape)} of {entry['dtype']} ({numel * itemsize:,} bytes) "
                     f"but holds {offsets[1] - offsets[0]:,} bytes; the file is damaged")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not allowed in a safetensors header")


def vae_part(keys) -> Optional[set]:
    """The keys of the VAE inside a full checkpoint (all keys under its VAE prefix), or None when the
    file is not a full checkpoint (then every tensor is the VAE's). Mirrors convert.strip_vae_prefix."""
    from .convert import CHECKPOINT_PREFIXES, PLAYGROUND_KEYS

    for prefix in CHECKPOINT_PREFIXES:
        sub = {k for k in keys if k.startswith(prefix)}
        if any(k[len(prefix):].startswith(("encoder.", "decoder.")) for k in sub):
            # plus the latent statistics a family takes from the checkpoint (Playground's edm_mean/std)
            return sub | {k for k in keys if k in PLAYGROUND_KEYS}
    return None


def read_safetensors(path: PathLike, vae_only: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, metadata) of a .safetensors file, read with plain reads (no mmap: a file that shrinks
    while it is read gives a clean error, not SIGBUS). Every offset and size in the header is checked
    against the file before a byte of tensor data is allocated; peak memory is the tensors themselves.
    With vae_only, the other tensors of a full checkpoint (UNet, text encoders) come back as meta
    tensors, with their names, shapes and dtypes but no data: they are never read."""
    p = Path(path)
    f, before = open_weights(p)
    with f:
        size = before[0]
        head = bytearray(8)
        if size < 8 or _readinto(f, memoryview(head)) != 8:
            raise _error(f"{p}: truncated safetensors file: {size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise _error(f"{p}: truncated safetensors file: its header claims {n:,} bytes but the file has {size:,}; "
                         "the download or copy was cut short")
        if n > MAX_HEADER_BYTES:
            raise _error(f"{p}: refused: a {n:,}-byte safetensors header (the limit is {MAX_HEADER_BYTES:,}; a VAE's "
                         "is a few KB)")
        raw = bytearray(n)
        if _readinto(f, memoryview(raw)) != n:
            raise _changed(p)
        try:
            header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
            kind = "nested too deeply" if isinstance(err, RecursionError) else "not valid JSON"
            raise _error(f"{p}: corrupt safetensors file: its header is {kind}") from None
        del raw
        if not isinstance(header, dict):
            raise _error(f"{p}: corrupt safetensors file: its header is a {type(header).__name__}, expected an object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise _error(f"{p}: corrupt safetensors file: __metadata__ must map strings to strings")
        data_start, data_len = 8 + n, size - 8 - n
        entries = sorted(((k, *_header_entry(p, k, v, data_len)) for k, v in header.items()), key=lambda e: e[3])
        end = 0
        for key, _dtype, _shape, begin, stop in entries:
            if begin < end:
                raise _error(f"{p}: corrupt safetensors header: tensor {capped(key, 80)!r} overlaps the tensor "
                             "before it; the file is damaged or crafted")
            end = stop
        wanted = vae_part(header) if vae_only else None
        _check_memory(p, sum(e[4] - e[3] for e in entries if wanted is None or e[0] in wanted),
                      f"its {len(entries) if wanted is None else len(wanted)} tensors")
        sd: Dict[str, torch.Tensor] = {}
        for key, dtype, shape, begin, stop in entries:
            if wanted is not None and key not in wanted:
                sd[key] = torch.empty(shape, dtype=dtype, device="meta")
                continue
            buf = torch.empty(stop - begin, dtype=torch.uint8)
            if stop > begin:
                f.seek(data_start + begin)
                if _readinto(f, memoryview(buf.numpy())) != stop - begin:
                    raise _changed(p)
            sd[key] = buf.view(dtype).reshape(shape)
        _check_unchanged(f, p, before)
    return sd, metadata


# -- torch checkpoints (zip and legacy pickles) ------------------------------------------------------


def check_zip(f: BinaryIO, p: Path, size: int) -> None:
    """Refuse a torch zip checkpoint whose entries are compressed (torch.save never compresses; a
    deflated entry can expand a few MB into GBs) or whose declared sizes exceed the file."""
    try:
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise _error(f"{p}: corrupt or truncated checkpoint: not a readable zip archive "
                     f"({type(err).__name__})") from None
    packed = [i for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise _error(f"{p}: refused: the checkpoint's entry {capped(packed[0].filename, 80)!r} is compressed "
                     f"(it would expand to {packed[0].file_size:,} bytes); torch.save never compresses entries, "
                     "so the file was made by another tool or crafted. Re-save it with torch.save or convert it "
                     "to .safetensors")
    declared = sum(i.file_size for i in infos)
    if declared > size or any(i.header_offset + i.file_size > size for i in infos):
        raise _error(f"{p}: corrupt or truncated checkpoint: its entries declare {declared:,} bytes but the file "
                     f"has {size:,}")
    _check_memory(p, declared, "its storages")
    f.seek(0)


def _non_overlapping(t: torch.Tensor) -> bool:
    """True when no two elements of `t` share memory: sorted by stride, each dimension steps past
    everything the smaller ones span (contiguous, channels-last, transposed and sliced layouts pass).
    Conservative: interleaved layouts that no serializer writes (strides (2, 3) on 3x3) count as overlapping."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    span = 1  # elements covered by the dimensions so far
    for st, sz in dims:
        if st < span:
            return False
        span = st * (sz - 1) + span
    return True


def check_views(sd: Dict[str, torch.Tensor], p: Path, size: int) -> None:
    """Refuse tensors that are not backed by their own bytes of the file: stride-0 or overlapping views
    (a 1 MB file can describe a 4 GB tensor that way) and more tensor bytes than the file holds."""
    real: Dict[int, int] = {}
    logical: Dict[Tuple[int, int, Tuple[int, ...], Tuple[int, ...]], int] = {}
    for key, v in sd.items():
        if v.numel() == 0:
            continue
        # small expanded buffers exist in real checkpoints (a text encoder's position ids); they count
        # in the total below, and only views describing more than VIEW_SLACK are refused by name
        if v.numel() * v.element_size() > VIEW_SLACK and not _non_overlapping(v):
            kind = "a stride-0 view (one stored value repeated)" if 0 in v.stride() else "an overlapping view"
            raise _error(f"{p}: refused: tensor {capped(key, 80)!r} of shape {tuple(v.shape)} is {kind} of "
                         f"{v.untyped_storage().nbytes():,} stored bytes; VAE weights are never saved that way, "
                         "so the file is damaged or crafted to exhaust memory")
        storage = v.untyped_storage()
        real[storage.data_ptr()] = storage.nbytes()
        # the same tensor saved under two names (tied weights) counts once
        logical[(storage.data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))] = v.numel() * v.element_size()
    stored, described = sum(real.values()), sum(logical.values())
    if stored > size or described > max(stored, size) + VIEW_SLACK:
        raise _error(f"{p}: refused: its tensors describe {described:,} bytes from {stored:,} stored bytes in a "
                     f"{size:,}-byte file; the file is damaged or crafted to exhaust memory")


def load_torch_checkpoint(path: PathLike, kind: str) -> Tuple[Any, int]:
    """torch.load(weights_only=True) through one open file handle (no mmap), after the zip entries are
    checked; returns (the unpickled object, the file size). Unpickling errors propagate to the caller."""
    p = Path(path)
    f, before = open_weights(p)
    with f:
        if kind == "zip-pickle":
            check_zip(f, p, before[0])
        obj = torch.load(f, map_location="cpu", weights_only=True)
        _check_unchanged(f, p, before)
    return obj, before[0]


# -- checks on the tensors, before a model is built -------------------------------------------------


def all_finite(t: torch.Tensor, chunk: int = FINITE_CHUNK) -> bool:
    """torch.isfinite(t).all() in steps of at most `chunk` elements (never a full-size boolean copy)."""
    if t.numel() <= chunk or t.ndim == 0:
        probe = t.to(torch.float16) if t.dtype.is_floating_point and t.element_size() == 1 else t  # float8
        return bool(torch.isfinite(probe).all())
    if t.ndim == 1:
        return all(all_finite(t[i:i + chunk], chunk) for i in range(0, t.shape[0], chunk))
    row = t[0].numel()
    if row > chunk:
        return all(all_finite(t[i], chunk) for i in range(t.shape[0]))
    step = chunk // max(row, 1)
    return all(all_finite(t[i:i + step], chunk) for i in range(0, t.shape[0], step))


def _expected_ndim(key: str) -> int:
    """Dimensions a diffusers-layout VAE tensor must have, from its name (0: no rule)."""
    module, _, leaf = key.rpartition(".")
    name = module.rpartition(".")[2]
    if leaf == "bias" or "norm" in name:
        return 1
    if leaf != "weight":
        return 0
    if ".attentions." in key and name in ("to_q", "to_k", "to_v", "0"):
        return 2
    return 4 if "conv" in name else 0


def check_vae_shapes(sd: Dict[str, torch.Tensor], source: str) -> None:
    """Every VAE weight has the rank its layer needs and no empty dimension (shape inference reads
    them by index, so a 0-d conv weight must be refused by name, not fail with an IndexError)."""
    for key, v in sd.items():
        want = _expected_ndim(key)
        if (want and v.ndim != want) or 0 in v.shape:
            expected = f"{want}-D" if want else "no empty dimension"
            raise _error(f"{source}: tensor {capped(key, 80)!r} has shape {tuple(v.shape)}, expected {expected}; "
                         "the file is damaged: re-download or re-export it")


def check_fits(cfg, sd: Dict[str, torch.Tensor], source: str, origin: str) -> None:
    """Refuse a config that describes more parameters than the file holds, before any module is built
    (a few KB of metadata must not make the loader build, and allocate, a model of GBs)."""
    from .config import parameter_count

    needed = parameter_count(cfg)
    held = sum(v.numel() for v in sd.values())
    # Small gaps are left to the strict loader, whose message names the missing or misshapen keys; a
    # skeleton of at most twice the file (plus 1M parameters) is cheap to build and to throw away.
    if needed > FIT_FACTOR * held + FIT_SLACK:
        raise _error(f"{source}: the VAE config ({origin}) describes {needed:,} parameters (block_out_channels="
                     f"{list(cfg.block_out_channels)}, layers_per_block={cfg.layers_per_block}, latent_channels="
                     f"{cfg.latent_channels}) but the file holds only {held:,} weights: it asks for more than it "
                     "holds, so its config is damaged; re-export the file or pass config=")

