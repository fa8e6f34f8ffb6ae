"""The M runs of an iteration side by side: `--workers 2` (torch.multiprocessing) and
`torchrun --nproc_per_node=2` (gloo) give the weights of the sequential loop, bit for bit; a worker
that fails stops the job with its error."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_same_weights, final_weights, in_process
from nanowarp.config import parse_args
from nanowarp.data import DataError
from nanowarp.parallel import RemoteTraceback, WorkerPool
from nanowarp.rl import load_resources
from nanowarp.runner import train_worker_run
from nanowarp.warp import warp


def test_two_workers_give_the_sequential_weights(job_flags, reference, tmp_path):
    in_process(warp, parse_args(job_flags + ["--out_dir", str(tmp_path), "--workers", "2"]), None, lambda *a: None)
    assert_same_weights(final_weights(str(tmp_path)), reference)


def test_torchrun_with_two_ranks_gives_the_sequential_weights(job_flags, reference, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *job_flags, "--out_dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_weights(final_weights(str(tmp_path)), reference)
    assert done.stdout.count("iter 2: merged") == 1  # only rank 0 logs


def test_a_failing_worker_stops_the_job_with_its_error(job_flags, tmp_path):
    # the parent of a job checks its inputs first; here the workers meet a missing data folder themselves
    cfg = parse_args(job_flags + ["--out_dir", str(tmp_path), "--data", str(tmp_path / "gone")])
    pool = WorkerPool(cfg, [torch.device("cpu")] * 2, threads=1, load=load_resources, train=train_worker_run)
    try:
        with pytest.raises(DataError, match="no prompts_train.npz in") as raised:
            pool.train(1, [0, 1])
        assert isinstance(raised.value.__cause__, RemoteTraceback) and "in worker" in str(raised.value.__cause__)
        assert not any(p.is_alive() for p in pool.procs)  # the job stopped: no worker goes on
    finally:
        pool.close()
