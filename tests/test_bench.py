"""The benchmark scripts run end to end on tiny shapes and print their tables (the numbers
themselves are measured by hand, not by the test suite)."""

import importlib.util
import os
import re
import runpy
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run(capsys, monkeypatch):
    """run(script, *flags): what `python bench/script flags` prints, the script run as __main__ in
    this process (a process start spared; the processes it starts itself are started as usual)."""
    def run_script(script, *flags):
        path = os.path.join(ROOT, "bench", script)
        monkeypatch.setattr(sys, "argv", [path, *flags])
        monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts add their folders to it
        threads, rng = torch.get_num_threads(), torch.get_rng_state()
        try:
            runpy.run_path(path, run_name="__main__")
        finally:  # what the scripts set for themselves
            torch.set_num_threads(threads)
            torch.set_rng_state(rng)
        return capsys.readouterr().out
    return run_script


def run_alone(script, *flags):
    """What `python bench/script flags` prints, in a process of its own: for the scripts that measure
    peak memory in processes they start (a child's high-water mark starts at its parent's)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *flags],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_sampling_bench_prints_rates_ratios_and_the_matmul_bound(run):
    out = run("sampling.py", "--shapes", "4x3", "--prompt-len", "4", "--repeats", "1", "--threads", "1",
              "--profile", "--lora-ranks", "2", "--lora-unfolded")
    for contender in ("nanowarp", "nanowarp LoRA 2", "LoRA 2 unfolded", "generate", "no cache"):
        assert re.search(rf"4 x 3 +{contender} +[\d.]+ +[\d.]+x +[\d.]+x +1\n", out), (contender, out)
    assert re.search(r"4 x 3 +nanowarp +[\d.]+ +[\d.]+x +1\.00x", out)
    assert re.search(r"matmuls alone, 4x3: .* at most [\d.]+ tokens/s", out)
    assert re.search(r"nanowarp's median, 4x3: [\d.]+ tokens/s = [\d.]+% of that bound", out)
    assert re.search(r"so at most [\d.]+x generate's median at 4x3", out)


def test_logprobs_bench_prints_time_and_memory_for_both_cases():
    out = run_alone("logprobs.py", "--batch", "2", "--seq", "5", "--vocab", "300", "--dim", "16", "--repeats", "1",
              "--threads", "1")
    for case in ("hidden", "hidden+weight"):
        for variant in ("naive", "fused"):
            assert re.search(rf"\n{re.escape(case)} +{variant} +[\d.]+ +-?[\d.]+ +[\d.]+x +-?[\d.]+%", out), (case, variant, out)


def test_device_check_prints_its_table_on_small_shapes(run):
    out = run("device_check.py", "--small", "--no-compile", "--rl-steps", "2", "--threads", "1")
    table = out[out.index("\ncheck "):]
    for dtype in ("float32", "bfloat16"):
        assert re.search(rf"parity +{dtype}: max \|Δ log-prob\| vs CPU float32 +\d\.\d\de[-+]\d\d", table)
        for who in ("nanowarp eager", "generate"):
            assert re.search(rf"sampling +{dtype}: {who}, 8 x 16 +\d+ tok/s", table), (who, table)
        for who in ("naive", "fused"):
            assert re.search(rf"log-prob +{dtype}: {who}, 8 x 24, fwd\+bwd +[\d.]+ ms +[\d.]+x naive", table)
        for method in ("REINFORCE", "RLOO k=4"):
            assert re.search(rf"RL step +{dtype}: {method}, batch 8, 16 new, LoRA 4 +[\d.]+ s +sample [\d.]+, "
                             rf"score [\d.]+, update [\d.]+", table), (method, table)
            assert re.search(rf"job +{dtype}: {method}, I=2 M=2 T=100 projected +[\d.]+ min", table)
    assert re.search(r"parity +float32: .* 0\.00e\+00", table)  # the CPU against itself


def test_device_check_measures_the_cpu_memory_of_an_rl_step():
    out = run_alone("device_check.py", "--small", "--cpu-memory", "--micro-batch-size", "4", "--threads", "1")
    assert re.search(r"whole batch +\d+ +\d+ +-?\d+\n +4 +\d+ +\d+ +-?\d+\n", out), out
    assert re.search(r"micro-batches of 4: [\d.]+x the whole batch's peak, -?[\d.]+x its step's extra peak", out)


def test_rl_step_bench_prints_phases_and_ratios_without_trl(run):
    out = run("rl_step.py", "--shapes", "smoke", "--contenders", "nanowarp,reference", "--repeats", "1",
              "--threads", "1", "--profile")
    table = out[out.index("\nmedians over 1 rounds"):]
    assert re.search(r"smoke \(8 x 6 tokens\) +nanowarp +[\d.]+ +1\.00x( +[\d.]+){6}\n", table), out
    if importlib.util.find_spec("peft"):  # the reference way's LoRA is peft's
        assert re.search(r"smoke \(8 x 6 tokens\) +reference +[\d.]+ +[\d.]+x( +[\d.]+){6}\n", table), out
    else:
        assert "reference: skipped, peft not installed" in out
    assert "Differences that cannot be aligned" in table
    assert re.search(r"update.s matmuls alone .*: [\d.]+ s \(\d+ GFLOP/s\)", out)
    assert re.search(r"so the update is at \d+% of its matmul floor", out)


def test_checksums_bench_prints_save_load_verify_and_the_share_of_a_run(run):
    out = run("checksums.py", "--layers", "1", "--width", "32", "--vocab", "100", "--repeats", "1")
    for contender in ("save", "load"):
        assert re.search(rf"\n{contender} +[\d.]+ *\n", out), (contender, out)
    assert re.search(r"\nsave \+ checksums +[\d.]+ +[\d.]+x\n", out) and re.search(r"\nload \+ verify +[\d.]+ +[\d.]+x", out)
    assert re.search(r"checksums alone +[\d.]+ +\([\d.]+ GB/s, hub.seal\)", out)
    assert re.search(r"verify alone +[\d.]+ +\([\d.]+ GB/s\)", out)
    assert re.search(r"per WARP iteration of 2 runs \(4 checkpoints sealed, 3 verified\): [\d.]+ s = [\d.]+% of "
                     r"2 x 100 steps x 7.15 s \(1430 s\)", out)
