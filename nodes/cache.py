"""Loaded-model cache for the loader node: one load per (file, dtype), reloaded when the file's
modification time or size changes. Not a general cache: it holds at most MAX_ENTRIES VAEs."""
from __future__ import annotations

import collections
import os
import threading
from typing import Callable, Hashable, Tuple

MAX_ENTRIES = 4


def file_signature(path: str) -> Tuple[int, int]:
    """(mtime_ns, size) of a file, or of the newest/largest entry of a diffusers folder."""
    if os.path.isdir(path):
        mtime, size = 0, 0
        for root, _dirs, files in os.walk(path):
            for name in files:
                st = os.stat(os.path.join(root, name))
                mtime, size = max(mtime, st.st_mtime_ns), size + st.st_size
        return mtime, size
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


class ModelCache:
    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._entries: "collections.OrderedDict[Hashable, Tuple[Tuple[int, int], object]]" = collections.OrderedDict()
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
