"""
One measurement in a process of its own, for the benchmarks that measure peak memory (logprobs.py,
scale.py, device_check.py): each setting runs as `python SCRIPT --worker-flags...` and prints one JSON
line last, read here; and the readings of the resident set those workers take (Linux's /proc). The
peak is started again from the resident set just before what is measured, where Linux allows it;
elsewhere it holds the process's earlier peak too, and a fresh process keeps that small.
tests/test_bench.py runs the workers in its own process instead (their tables, not their numbers).
"""

import json
import os
import subprocess
import sys


def run_worker(script, flags):
    """`python script *flags` in a fresh process: the JSON object it printed last."""
    done = subprocess.run([sys.executable, os.path.abspath(script), *map(str, flags)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{os.path.basename(script)} {' '.join(map(str, flags))} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def status_mib(field):
    """VmRSS (resident now) or VmHWM (the peak resident set) of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak():
    """Start the peak resident set (VmHWM) again from the resident set now, where Linux allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then VmHWM holds the process's earlier peak too: an upper bound


def ratio(a, b):
    """a / b as "1.23x", or "n/a" where b, a peak above the resident set, did not grow (in a process that
    had freed as much before: the tests run workers in theirs)."""
    return f"{a / b:.2f}x" if b > 0 else "n/a"
