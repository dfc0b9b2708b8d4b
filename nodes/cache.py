"""Loaded-model cache for the loader node: one load per (file, dtype), reloaded when the file's
content signature changes (size, mtime and a cheap hash of its header, index and sampled blocks;
every file of a diffusers folder). Not a general cache: it holds at most MAX_ENTRIES VAEs."""
from __future__ import annotations

import collections
import hashlib
import os
import threading
from typing import Callable, Hashable, Tuple

MAX_ENTRIES = 4
# Files up to this size are hashed whole (config.json, tiny VAEs); larger ones by their header (the
# safetensors tensor index), their tail (a zip's central directory, with every entry's CRC-32) and
# SAMPLES evenly spaced blocks, so two files of one architecture and size still differ.
FULL_HASH_MAX = 4 << 20
BLOCK = 64 << 10
SAMPLES = 16
MAX_INDEX = 100_000_000  # safetensors' own header limit


def content_digest(path: str, size: int) -> str:
    """A cheap content hash: about 2 MB read whatever the file's size (a rewrite that keeps the size
    and mtime, as `cp -p` does, still changes it)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= FULL_HASH_MAX:
            h.update(f.read())
            return h.hexdigest()
        head = f.read(BLOCK)
        h.update(head)
        index = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and BLOCK < 8 + index <= min(size, MAX_INDEX):  # the rest of a safetensors index
            h.update(f.read(8 + index - BLOCK))
        for i in range(1, SAMPLES + 1):
            f.seek((size - BLOCK) * i // (SAMPLES + 1))
            h.update(f.read(BLOCK))
        f.seek(max(0, size - 16 * BLOCK))
        h.update(f.read())
    return h.hexdigest()


def file_signature(path: str) -> Tuple:
    """(mtime_ns, size, content digest) of a file; for a diffusers folder, the sorted tuple of that
    for every file in it, by relative name."""
    if os.path.isdir(path):
        entries = []
        for root, _dirs, files in os.walk(path):
            for name in files:
                full = os.path.join(root, name)
                entries.append((os.path.relpath(full, path), *file_signature(full)))
        return tuple(sorted(entries))
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, content_digest(path, st.st_size)


class ModelCache:
    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._entries: "collections.OrderedDict[Hashable, Tuple[Tuple, object]]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # how many times a loader function actually ran (for tests and the card)

    def get(self, path: str, key: Hashable, load: Callable[[], object]):
        """The cached object for (path, key) if the file is unchanged, else load() and cache it."""
        sig = file_signature(path)
        full_key = (os.path.realpath(path), key)
        with self._lock:
            hit = self._entries.get(full_key)
            if hit is not None and hit[0] == sig:
                self._entries.move_to_end(full_key)
                return hit[1]
        obj = load()
        with self._lock:
            self.loads += 1
            self._entries[full_key] = (sig, obj)
            self._entries.move_to_end(full_key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return obj

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


MODELS = ModelCache()
