"""The benchmarks' memory figure: the peak of live tensor bytes, from torch's allocator events."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from live_bytes import live_peak_bytes  # noqa: E402


def test_peak_counts_what_is_alive_together_not_what_was_allocated():
    def work():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(2_000_000)  # 8 MB: 12 MB alive
        del a
        c = torch.empty(500_000)  # 2 MB: 10 MB alive
        del b, c

    assert live_peak_bytes(work) == 12_000_000


def test_peak_sees_a_kernel_output():
    x = torch.randn(64, 64)
    # the input existed before the call; only the 64x64 fp32 result (16 KiB) is new
    assert live_peak_bytes(lambda: x @ x) == 64 * 64 * 4
