"""Safety bounds for the resource-attack tests: run an attack with the address space capped, so a
regression fails cleanly (an allocation error) instead of eating the shared machine's memory, and
measure its time and peak RSS growth. In-process (`bounded`) or for a server's pid (`ServerWatch`).

Not benchmarks: the bounds are generous against the honest figures (milliseconds, a few MB) and far
below what each attack cost before the fix (minutes, 2-6 GB).
"""
from __future__ import annotations

import contextlib
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

# An attack may grow the address space by at most this much: every attack cost >= 2 GiB before the fix.
AS_MARGIN = 1 << 30
# Peak RSS growth an attack may cause (honest: a few MB of tensors for the tiny files used here).
RSS_BOUND = 256 << 20
# Seconds an attack may take (honest: well under a second; before the fix, 3 minutes or more).
TIME_BOUND = 30.0


def _status(pid: str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@dataclass
class Measured:
    seconds: float = 0.0
    rss_growth: int = 0

    def check(self, what: str, rss_bound: int = RSS_BOUND, time_bound: float = TIME_BOUND) -> None:
        assert self.rss_growth < rss_bound, (f"{what}: peak RSS grew {self.rss_growth / 2**20:.0f} MiB "
                                             f"(bound {rss_bound / 2**20:.0f} MiB)")
        assert self.seconds < time_bound, f"{what}: took {self.seconds:.1f} s (bound {time_bound:.0f} s)"


@contextlib.contextmanager
def bounded(margin: int = AS_MARGIN) -> Iterator[Measured]:
    """Cap this process's address space at its current size + `margin` for the block (the soft limit,
    restored after), and measure the block's time and peak RSS growth (VmHWM, reset at the start)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _status("self", "VmSize") + margin
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss0 = _status("self", "VmRSS")
    out = Measured()
    t0 = time.monotonic()
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield out
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        out.seconds = time.monotonic() - t0
        out.rss_growth = _status("self", "VmHWM") - rss0


class ServerWatch:
    """For a server process: cap its address space at its size + `margin` while watching (restored
    after), and sample its VmRSS every 20 ms to report the peak growth of what ran meanwhile."""

    def __init__(self, pid: int, margin: int = AS_MARGIN):
        self.pid, self.margin = pid, margin
        self.measured = Measured()
        self._stop = threading.Event()
        self._peak = 0
        self._old: Optional[tuple] = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self._peak = max(self._peak, _status(str(self.pid), "VmRSS"))
            except (OSError, AssertionError):
                return  # the process ended: the test's own checks say so
            self._stop.wait(0.02)

    def __enter__(self) -> Measured:
        self._old = resource.prlimit(self.pid, resource.RLIMIT_AS)
        resource.prlimit(self.pid, resource.RLIMIT_AS, (_status(str(self.pid), "VmSize") + self.margin, self._old[1]))
        self._rss0 = self._peak = _status(str(self.pid), "VmRSS")
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self.measured

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.measured.seconds = time.monotonic() - self._t0
        self.measured.rss_growth = self._peak - self._rss0
        with contextlib.suppress(ProcessLookupError):
            resource.prlimit(self.pid, resource.RLIMIT_AS, self._old)
