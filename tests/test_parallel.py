"""The M runs of an iteration side by side: a worker that fails stops the job with its error.
That `--workers 2` (torch.multiprocessing) and `torchrun --nproc_per_node=2` (gloo) give the weights of
the sequential loop, bit for bit, is tested once, with a reward model and a reward function that every
process loads (test_rewards.py: test_two_workers_..., test_torchrun_ranks_...); several machines and
restarts: test_distributed.py; signals: test_faults.py."""

import pytest
import torch

from nanowarp.config import parse_args
from nanowarp.data import DataError
from nanowarp.jobs.job import train_worker_run
from nanowarp.jobs.parallel import RemoteTraceback, WorkerPool
from nanowarp.rl import load_resources


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
