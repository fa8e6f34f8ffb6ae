"""The benchmark scripts run end to end on tiny shapes and print their tables (the numbers
themselves are measured by hand, not by the test suite)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *flags):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *flags],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_sampling_bench_prints_rates_ratios_and_the_matmul_bound():
    out = run("sampling.py", "--shapes", "4x3", "--prompt-len", "4", "--repeats", "1", "--threads", "1",
              "--profile")
    for contender in ("nanowarp", "generate", "no cache"):
        assert re.search(rf"4 x 3 +{contender} +[\d.]+ +[\d.]+x +1\n", out), (contender, out)
    assert re.search(r"matmuls alone, 4x3: .* at most [\d.]+ tokens/s", out)
    assert re.search(r"so at most [\d.]+x generate's median at 4x3", out)


def test_logprobs_bench_prints_time_and_memory_for_both_cases():
    out = run("logprobs.py", "--batch", "2", "--seq", "5", "--vocab", "300", "--dim", "16", "--repeats", "1",
              "--threads", "1")
    for case in ("hidden", "hidden+weight"):
        for variant in ("naive", "fused"):
            assert re.search(rf"\n{re.escape(case)} +{variant} +[\d.]+ +-?[\d.]+ +[\d.]+x +-?[\d.]+%", out), (case, variant, out)
