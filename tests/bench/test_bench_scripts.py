"""The CPU benchmark scripts run end to end at a toy size and print their rows. Their figures are
never asserted (times drift with the machine); what is checked is what must hold at any speed:
the exact tiler's output equals the untiled one, and every row is measured."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_lean_prints_both_ratios_and_the_tiled_result_is_exact():
    out = _run("benchmarks/bench_lean.py", "--sizes", "128", "--tile", "64", "--repeats", "1", "--threads", "1",
               "--channels", "32", "32", "64", "64", "--ops", "decode", "encode")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| (de|en)code \| 128 \|", line)]
    assert [r[0].strip() for r in rows] == ["decode", "encode"], out
    for r in rows:
        time_ratio, mem_ratio, diff, work = float(r[4]), float(r[7]), float(r[8]), float(r[9])
        assert time_ratio > 0 and mem_ratio > 0
        assert diff < 1e-4, f"the lean exact plan differs from untiled by {diff}"
        assert work >= 1.0, f"a plan cannot do fewer conv multiply-adds than the untiled model ({work})"


def test_bench_lean_store_budget_reaches_the_tiler():
    """--store-budget hands the tiler memory for checkpoints: the plan that may store everything
    holds more than the leanest one, and is still exact."""
    def decode_row(*extra):
        out = _run("benchmarks/bench_lean.py", "--sizes", "128", "--tile", "64", "--repeats", "1", "--threads", "1",
                   "--channels", "32", "32", "64", "64", "--ops", "decode", *extra)
        assert f"store_budget {extra[1] if extra else 0} MiB" in out, out
        return next(line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| decode | 128 |"))

    lean, stored = decode_row(), decode_row("--store-budget", "1000")
    assert float(stored[8]) < 1e-4, stored
    assert float(stored[6]) > float(lean[6]), (lean, stored)  # MiB held by the tiled run


def test_bench_limits_measures_each_row_with_live_tensor_memory():
    out = _run("benchmarks/bench_limits.py", "--sizes", "64", "--dtypes", "fp32", "--ops", "decode",
               "--impls", "ours", "diffusers", "--repeats", "1", "--threads", "1")
    assert "peak of live tensor bytes" in out or "live tensor bytes" in out
    rows = {line.split("|")[4].strip(): line.split("|") for line in out.splitlines()
            if line.startswith("| decode | 64 | fp32 |")}
    assert set(rows) == {"ours", "diffusers"}, out
    for impl, cols in rows.items():
        assert "failed" not in "|".join(cols), cols
        assert float(cols[10]) > 0, f"{impl}: no memory measured"
        assert float(cols[9]) > 0, f"{impl}: no share of the conv peak"


def test_bench_tiling_reports_live_memory_for_each_method_and_exact_is_exact():
    out = _run("benchmarks/bench_tiling.py", "--sizes", "128", "--tile", "64", "--kinds", "decode",
               "--methods", "exact-lean", "blend", "--channels", "32", "32", "64", "64")
    assert "peak live tensor bytes" in out
    rows = {line.split("|")[1].strip(): line.split("|")[1:-1] for line in out.splitlines()
            if re.match(r"\| (exact-lean|blend) \| 64 \|", line)}
    assert set(rows) == {"exact-lean", "blend"}, out
    for method, cols in rows.items():
        live_gib, mem_ratio, time_ratio = float(cols[4]), float(cols[5]), float(cols[8])
        assert live_gib > 0 and mem_ratio > 0 and time_ratio > 0, (method, cols)
    assert float(rows["exact-lean"][2]) > 100, "the exact tiler's PSNR against untiled is that of fp32 rounding"
    assert float(rows["exact-lean"][6]) > 0, "the planner's tiled estimate against the lean plan's live peak"


def test_bench_attention_prints_every_row_with_errors_at_the_dtypes_level():
    out = _run("benchmarks/bench_attention.py", "--tokens", "64", "256", "--channels", "64", "--threads", "1",
               "--repeats", "1", "--decode-size", "64")
    attention_table, decode_table = out.split("| decode | bf16 |")
    rows = [line.split("|")[1:-1] for line in attention_table.splitlines() if re.match(r"\| \d+ \| (fp32|bf16) \|", line)]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("64", "fp32"), ("64", "bf16"), ("256", "fp32"),
                                                            ("256", "bf16")], out
    for r in rows:
        assert float(r[2]) > 0 and float(r[3]) > 0 and float(r[4]) > 0
        sdpa_err, ours_err = float(r[5]), float(r[6])
        if r[1].strip() == "fp32":
            assert sdpa_err < 1e-5 and ours_err < 1e-5, r
        else:  # inputs rounded to bf16 (2^-9 of values up to ~4), and ours within 3x SDPA's own error
            assert sdpa_err < 2 ** -5 and ours_err < 3 * sdpa_err, r
    decode = [line.split("|")[1:-1] for line in decode_table.splitlines() if line.startswith("| 64 | bf16 | ")]
    assert len(decode) == 1, out
    sdpa_s, ours_s, _, sdpa_err, ours_err = (float(x) for x in decode[0][2:])
    assert sdpa_s > 0 and ours_s > 0
    assert 0 < sdpa_err < 0.25 and 0 < ours_err < 0.25, decode  # bf16 against fp32, outputs of scale ~1


def test_bench_winograd_times_every_path_and_each_stays_at_fp32_accuracy():
    """The Winograd benchmark's three paths compute the same convolutions: each row is timed, the
    direct path and the core's F(2x2) within fp32 rounding of float64, NNPACK's F(6x6) within its
    larger but still fp32-level error (a wrong transform or padding would be off by the output's
    own scale). With the threshold lowered the small model's convs take the core's F(2x2) path."""
    out = _run("benchmarks/bench_winograd.py", "--channels", "32", "32", "64", "64", "--sizes", "64",
               "--threads", "1", "--repeats", "1", "--min-channels", "32")
    conv_table, model_table = out.split("whole model:")
    convs = [line.split("|")[1:-1] for line in conv_table.splitlines() if re.match(r"\| \d+->\d+ at \d+² \|", line)]
    assert len(convs) == 7, out
    assert re.search(r"^ \d+ 3x3 stride-1 convs, ([1-9]\d*) of them wide enough", model_table), model_table
    models = [line.split("|")[1:-1] for line in model_table.splitlines() if re.match(r"\| (en|de)code \| 64 \|", line)]
    assert [m[0].strip() for m in models] == ["encode", "decode"], out
    for row in convs + [m[1:] for m in models]:
        direct_s, f2_s, f2_ratio, nnpack_s, nn_ratio, direct_err, f2_err, nnpack_err = (float(x) for x in row[1:9])
        assert min(direct_s, f2_s, f2_ratio, nnpack_s, nn_ratio) > 0, row
        assert direct_err < 1e-5 and f2_err < 1e-5, row
        assert nnpack_err < 1e-3, row


def test_bench_cpu_half_times_each_dtype_and_stays_at_its_precision():
    """bench_cpu_half.py: a row per dtype, each timed, each half-precision decode within that
    dtype's error of the fp32 one (a conv left unrounded or rounded in the wrong dtype would be off
    by the output's own scale or sit at fp32's error)."""
    out = _run("benchmarks/bench_cpu_half.py", "--channels", "32", "32", "32", "32", "--latent", "8",
               "--no-diffusers")
    assert re.search(r"native convolutions: bf16 (True|False), fp16 (True|False);", out), out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ours |")]
    assert [r[1].strip() for r in rows] == ["bf16", "fp16"], out
    # fp16 steps are 2^-11 relative, bf16's 2^-8: a few layers of rounding put the output's error
    # between these (on outputs of order 1)
    bounds = {"bf16": (1e-4, 0.2), "fp16": (1e-6, 0.02)}
    for _, dtype, t32, t16, ratio, err in rows:
        assert min(float(t32), float(t16), float(ratio)) > 0
        low, high = bounds[dtype.strip()]
        assert low < float(err) < high, (dtype, err)
