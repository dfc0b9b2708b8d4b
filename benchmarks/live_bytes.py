"""Peak live tensor bytes of a call on the CPU, from torch's own allocator events.

Resident-set figures (VmHWM, ru_maxrss) measure the process, not the call: a call may reuse heap
that earlier frees left resident, or map fresh pages, so two implementations with the same live
tensors can differ by 2x there. torch.profiler with profile_memory records every allocation and
free the c10 CPU allocator makes (tensors, oneDNN scratchpads handed out as tensors); summing them
in time order gives the peak of what was alive. Profiling slows the call, so time it separately.
"""
from __future__ import annotations

from typing import Callable


def live_peak_bytes(fn: Callable[[], object]) -> int:
    """Largest sum of live tensor bytes during fn(), counting only what fn() allocates."""
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
