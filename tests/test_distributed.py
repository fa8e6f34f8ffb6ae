"""WARP over several machines, tested on one: torchrun launchers that meet at a c10d rendezvous
(`--nnodes 2`, gloo), each with its own --out_dir, as on machines that share no disk; and torchrun
--max_restarts restarting a job one of whose ranks was killed with SIGKILL inside a run. Each gives
the weights of the sequential job, bit for bit, and only the rank that keeps the job folder writes."""

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

import train
from conftest import ROOT, Killed, assert_same_weights, final_weights, in_process, leftovers, stop_at
from nanowarp.config import parse_args
from nanowarp.data import DataError
from nanowarp.jobs.job import choose_root
from nanowarp.jobs.parallel import Group, restart_warning

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_nodes(tmp_path, node_args, env=None, timeout=120):
    """One `torchrun --nnodes N --nproc_per_node 1 train.py ARGS` per entry of node_args, as on N
    machines, meeting at a c10d rendezvous on 127.0.0.1 (extra environment variables in env).
    Returns their (exit status, output)."""
    endpoint = f"127.0.0.1:{free_port()}"
    procs, logs = [], []
    for n, args in enumerate(node_args):
        logs.append(tmp_path / f"node_{n}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(
                [*TORCHRUN, "--nnodes", str(len(node_args)), "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                 "--rdzv_endpoint", endpoint, "--rdzv_id", "test", *args],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                start_new_session=True))  # its own process group: its ranks die with it below
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:  # a launcher that timed out or failed takes its ranks along (no orphan ranks)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    return [(code, log.read_text()) for code, log in zip(codes, logs)]


def files(folder):
    return [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names]


def test_two_machines_restarted_by_torchrun_give_the_sequential_weights_and_only_rank_0_writes(
        job_flags, reference, tmp_path):
    out = [tmp_path / "a", tmp_path / "b"]
    out[1].mkdir()  # the second machine has a folder of that name, empty
    # rank 1 dies (SIGKILL) inside its first run; torchrun restarts the group on both machines once. The
    # marker file lets only the first process that gets there die. Without the shared store (see
    # parallel.restart_warning) the restarted ranks do not find the last attempt's addresses.
    env = {"NANOWARP_KILL_AT": "iter_1/run_1/step_2", "NANOWARP_KILL_ONCE": str(tmp_path / "killed"),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = [os.path.join(ROOT, "train.py"), *job_flags]
    nodes = torchrun_nodes(tmp_path, [["--max_restarts", "1", *cmd, "--out_dir", str(o)] for o in out], env)
    for code, log in nodes:
        assert code == 0, log
    assert (tmp_path / "killed").exists(), "no rank was killed"
    # rank 0 is the launcher the rendezvous sorts first: either one
    root = next(n for n, (_, log) in enumerate(nodes) if "rank 0 of 2 on " in log)
    log = nodes[root][1]
    assert f"keeps the job folder {out[root]}" in log and "resuming the job" in log  # after the restart
    assert "warning:" not in log
    assert_same_weights(final_weights(str(out[root])), reference)
    assert leftovers(str(out[root])) == []
    assert "\n".join(log for _, log in nodes).count("iter 2: merged") == 1  # only rank 0 logs
    other = out[1 - root]
    assert not other.exists() or files(other) == []  # the other machine's --out_dir: nothing written


def test_a_job_resumes_on_the_machine_that_holds_it_with_three_runs_on_two(job_flags, tmp_path, monkeypatch):
    # M = 3: iteration 1 killed after its first run, so ranks 0 and 1 take the missing runs 1 and 2,
    # iteration 2 trains runs 0 and 1 side by side, then run 2 alone
    flags = job_flags + ["--runs", "3"]
    held, empty, expected = tmp_path / "held", tmp_path / "empty", tmp_path / "expected"
    with monkeypatch.context() as patch, pytest.raises(Killed):
        stop_at(patch, "iter_1/run_0/saved")
        in_process(train.main, flags + ["--out_dir", str(held)])
    shutil.copytree(held, expected)
    assert in_process(train.main, flags + ["--out_dir", str(expected)]) == 0  # the sequential job, resumed
    # the folder is on the launcher started second: rank 1, as the rendezvous sorts launchers by host name
    # then pid (rank 0 if the pids wrapped around in between), so the root sends θ_init from rank 1
    cmd = [os.path.join(ROOT, "train.py"), *flags]
    nodes = torchrun_nodes(tmp_path, [cmd + ["--out_dir", str(empty)], cmd + ["--out_dir", str(held)]])
    for code, log in nodes:
        assert code == 0, log
    assert "resuming the job" in nodes[1][1] and "keeps the job folder " + str(held) in nodes[1][1]
    assert_same_weights(final_weights(str(held)), final_weights(str(expected)))
    assert leftovers(str(held)) == []
    assert not empty.exists()


def test_the_ranks_agree_on_the_one_that_holds_the_job_and_refuse_other_flags(job_flags, tmp_path):
    # what every rank gathers from the others (host, flags, holds a job.json), without a process group
    cfg = parse_args(job_flags + ["--out_dir", str(tmp_path)])
    mine = dataclasses.asdict(cfg)
    local = {**mine, "out_dir": "elsewhere", "threads": 4, "log_every": 10, "save_every": 5}  # each its own
    group = Group(rank=2, size=3)
    group.gather_objects = lambda _: [("m0", mine, False), ("m1", local, True), ("m2", local, True)]
    choose_root(cfg, group)
    assert group.root == 1 and not group.leader  # the first rank whose --out_dir holds the job
    group.gather_objects = lambda _: [("m0", mine, False), ("m1", mine, False), ("m2", local, False)]
    choose_root(cfg, group)
    assert group.root == 0  # a new job: rank 0's
    for flag, value in (("steps", 5), ("iterations", 3), ("device", "cuda")):
        group.gather_objects = lambda _: [("m0", mine, False), ("m1", {**mine, flag: value}, False)]
        with pytest.raises(ValueError, match=rf"rank 1 \(on m1\) was started with other flags than rank 0 \(on "
                                             rf"m0\): --{flag} .* \(now {value}\)\. Start every rank with the same"):
            choose_root(cfg, group)


def test_a_failure_on_one_rank_stops_every_rank_with_its_error():
    # rank 1 could not load the data on its machine: rank 0, which loaded its own, raises that error too
    group = Group(rank=0, size=2)
    group.gather_objects = lambda mine: [mine, DataError("no prompts_train.npz in data/ on m1")]
    with pytest.raises(DataError, match="on m1"):
        group.everywhere(lambda: "loaded")
    group.gather_objects = lambda mine: [mine, None]
    assert group.everywhere(lambda: "loaded") == "loaded"


def test_torchrun_restarts_through_the_shared_store_are_warned_about(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # torchrun's default in torch 2.13
    assert "set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restart_warning()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what that variable makes of it
    assert restart_warning() is None
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restart to fail
    assert restart_warning() is None
