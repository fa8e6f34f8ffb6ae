"""A tiny WARP job for the crash-safety and parallelism tests (tests/test_resume.py,
tests/test_parallel.py): the conftest models (GPT-2 and DistilBERT, 2 layers, width 32) and IMDB
prompts; I = 2, M = 2, 3 steps of batch 4, 8 new tokens, and one CPU thread per process, so that
every way of running it gives bit-identical weights."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nanowarp.config import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERATIONS, RUNS, STEPS = 2, 2, 3


@pytest.fixture(scope="module")
def job_flags(tiny_gpt2_dir, tiny_reward_dir, prepared_imdb_dir):
    """The flags of the tiny job, without --out_dir."""
    return ["--policy", tiny_gpt2_dir, "--reward_model", tiny_reward_dir, "--data", prepared_imdb_dir,
            "--iterations", str(ITERATIONS), "--runs", str(RUNS), "--steps", str(STEPS), "--batch_size", "4",
            "--max_new_tokens", "8", "--lora_rank", "2", "--warmup", "1", "--lr", "1e-2", "--device", "cpu",
            "--threads", "1"]


def in_process(fn, *args):
    """Call fn here, giving back the thread count that --threads changes."""
    threads = torch.get_num_threads()
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference_job(job_flags, tmp_path_factory):
    """The job folder of the job run uninterrupted, sequentially, in this process (do not change it)."""
    from nanowarp.warp import warp
    out = str(tmp_path_factory.mktemp("reference"))
    in_process(warp, parse_args(job_flags + ["--out_dir", out]), None, lambda *a: None)
    return out


@pytest.fixture(scope="module")
def reference(reference_job, tiny_gpt2_dir):
    """The final θ_init (iter_I/liti) of the job run uninterrupted, sequentially, in this process."""
    theta = final_weights(reference_job)
    sft = load_file(os.path.join(tiny_gpt2_dir, "model.safetensors"))
    assert any(not torch.equal(theta[k], sft[k]) for k in theta), "the job must move the weights"
    return theta


def train_py(args, env=None, timeout=300):
    """`python train.py args` in a subprocess (extra environment variables in env)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def final_weights(out_dir):
    return load_file(os.path.join(out_dir, f"iter_{ITERATIONS}", "liti", "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


def leftovers(out_dir):
    """Temporary files, training states, and checkpoint folders without their config.json."""
    found = []
    for folder, subfolders, files in os.walk(out_dir):
        found += [os.path.join(folder, f) for f in files if f.startswith(".tmp") or f == "state.pt"]
        if folder != out_dir and not subfolders and "config.json" not in files:
            found.append(folder)
    return found
