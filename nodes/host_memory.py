"""How much memory a run may take, asked the way the host's memory manager answers it: free device
memory from the VAE's ModelPatcher where the host offers `get_free_memory` there, and system memory
bounded by the container's cgroup limit. Not an estimator of what a run needs (vae_core/planner.py)."""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

import comfy.model_management as mm

from ..vae_core import planner

logger = logging.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"
# cgroup v1 writes "no limit" as a number near 2**63 (PAGE_COUNTER_MAX pages); nothing real is this big
_UNLIMITED = 1 << 60


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _own_cgroup_dirs(root: str, membership: str = "/proc/self/cgroup") -> list:
    """The cgroup directories that bound this process: v2's (the unified line of /proc/self/cgroup)
    and v1's memory controller, each with its ancestors up to the mount point."""
    lines = (_read(membership) or "").splitlines()
    rels = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, controllers, rel = parts
        if controllers == "":  # v2
            rels.append(("", rel))
        elif "memory" in controllers.split(","):  # v1
            rels.append(("memory", rel))
    dirs = []
    for sub, rel in rels:
        base = os.path.join(root, sub) if sub else root
        rel = rel.strip("/")
        while True:
            d = os.path.join(base, rel) if rel else base
            if os.path.isdir(d):
                dirs.append(d)
            if not rel:
                break
            rel = os.path.dirname(rel)
    if not dirs and os.path.isdir(root):  # a container with its own cgroup namespace: the root is ours
        dirs.append(root)
    return dirs


def _inactive_file(stat: Optional[str]) -> int:
    """Page cache the kernel can drop before it runs the OOM killer ('inactive_file' in memory.stat)."""
    for line in (stat or "").splitlines():
        key, _, value = line.partition(" ")
        if key in ("inactive_file", "total_inactive_file"):
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def cgroup_available(root: str = CGROUP_ROOT, membership: str = "/proc/self/cgroup") -> Optional[int]:
    """Bytes this process's cgroup still lets it take (the tightest limit minus what is charged,
    less the droppable page cache), None when no cgroup limits it."""
    best = None
    for d in _own_cgroup_dirs(root, membership):
        for limit_name, usage_name in (("memory.max", "memory.current"),
                                       ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            raw_limit, raw_usage = _read(os.path.join(d, limit_name)), _read(os.path.join(d, usage_name))
            if raw_limit is None or raw_usage is None or raw_limit == "max":
                continue
            try:
                limit, usage = int(raw_limit), int(raw_usage)
            except ValueError:
                continue
            if limit <= 0 or limit >= _UNLIMITED:
                continue
            used = max(0, usage - _inactive_file(_read(os.path.join(d, "memory.stat"))))
            free = max(0, limit - used)
            best = free if best is None else min(best, free)
    return best


def available_ram() -> Optional[int]:
    """Bytes of system memory the server may still take: MemAvailable, bounded by the cgroup's limit
    (a container's), None when neither can be read."""
    candidates = [v for v in (planner.free_memory(torch.device("cpu")), cgroup_available()) if v is not None]
    return min(candidates) if candidates else None


def free_bytes(vae) -> int:
    """Free memory on the VAE's device as the host's memory manager sees it: the patcher's own
    `get_free_memory` where the host has one (the newest adds what dynamic VRAM can give back),
    else model_management's; on the CPU, never more than available_ram() allows."""
    device = vae.device
    ask = getattr(getattr(vae, "patcher", None), "get_free_memory", None)
    free = int(ask(device)) if callable(ask) else int(mm.get_free_memory(device))
    if torch.device(device).type == "cpu":
        ram = available_ram()
        if ram is not None:
            free = min(free, ram)
    return free
