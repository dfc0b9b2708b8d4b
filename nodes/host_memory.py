"""How much memory a run may take, asked the way the host's memory manager answers it: free device
memory from the VAE's ModelPatcher where the host offers `get_free_memory` there, and system memory
bounded by the container's cgroup limit (read by vae_core.memory, which the core's planner shares).
Not an estimator of what a run needs (vae_core/memory.py)."""
from __future__ import annotations

import logging
from typing import Optional

import torch

import comfy.model_management as mm

from ..vae_core import memory

logger = logging.getLogger(__name__)

def available_ram() -> Optional[int]:
    """Bytes of system memory the server may still take: MemAvailable, bounded by the cgroup's limit
    (a container's), None when neither can be read (vae_core.memory.free_memory on the CPU)."""
    return memory.free_memory(torch.device("cpu"))


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
