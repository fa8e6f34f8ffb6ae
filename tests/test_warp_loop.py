"""WARP's outer loop (nanowarp/warp.py, Algorithm 1) on a job that only records, in milliseconds: each
iteration merges its M runs by SLERP (LERP with --merge lerp) and moves θ_init by LITI toward the merge,
the next iteration starts from there, an iteration done before a restart is read back, and only the
leader merges. The job folder, the runs and their processes are test_train.py's, test_resume.py's and
test_parallel.py's."""

import contextlib

import pytest
import torch

import nanowarp.warp
from nanowarp import merging
from nanowarp.config import parse_args
from nanowarp.warp import warp

SFT = {"w": torch.tensor([1.0, 0.0, 0.0]), "b": torch.tensor([0.5, -0.5])}


class Job:
    """A jobs.job.Job that trains no run: run m of iteration i moves each tensor of θ_init by its own
    vector; `done`, iterations already on disk (their θ_init in `saved`); `leader`, rank 0 or not."""

    def __init__(self, runs, done=(), leader=True):
        self.runs, self.done, self.leader = runs, set(done), leader
        self.saved, self.trained, self.merged = {}, [], {}

    def theta_sft(self):
        return dict(SFT)

    def missing_runs(self, i):
        return None if i in self.done else list(range(self.runs))

    def load_liti(self, i):
        assert self.leader, "only rank 0 reads θ_init back: the others get it by broadcast"
        return self.saved[i]

    def train_runs(self, i, missing, theta_init):
        self.trained.append((i, {k: v.clone() for k, v in theta_init.items()}))
        g = torch.Generator().manual_seed(i)
        return [{k: v + torch.randn(v.shape, generator=g) for k, v in theta_init.items()} for _ in missing]

    def save_slerp(self, i, theta):
        self.merged[i] = theta

    def save_liti(self, i, theta):
        self.saved[i] = theta

    def broadcast(self, theta):
        return theta


@pytest.fixture
def job(monkeypatch):
    """The Job warp() opens, made by the test: job(runs=..., done=..., leader=...)."""
    made = {}

    def make(**kwargs):
        made["job"] = Job(**kwargs)

        def open_job(cfg, resources, log):
            made["job"].opened = (cfg, resources, log)
            return contextlib.nullcontext(made["job"])
        monkeypatch.setattr(nanowarp.warp, "open_job", open_job)
        return made["job"]
    return make


def expected(iterations, runs, eta, merge=merging.slerp):
    """θ_init after each iteration, by the formulas: SLERP (or LERP) of the runs, then LITI."""
    theta, out = dict(SFT), []
    for i in range(1, iterations + 1):
        g = torch.Generator().manual_seed(i)
        thetas = [{k: v + torch.randn(v.shape, generator=g) for k, v in theta.items()} for _ in range(runs)]
        theta = merging.liti(theta, merge(theta, thetas), eta)
        out.append(theta)
    return out


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cfg(*flags):
    return parse_args(["--iterations", "2", "--runs", "3", "--liti_rate", "0.3", *flags])


@pytest.mark.parametrize("merge", ["slerp", "lerp"])
def test_each_iteration_merges_its_runs_and_moves_theta_init_by_liti(job, merge):
    j = job(runs=3)
    config, resources = cfg("--merge", merge), object()
    final = warp(config, resources, log=print)
    assert j.opened == (config, resources, print)  # the job of these flags, with the runs' resources
    want = expected(2, 3, 0.3, getattr(merging, merge))
    assert same(final, want[1]) and same(j.saved[1], want[0]) and same(j.saved[2], want[1])
    assert list(j.merged) == [1, 2] and same(merging.liti(SFT, j.merged[1], 0.3), want[0])  # θ_slerp of each saved
    assert [i for i, _ in j.trained] == [1, 2] and same(j.trained[0][1], SFT) and same(j.trained[1][1], want[0])
    other = expected(2, 3, 0.3, merging.lerp if merge == "slerp" else merging.slerp)
    assert not same(final, other[1])  # the two merges differ on these runs


def test_an_iteration_done_before_a_restart_is_read_back_not_trained(job):
    j = job(runs=3, done={1})
    j.saved[1] = want1 = expected(1, 3, 0.3)[0]
    final = warp(cfg(), log=None)
    assert [i for i, _ in j.trained] == [2] and same(j.trained[0][1], want1) and same(final, expected(2, 3, 0.3)[1])


def test_only_the_leader_merges_and_reads_theta_init_back(job):
    j = job(runs=3, leader=False)
    final = warp(cfg(), log=None)
    assert j.saved == {} and j.merged == {} and same(final, SFT)  # the other ranks get θ_init by broadcast
    j = job(runs=3, leader=False, done={1})
    warp(cfg(), log=None)  # iteration 1 done: not trained, and θ_init not read back here (load_liti asserts)
    assert [i for i, _ in j.trained] == [2]


def test_the_loop_validates_its_flags_first(job):
    j = job(runs=3)
    with pytest.raises(ValueError, match="--liti_rate"):
        warp(cfg("--liti_rate", "2"), log=None)
    assert j.trained == []
